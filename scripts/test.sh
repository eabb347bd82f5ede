#!/usr/bin/env bash
# The project's one test command (the one README.md names and .ci/run calls): every unit,
# property and integration test of the workspace, then the kernel-tuning kit's tests, the
# dashboards check against a real Prometheus and the Debian package test.
#
# The tests talk to real peers: Chromium, Python's ssl and websockets, openssl, curl,
# nats-server, Prometheus, HAProxy, shellcheck, ethtool, nftables, iproute2,
# systemd-analyze. As root with apt-get, what is missing is installed first (one
# `apt-get update`, then one `apt-get install`; HOLDFAST_NO_INSTALL=1 never installs).
# Otherwise the run stops, naming what is missing and the command that installs it, unless
# HOLDFAST_ALLOW_SKIP=1: then each test whose peer is missing is counted as skipped, never
# as passed. Without that variable a missing peer is a failure.
#
# The integration tests start the gateway and the reference worker as real processes, so
# every binary is built first; `cargo test` alone builds only the binaries of the package
# under test. Binaries go where cargo puts them ($CARGO_TARGET_DIR, or target/).
#
# Extra arguments go to `cargo test`; naming packages narrows the run to those tests (the
# shell suites then do not run), e.g.
#   scripts/test.sh -p holdfast --test bad_input
#   scripts/test.sh -- --nocapture
#
# The last line is always `N passed, N failed, N skipped`, counted over cargo's test
# results (its ignored tests count as skipped) and the shell suites' own counts; the exit
# status is non-zero when anything failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
script="test"
work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-test.XXXXXX")
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
install_cleanup 5

# ---- what the tests need ----------------------------------------------------------------

# have PACKAGE CHECK...: adds PACKAGE to `need` unless the command CHECK... succeeds.
need=()
have() {
    local package=$1
    shift
    "$@" >/dev/null 2>&1 || need+=("$package")
}
on_path() { command -v "$1"; }
have openssl on_path openssl
have curl on_path curl
have python3 test -x /usr/bin/python3
have python3-websockets /usr/bin/python3 -c 'import websockets'
have chromium test -x /usr/bin/chromium
have shellcheck on_path shellcheck
have ethtool on_path ethtool
have nftables on_path nft
have iproute2 on_path ip
have nats-server sh -c 'command -v nats-server || test -x /usr/sbin/nats-server'
have prometheus sh -c 'command -v prometheus && command -v promtool'
have systemd on_path systemd-analyze
have haproxy on_path haproxy

if ((${#need[@]})); then
    if [[ $EUID -eq 0 && ${HOLDFAST_NO_INSTALL:-} != 1 ]] && command -v apt-get >/dev/null; then
        say "installing what the tests need: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get update -qq || ! apt-get install -y -qq --no-install-recommends "${need[@]}"; then
            die "apt-get could not install: ${need[*]}"
        fi
    elif [[ ${HOLDFAST_ALLOW_SKIP:-} == 1 ]]; then
        warn "missing: ${need[*]}; the tests that need them are counted as skipped (HOLDFAST_ALLOW_SKIP=1)"
    else
        printf '%s: these tests need packages that are not installed: %s\n' "$script" "${need[*]}" >&2
        printf 'install them with:\n  sudo apt-get update && sudo apt-get install -y %s\n' "${need[*]}" >&2
        printf 'or run scripts/test.sh as root (it installs them), or set HOLDFAST_ALLOW_SKIP=1 to count those tests as skipped\n' >&2
        exit 1
    fi
fi

# The gateway raises its own soft open-file limit; the tests' clients need one too.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---- counting ---------------------------------------------------------------------------

passed=0 failed=0 skipped=0
# count_suite NAME LOG STATUS: adds the suite's last `N passed, N failed, N skipped` line;
# a suite that failed without saying so (or said nothing) counts as one failure.
count_suite() {
    local name=$1 log=$2 status=$3 line p f s
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$log" | tail -n 1)
    if [[ -z $line ]]; then
        warn "$name printed no counts (exit status $status): counted as one failure"
        failed=$((failed + 1))
        return
    fi
    read -r p _ f _ s _ <<<"${line//,/}"
    passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
    if ((status != 0 && f == 0)); then
        warn "$name exited with status $status: counted as one failure"
        failed=$((failed + 1))
    fi
}

# ---- cargo ------------------------------------------------------------------------------

# `--workspace` would override `-p`, so it is only added when no package is named.
scope=(--workspace)
for arg in "$@"; do
    case "$arg" in
        --) break ;;
        -p | --package | -p?* | --package=*) scope=() ;;
    esac
done

export HOLDFAST_SKIP_FILE=$work/skipped
: >"$HOLDFAST_SKIP_FILE"
say "cargo build --workspace --bins"
if cargo build --workspace --bins; then
    say "cargo test"
    cargo test --no-fail-fast ${scope[@]+"${scope[@]}"} "$@" 2>&1 | tee "$work/cargo.log"
    status=${PIPESTATUS[0]}
else
    status=1
    : >"$work/cargo.log"
fi
# `test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`
read -r c_passed c_failed c_ignored < <(awk '
    /^test result: / {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed;/) p += $i
            if ($(i + 1) ~ /^failed;/) f += $i
            if ($(i + 1) ~ /^ignored;/) g += $i
        }
    }
    END { print p + 0, f + 0, g + 0 }' "$work/cargo.log")
# A test that skipped itself (common/peer.rs) ran to `ok`: it is a skip, not a pass.
c_skipped=$(cut -f1,2 "$HOLDFAST_SKIP_FILE" | sort -u | grep -c . || true)
passed=$((passed + c_passed - c_skipped))
failed=$((failed + c_failed))
skipped=$((skipped + c_ignored + c_skipped))
if ((c_skipped)); then
    say "cargo tests skipped (HOLDFAST_ALLOW_SKIP=1)"
    cut -f2,3 "$HOLDFAST_SKIP_FILE" | sort -u | sed 's/\t/: needs /; s/^/  /'
fi
if ((status != 0 && c_failed == 0)); then
    warn "cargo build or test failed (status $status) without a failed test: counted as one failure"
    failed=$((failed + 1))
fi

# ---- the shell suites (whole run only) --------------------------------------------------

if ((${#scope[@]})); then
    export HOLDFAST_SKIP_BUILD=1
    for suite in kernel-tuning/tests/run.sh scripts/check-dashboards.sh scripts/test-package.sh; do
        say "$suite"
        log=$work/$(basename "$(dirname "$suite")")-$(basename "$suite").log
        "$suite" 2>&1 | tee "$log"
        count_suite "$suite" "$log" "${PIPESTATUS[0]}"
    done
fi

echo
echo "$passed passed, $failed failed, $skipped skipped"
((failed == 0))
