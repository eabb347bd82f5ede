#!/usr/bin/env bash
# Checks dashboards/ against a real gateway and a real Prometheus:
#   1. the Grafana dashboards are valid, importable JSON (title, uid, schemaVersion, a
#      Prometheus data-source variable);
#   2. promtool accepts the alert rules and the scrape config, and the rules' unit tests
#      (dashboards/prometheus/alerts.test.yml) pass;
#   3. a throw-away gateway with an echo worker carries a little traffic while a
#      Prometheus on loopback scrapes it every second; then EVERY query of EVERY panel
#      (template variables substituted: $instance and $core by .*, $__rate_interval by
#      10s) must parse and return data, every template-variable query must find values,
#      every alert expression must parse, and every metric name in the dashboards and
#      rules must be one the gateway serves.
#
# Needs `prometheus` and `promtool` (Debian: apt-get install prometheus), python3 and curl;
# without them it fails, naming the package, unless HOLDFAST_ALLOW_SKIP=1 asks for a skip
# (counted: the last line says `0 passed, 0 failed, 1 skipped`). Builds the workspace
# binaries unless HOLDFAST_SKIP_BUILD=1; runs them from $CARGO_TARGET_DIR/debug (default
# target/debug) or HOLDFAST_BIN_DIR. Every wait has a deadline; every process it starts is
# stopped by PID on exit. Prints `N passed, N failed, N skipped`; exits 1 if anything failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN=${HOLDFAST_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
# Time allowed for the live part (after building), in seconds.
LIMIT=${CHECK_DASHBOARDS_LIMIT:-120}

# missing WHAT PACKAGE: the check cannot run here; a failure unless skipping was asked for.
missing() {
    if [ "${HOLDFAST_ALLOW_SKIP:-}" = 1 ]; then
        echo "SKIP: $1 is not installed (apt-get install $2)"
        echo "0 passed, 0 failed, 1 skipped"
        exit 0
    fi
    echo "FAIL: $1 is not installed: apt-get install $2 (scripts/test.sh installs it as root), or set HOLDFAST_ALLOW_SKIP=1 to skip this check"
    echo "0 passed, 1 failed, 0 skipped"
    exit 1
}
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    missing "prometheus and promtool" prometheus
fi
for tool in python3 curl; do
    if ! command -v "$tool" >/dev/null; then
        missing "$tool" "$tool"
    fi
done

passed=0
failed=0
pass() {
    passed=$((passed + 1))
    echo "ok    $*"
}
fail() {
    failed=$((failed + 1))
    echo "FAIL  $*"
}
# check NAME COMMAND...: runs the command, counts it, shows its output only on failure.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$name"
    else
        fail "$name"
        printf '%s\n' "$out" | sed 's/^/      /'
    fi
}
finish() {
    echo "$passed passed, $failed failed, 0 skipped"
    [ "$failed" -eq 0 ]
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-dashboards.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

DEADLINE=0
# wait_for WHAT COMMAND...: polls the command every 0.2 s until it succeeds or the live
# part's deadline passes.
wait_for() {
    local what=$1
    shift
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$DEADLINE" ]; then
            echo "timed out waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

# ---- static checks ----------------------------------------------------------------------

shopt -s nullglob
DASHBOARDS=("$ROOT"/dashboards/*.json)
shopt -u nullglob
if [ "${#DASHBOARDS[@]}" -eq 0 ]; then
    fail "dashboards/*.json exist"
fi
for d in "${DASHBOARDS[@]}"; do
    check "importable dashboard ${d#"$ROOT"/}" python3 - "$d" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
problems = []
for key in ("title", "uid", "schemaVersion", "panels", "templating"):
    if key not in d:
        problems.append(f"no {key}")
if d.get("id") is not None:
    problems.append("id must be null so that import creates the dashboard")
variables = d.get("templating", {}).get("list", [])
ds_vars = [v["name"] for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"]
inputs = [i["name"] for i in d.get("__inputs", []) if i.get("pluginId") == "prometheus"]
if not ds_vars and not inputs:
    problems.append("neither a prometheus datasource variable nor a DS_ input")
allowed = {"${%s}" % n for n in ds_vars + inputs} | {"$%s" % n for n in ds_vars + inputs}
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
ids = set()
for p in panels(d.get("panels", [])):
    if p.get("id") in ids:
        problems.append(f"panel id {p.get('id')} twice")
    ids.add(p.get("id"))
    if "gridPos" not in p:
        problems.append(f"panel {p.get('title')!r} has no gridPos")
    for t in p.get("targets", []):
        uid = (t.get("datasource") or p.get("datasource") or {}).get("uid")
        if uid not in allowed:
            problems.append(f"panel {p.get('title')!r} uses datasource {uid!r}, not {sorted(allowed)}")
        if not t.get("expr"):
            problems.append(f"panel {p.get('title')!r} has a target without expr")
if problems:
    sys.exit("\n".join(problems))
PY
done
check "promtool check rules alerts.yml" promtool check rules "$ROOT/dashboards/prometheus/alerts.yml"
test_rules() {
    (cd "$ROOT/dashboards/prometheus" && promtool test rules alerts.test.yml)
}
if [ -f "$ROOT/dashboards/prometheus/alerts.test.yml" ]; then
    check "promtool test rules alerts.test.yml" test_rules
fi
check "promtool check config prometheus.yml" promtool check config "$ROOT/dashboards/prometheus/prometheus.yml"

# ---- a live gateway and Prometheus --------------------------------------------------------

if [ "${HOLDFAST_SKIP_BUILD:-0}" != 1 ]; then
    echo "building the workspace binaries..."
    if ! cargo build --workspace --bins --quiet; then
        fail "cargo build --workspace --bins"
        finish
        exit 1
    fi
fi
for b in holdfast holdfast-worker holdfast-bench; do
    if [ ! -x "$BIN/$b" ]; then
        fail "binary $BIN/$b exists"
        finish
        exit 1
    fi
done
DEADLINE=$((SECONDS + LIMIT))

"$BIN/holdfast-bench" gen-cert --out "$TMP/pki" >"$TMP/gen-cert.log" 2>&1

"$BIN/holdfast-worker" echo --socket "$TMP/worker.sock" >"$TMP/worker.out" 2>"$TMP/worker.err" &
PIDS+=("$!")
wait_for "the echo worker" grep -q "listening on" "$TMP/worker.out"

"$BIN/holdfast" run --listen 127.0.0.1:0 --admin 127.0.0.1:0 --cores 2 \
    --cert "$TMP/pki/cert.pem" --key "$TMP/pki/key.pem" --worker "$TMP/worker.sock" \
    >"$TMP/gateway.out" 2>"$TMP/gateway.err" &
PIDS+=("$!")
if ! wait_for "the gateway's ready line" grep -q "^holdfast ready " "$TMP/gateway.out"; then
    fail "gateway starts"
    sed 's/^/      /' "$TMP/gateway.err" | tail -20
    finish
    exit 1
fi
ready=$(grep -m1 "^holdfast ready " "$TMP/gateway.out")
LISTEN=$(sed -n 's/.* listen=\([^ ]*\).*/\1/p' <<<"$ready")
ADMIN=$(sed -n 's/.* admin=\([^ ]*\).*/\1/p' <<<"$ready")
echo "gateway: listen=$LISTEN admin=$ADMIN"

# Traffic that overlaps the scrapes: echoes on 4 connections, and one client that sends
# garbage instead of a ClientHello (a failed handshake, a tls_error close).
"$BIN/holdfast-bench" echo --target "$LISTEN" --ca "$TMP/pki/ca.pem" --conns 4 --size 64 \
    --rate 200 --duration 8 >"$TMP/bench.out" 2>&1 &
PIDS+=("$!")
python3 - "$LISTEN" <<'PY' || true
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=5) as s:
    s.sendall(b"this is not a TLS ClientHello\r\n" * 8)
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
PY

PROM_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PROM="http://127.0.0.1:$PROM_PORT"
cp "$ROOT/dashboards/prometheus/alerts.yml" "$TMP/alerts.yml"
cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $TMP/alerts.yml
scrape_configs:
  - job_name: holdfast
    scrape_timeout: 900ms
    static_configs:
      - targets: ["$ADMIN"]
EOF
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn \
    >"$TMP/prometheus.log" 2>&1 &
PIDS+=("$!")
if ! wait_for "Prometheus to be ready" curl -fsS -m 2 "$PROM/-/ready"; then
    fail "prometheus starts"
    sed 's/^/      /' "$TMP/prometheus.log" | tail -20
    finish
    exit 1
fi
pass "prometheus starts on 127.0.0.1:$PROM_PORT"

# At least 12 scrapes (a 10 s rate window holds several), and the traffic seen.
scrapes_done() {
    curl -fsS -m 2 "$PROM/api/v1/query" \
        --data-urlencode 'query=count_over_time(up{job="holdfast"}[1m]) >= 12 and on() sum(holdfast_frames_total) > 0' |
        grep -q '"result":\[{'
}
if wait_for "12 scrapes with traffic" scrapes_done; then
    pass "prometheus scraped the gateway with traffic"
else
    fail "prometheus scraped the gateway with traffic"
    curl -fsS -m 2 "$PROM/api/v1/targets" | sed 's/^/      /' | head -c 2000 || true
    echo
fi

# Every panel query, variable query, alert expression and metric name, through the API.
set +e
python3 - "$PROM" "$ADMIN" "$ROOT/dashboards/prometheus/alerts.yml" "${DASHBOARDS[@]}" <<'PY' >"$TMP/queries.out"
import json, re, sys, urllib.parse, urllib.request

prom, admin, rules_file, dashboards = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]

def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)

def query(expr):
    try:
        return get(prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except Exception:
            return {"status": "error", "error": str(e)}
    except Exception as e:
        return {"status": "error", "error": str(e)}

SUBST = [
    (re.compile(r"\$\{__rate_interval\}|\$__rate_interval"), "10s"),
    (re.compile(r"\$\{__interval\}|\$__interval"), "10s"),
    (re.compile(r"\$\{__range\}|\$__range"), "1m"),
]
def substitute(expr, variables):
    for pattern, value in SUBST:
        expr = pattern.sub(value, expr)
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${%s}" % name, ".*").replace("$" + name, ".*")
    return expr

def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))

results = []  # (ok, what, detail)
names_used = set()
for path in dashboards:
    d = json.load(open(path))
    variables = [v["name"] for v in d.get("templating", {}).get("list", [])]
    short = path.rsplit("/", 1)[-1]
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q or "")
        if not m:
            results.append((False, f"{short} variable ${v['name']}", f"unsupported query {q!r}"))
            continue
        selector = substitute(m.group(1), variables)
        names_used.update(re.findall(r"\bholdfast_\w+", selector))
        url = prom + f"/api/v1/label/{m.group(2)}/values?" + urllib.parse.urlencode({"match[]": selector})
        try:
            values = get(url).get("data", [])
        except Exception as e:
            values, err = [], str(e)
        results.append((bool(values), f"{short} variable ${v['name']}: {q}", f"values {values}"))
    for p in panels(d.get("panels", [])):
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            names_used.update(re.findall(r"\bholdfast_\w+", expr))
            q = substitute(expr, variables)
            r = query(q)
            what = f"{short} panel {p.get('title')!r} {t.get('refId')}: {q}"
            if r.get("status") != "success":
                results.append((False, what, f"error: {r.get('error')}"))
            elif not r["data"]["result"]:
                results.append((False, what, "no data"))
            else:
                results.append((True, what, f"{len(r['data']['result'])} series"))

# Alert expressions: each must parse and evaluate (most return nothing on a healthy box).
text = open(rules_file).read()
exprs = re.findall(r"^\s*expr:\s*\|\s*\n((?:\s{10,}.*\n)+)|^\s*expr:\s*(.+)$", text, re.M)
alerts = 0
for block, line in exprs:
    expr = " ".join((block or line).split())
    names_used.update(re.findall(r"\bholdfast_\w+", expr))
    r = query(expr)
    alerts += 1
    results.append((r.get("status") == "success", f"alert expr: {expr}", r.get("error", "evaluates")))
if alerts != len(re.findall(r"^\s*- alert:", text, re.M)):
    results.append((False, "every alert's expr was found", f"{alerts} exprs found"))

# Every holdfast_* name used must be served by the gateway.
with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
    served = set()
    for line in r.read().decode().splitlines():
        if line and not line.startswith("#"):
            served.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
missing = sorted(n for n in names_used if n not in served)
results.append((not missing, f"{len(names_used)} metric names used are all served", f"not served: {missing}"))

for ok, what, detail in results:
    print(("ok    " if ok else "FAIL  ") + what + ("" if ok else f"\n      -> {detail}"))
print("COUNTS %d %d" % (sum(1 for r in results if r[0]), sum(1 for r in results if not r[0])))
PY
rc=$?
set -e
grep -v '^COUNTS ' "$TMP/queries.out" || true
if counts=$(grep '^COUNTS ' "$TMP/queries.out"); then
    read -r _ p f <<<"$counts"
    passed=$((passed + p))
    failed=$((failed + f))
else
    fail "query checks ran (python exit $rc)"
fi

# The gateway is still healthy after all that.
check "gateway /healthz" curl -fsS -m 2 "http://$ADMIN/healthz"
finish
