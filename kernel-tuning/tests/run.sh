#!/usr/bin/env bash
# Tests for kernel-tuning/holdfast-tune. Run as root (the network-namespace parts need it;
# they are skipped with the reason otherwise):
#   kernel-tuning/tests/run.sh
# Sysctl tests run against a fake /proc/sys in a temp dir; the real-kernel parts run only
# inside network namespaces this script creates (holdfast-test-PID-*) and always deletes,
# touching only per-namespace keys, so the host's settings are never changed. Every command
# runs under `timeout`, and the whole run is bounded too. A part whose tool or privilege is
# missing (root, ip, nft, ethtool, shellcheck, systemd-analyze) fails, naming it, unless
# HOLDFAST_ALLOW_SKIP=1 asks for skipping; then it is counted as skipped. The last line is
# always "N passed, N failed, N skipped" (skips are listed above it); the exit status is
# non-zero on any failure.
set -euo pipefail
# Conditions are written `$(COND && echo 0 || echo 1)`: echo cannot fail, so SC2015's
# A && B || C caveat does not apply.
# shellcheck disable=SC2015

if [[ -z ${HOLDFAST_TESTS_BOUNDED:-} ]]; then
    export HOLDFAST_TESTS_BOUNDED=1
    exec timeout --signal=TERM --kill-after=10 600 "$0" "$@"
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KIT=$(cd "$HERE/.." && pwd)
TUNE=$KIT/holdfast-tune
FAKE_ETHTOOL=$HERE/fake-ethtool
TMP=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-tune-test.XXXXXX")
NS_PREFIX=holdfast-test-$$
NAMESPACES=()
PIDS=()
PASS=0 FAIL=0 SKIP=0
SKIPPED=()

cleanup() {
    local ns p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf -- "$TMP"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

pass() {
    PASS=$((PASS + 1))
    printf 'ok    %s\n' "$1"
}
fail() {
    FAIL=$((FAIL + 1))
    printf 'FAIL  %s\n' "$1"
    if [[ -n ${2:-} ]]; then printf '%s\n' "$2" | sed 's/^/      | /' | head -40; fi
}
skip() { # NAME WHY: a part that cannot run here
    if [[ ${HOLDFAST_ALLOW_SKIP:-} != 1 ]]; then
        fail "$1: cannot run: $2 (set HOLDFAST_ALLOW_SKIP=1 to skip it)"
        return
    fi
    SKIP=$((SKIP + 1))
    SKIPPED+=("$1: $2")
    printf 'SKIP  %s (%s)\n' "$1" "$2"
}
check() { # NAME CONDITION-STATUS [DETAIL]
    if [[ $2 == 0 ]]; then pass "$1"; else fail "$1" "${3:-}"; fi
}

# t ARGS...: run holdfast-tune, output in OUT, exit status in RC.
t() {
    RC=0
    OUT=$(timeout 60 "$TUNE" "$@" 2>&1) || RC=$?
}
# tns NS ARGS...: the same inside a network namespace.
tns() {
    local ns=$1
    shift
    RC=0
    OUT=$(timeout 60 ip netns exec "$ns" "$TUNE" "$@" 2>&1) || RC=$?
}
has() { grep -qF -- "$1" <<<"$OUT"; }
snap() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) | sha256sum | cut -c1-16; }
val() { tr -s ' \t' ' ' <"$1" | sed 's/ *$//'; }
# dump DIR: every file with its value as the kernel would read it back (whitespace
# normalised), to compare a fake root with its original.
dump() { (cd "$1" && find . -type f | sort | while IFS= read -r f; do printf '%s=%s\n' "$f" "$(val "$f")"; done); }

# ---------------------------------------------------------------------------------------
# Fake /proc/sys: every key of both profiles with a stock kernel value.
# ---------------------------------------------------------------------------------------
declare -A STOCK=(
    [fs.nr_open]=1048576 [fs.file-max]=2466177 [net.core.somaxconn]=4096
    [net.ipv4.tcp_max_syn_backlog]=2048 [net.ipv4.tcp_syncookies]=1
    [net.ipv4.tcp_synack_retries]=5 [net.core.netdev_max_backlog]=1000
    [net.ipv4.tcp_mem]=$'287901\t383868\t575802' [net.ipv4.tcp_rmem]=$'4096\t131072\t6291456'
    [net.ipv4.tcp_wmem]=$'4096\t16384\t4194304' [net.ipv4.tcp_notsent_lowat]=4294967295
    [net.ipv4.tcp_slow_start_after_idle]=1 [net.ipv4.tcp_keepalive_time]=7200
    [net.ipv4.tcp_keepalive_intvl]=75 [net.ipv4.tcp_keepalive_probes]=9
    [net.ipv4.tcp_retries2]=15 [net.ipv4.tcp_orphan_retries]=0
    [net.ipv4.tcp_max_orphans]=131072 [net.ipv4.tcp_fin_timeout]=60
    [net.ipv4.tcp_max_tw_buckets]=131072 [net.ipv4.tcp_tw_reuse]=2
    [net.ipv4.ip_local_port_range]=$'32768\t60999' [net.ipv4.tcp_mtu_probing]=0
    [net.netfilter.nf_conntrack_max]=262144 [net.ipv4.tcp_timestamps]=1
    [kernel.io_uring_disabled]=0 [vm.max_map_count]=65530
)
make_root() { # DIR
    local k p
    rm -rf -- "$1"
    for k in "${!STOCK[@]}"; do
        p=$1/${k//.//}
        mkdir -p "$(dirname "$p")"
        printf '%s\n' "${STOCK[$k]}" >"$p"
    done
}
profile_keys() { grep -E '^-?[a-z]' "$KIT/profiles/$1.conf" | sed 's/^-//; s/[[:space:]]*=.*//'; }
profile_val() { grep -E "^-?$2[[:space:]]*=" "$KIT/profiles/$1.conf" | sed 's/^[^=]*=[[:space:]]*//; s/[[:space:]]*$//' | tr -s ' '; }

ROOT=$TMP/root
STATE=$TMP/state
export HOLDFAST_SYSCTL_ROOT=$ROOT HOLDFAST_TUNE_STATE=$STATE
export HOLDFAST_ETC_ROOT=$TMP/etc HOLDFAST_SYSFS_ROOT=$TMP/nosys HOLDFAST_PROC_ROOT=$TMP/noproc

echo "== sysctl profiles against a fake /proc/sys"
make_root "$ROOT"
cp -a "$ROOT" "$TMP/root.orig"
ORIG=$(snap "$ROOT")
NKEYS=$(profile_keys gateway | wc -l)

for p in gateway loadgen; do
    bad=""
    while IFS= read -r k; do [[ -n ${STOCK[$k]:-} ]] || bad+="$k "; done < <(profile_keys "$p")
    check "profile $p: every key known to the test's stock table" "$([[ -z $bad ]] && echo 0 || echo 1)" "missing: $bad"
done
# Every setting carries a comment: the line before each key is a comment line.
uncommented=$(awk '/^-?[a-z]/ { if (prev !~ /^#/ && prev !~ /^-?[a-z]/) print FILENAME ":" NR } { prev = $0 }' "$KIT"/profiles/*.conf)
check "profiles: every setting (or group) has a comment right above it" "$([[ -z $uncommented ]] && echo 0 || echo 1)" "$uncommented"

t apply gateway --dry-run
check "dry-run: exit 0 and a diff table" "$([[ $RC == 0 ]] && has "net.core.somaxconn" && has "would change" && echo 0 || echo 1)" "$OUT"
check "dry-run: nothing changed, no state" "$([[ $(snap "$ROOT") == "$ORIG" && ! -e $STATE/sysctl.state ]] && echo 0 || echo 1)"

t apply gateway
rc_ok=$RC
wrong=""
while IFS= read -r k; do
    [[ $(val "$ROOT/${k//.//}") == "$(profile_val gateway "$k")" ]] || wrong+="$k=$(val "$ROOT/${k//.//}") "
done < <(profile_keys gateway)
check "apply: exit 0, every key written" "$([[ $rc_ok == 0 && -z $wrong ]] && echo 0 || echo 1)" "$OUT $wrong"
saved_bad=""
while IFS= read -r line; do
    [[ $line == '#'* || -z $line ]] && continue
    k=${line%% = *} v=${line#* = }
    [[ $v == "$(tr -s '\t' ' ' <<<"${STOCK[$k]}")" ]] || saved_bad+="$k "
done <"$STATE/sysctl.state"
check "apply: state holds the original values" "$([[ -z $saved_bad ]] && echo 0 || echo 1)" "$saved_bad"
check "apply: state holds exactly the changed keys (unchanged tcp_syncookies not saved)" \
    "$(! grep -q '^net.ipv4.tcp_syncookies' "$STATE/sysctl.state" && [[ $(grep -vc '^#' "$STATE/sysctl.state") == $((NKEYS - 1)) ]] && echo 0 || echo 1)" "$(cat "$STATE/sysctl.state")"

t verify gateway
check "verify after apply: 'all $NKEYS settings in force', exit 0" "$([[ $RC == 0 && $(head -1 <<<"$OUT") == "all $NKEYS settings in force" ]] && echo 0 || echo 1)" "$OUT"

APPLIED=$(snap "$ROOT")
cp "$STATE/sysctl.state" "$TMP/state.first"
t apply gateway
check "second apply: nothing changed, saved values unchanged" \
    "$([[ $RC == 0 ]] && has "nothing was changed" && [[ $(snap "$ROOT") == "$APPLIED" ]] && cmp -s "$STATE/sysctl.state" "$TMP/state.first" && echo 0 || echo 1)" "$OUT"

t revert --dry-run
check "revert --dry-run: nothing changed" "$([[ $RC == 0 && $(snap "$ROOT") == "$APPLIED" && -f $STATE/sysctl.state ]] && echo 0 || echo 1)" "$OUT"
t revert
check "revert: exact original values, state removed" \
    "$([[ $RC == 0 && $(dump "$ROOT") == "$(dump "$TMP/root.orig")" && ! -e $STATE/sysctl.state ]] && echo 0 || echo 1)" "$OUT$(diff <(dump "$ROOT") <(dump "$TMP/root.orig") || true)"
t verify gateway
check "verify after revert: exit 1 with a mismatch table" \
    "$([[ $RC == 1 ]] && has "not in force" && grep -qE '^ +setting +current +want' <<<"$OUT" && grep -qE '^ +net.core.somaxconn +4096 +65535' <<<"$OUT" && echo 0 || echo 1)" "$OUT"
t revert
check "revert again: nothing to revert, exit 0" "$([[ $RC == 0 ]] && has "nothing to revert" && echo 0 || echo 1)" "$OUT"

# Capacity keys: a higher host value is in force and never lowered.
echo 100000 >"$ROOT/net/core/somaxconn"
t apply gateway
check "capacity key higher than target: kept, not saved" \
    "$([[ $RC == 0 && $(val "$ROOT/net/core/somaxconn") == 100000 ]] && ! grep -q '^net.core.somaxconn' "$STATE/sysctl.state" && echo 0 || echo 1)" "$OUT"
t verify gateway
check "capacity key higher than target: verify ok" "$([[ $RC == 0 ]] && echo 0 || echo 1)" "$OUT"
# Multi-value keys compare field by field.
printf '4096\t16384\t2097152\n' >"$ROOT/net/ipv4/tcp_rmem"
t verify gateway
check "multi-value key: one differing field is a mismatch" \
    "$([[ $RC == 1 ]] && grep -qE '^ +net.ipv4.tcp_rmem +4096 16384 2097152 +4096 16384 1048576' <<<"$OUT" && echo 0 || echo 1)" "$OUT"
t revert
check "revert restores exactly the original values (after a partial drift)" \
    "$([[ $RC == 0 && $(dump "$ROOT") == "$(dump "$TMP/root.orig" | sed 's#^./net/core/somaxconn=4096$#./net/core/somaxconn=100000#')" ]] && echo 0 || echo 1)" "$OUT"

# Two profiles: the state keeps the value from before the FIRST apply.
make_root "$ROOT"
t apply gateway
t apply loadgen
check "apply gateway then loadgen: saved port range is the original" \
    "$([[ $RC == 0 ]] && grep -qx 'net.ipv4.ip_local_port_range = 32768 60999' "$STATE/sysctl.state" && [[ $(val "$ROOT/net/ipv4/ip_local_port_range") == "1024 65535" ]] && echo 0 || echo 1)" "$OUT"
t verify loadgen
check "verify loadgen after applying it" "$([[ $RC == 0 ]] && echo 0 || echo 1)" "$OUT"
t revert
check "revert after two profiles: exact originals" "$([[ $RC == 0 && $(dump "$ROOT") == "$(dump "$TMP/root.orig")" ]] && echo 0 || echo 1)" "$OUT"

echo "== bad input: clear error, nothing changed"
make_root "$ROOT"
t apply nosuchprofile
check "unknown profile: exit 2, named, nothing changed" \
    "$([[ $RC == 2 ]] && has "unknown profile 'nosuchprofile'" && [[ $(snap "$ROOT") == "$ORIG" && ! -e $STATE/sysctl.state ]] && echo 0 || echo 1)" "$OUT"
t verify nosuchprofile
check "verify unknown profile: exit 2" "$([[ $RC == 2 ]] && echo 0 || echo 1)" "$OUT"

chmod 444 "$ROOT/net/ipv4/tcp_fin_timeout"
t apply gateway
check "read-only key: exit 2, named, nothing written (pre-check before any write)" \
    "$([[ $RC == 2 ]] && grep -q 'net.ipv4.tcp_fin_timeout.*error: not writable' <<<"$OUT" && has "nothing was changed" && [[ $(snap "$ROOT") == "$ORIG" && ! -e $STATE/sysctl.state ]] && echo 0 || echo 1)" "$OUT"
chmod 644 "$ROOT/net/ipv4/tcp_fin_timeout"

rm "$ROOT/net/ipv4/tcp_mtu_probing"
t apply gateway
check "missing key: exit 2, named, nothing written" \
    "$([[ $RC == 2 ]] && grep -q 'net.ipv4.tcp_mtu_probing.*error: no such key' <<<"$OUT" && [[ ! -e $STATE/sysctl.state ]] && [[ $(val "$ROOT/net/core/somaxconn") == 4096 ]] && echo 0 || echo 1)" "$OUT"
make_root "$ROOT"

rm "$ROOT/net/netfilter/nf_conntrack_max"
t apply gateway
t2rc=$RC t2out=$OUT
t verify gateway
check "optional key absent (conntrack not loaded): apply skips it, verify ok" \
    "$([[ $t2rc == 0 && $RC == 0 ]] && grep -q 'nf_conntrack_max.*skip (absent, optional)' <<<"$t2out" && [[ $(head -1 <<<"$OUT") == "all $((NKEYS - 1)) settings in force" ]] && echo 0 || echo 1)" "$t2out$OUT"
t revert
make_root "$ROOT"

printf 'net.core.somaxconn = 65535\nthis line has no equals sign\n' >"$TMP/bad1.conf"
t apply "$TMP/bad1.conf"
check "malformed profile: exit 2 with file:line" "$([[ $RC == 2 ]] && has "bad1.conf:2" && [[ $(snap "$ROOT") == "$ORIG" ]] && echo 0 || echo 1)" "$OUT"
printf 'net.core.somaxconn = 65535\n# again\nnet.core.somaxconn = 1024\n' >"$TMP/bad2.conf"
t apply "$TMP/bad2.conf"
check "duplicate key: exit 2, both lines named" "$([[ $RC == 2 ]] && has "duplicate key net.core.somaxconn (first on line 1)" && echo 0 || echo 1)" "$OUT"
printf 'net.core.somaxconn =\n' >"$TMP/bad3.conf"
t apply "$TMP/bad3.conf"
check "empty value: exit 2" "$([[ $RC == 2 ]] && has "empty value" && echo 0 || echo 1)" "$OUT"
printf 'net/../../etc/passwd = 1\n' >"$TMP/bad4.conf"
t apply "$TMP/bad4.conf"
check "path traversal in a key: rejected" "$([[ $RC == 2 ]] && has "invalid key" && echo 0 || echo 1)" "$OUT"
t frobnicate
check "unknown command: exit 2 with usage" "$([[ $RC == 2 ]] && has "usage: holdfast-tune" && echo 0 || echo 1)" "$OUT"

echo "== limits.d and systemd unit (fake /etc)"
t limits --dry-run
check "limits --dry-run: nothing installed" "$([[ $RC == 0 && ! -e $TMP/etc/security/limits.d/holdfast.conf ]] && has "will create" && echo 0 || echo 1)" "$OUT"
t limits
check "limits: installed" "$([[ $RC == 0 ]] && cmp -s "$KIT/limits.d/holdfast.conf" "$TMP/etc/security/limits.d/holdfast.conf" && echo 0 || echo 1)" "$OUT"
t limits-verify
check "limits-verify: ok" "$([[ $RC == 0 ]] && echo 0 || echo 1)" "$OUT"
t limits
check "limits again: nothing changed" "$([[ $RC == 0 ]] && has "already matches" && echo 0 || echo 1)" "$OUT"
t limits-revert
check "limits-revert: file removed (there was none before)" "$([[ $RC == 0 && ! -e $TMP/etc/security/limits.d/holdfast.conf ]] && echo 0 || echo 1)" "$OUT"
t limits-verify
check "limits-verify after revert: exit 1" "$([[ $RC == 1 ]] && echo 0 || echo 1)" "$OUT"
mkdir -p "$TMP/etc/systemd/system"
echo "# operator's own unit" >"$TMP/etc/systemd/system/holdfast.service"
t install-unit --dry-run
check "install-unit --dry-run: shows a diff, nothing changed" "$([[ $RC == 0 ]] && has "will replace" && [[ $(cat "$TMP/etc/systemd/system/holdfast.service") == "# operator's own unit" ]] && echo 0 || echo 1)" "$OUT"
t install-unit
t2rc=$RC
t unit-verify
check "install-unit + unit-verify" "$([[ $t2rc == 0 && $RC == 0 ]] && echo 0 || echo 1)" "$OUT"
t unit-revert
check "unit-revert: the operator's previous file is back" "$([[ $RC == 0 && $(cat "$TMP/etc/systemd/system/holdfast.service") == "# operator's own unit" ]] && echo 0 || echo 1)" "$OUT"
if command -v systemd-analyze >/dev/null 2>&1; then
    out=$(timeout 30 systemd-analyze verify "$KIT/systemd/holdfast.service" 2>&1 || true)
    rest=$(grep -v -e 'is not executable' -e 'No such file or directory' <<<"$out" || true)
    check "systemd-analyze verify holdfast.service (only the absent binary may be reported)" "$([[ -z $rest ]] && echo 0 || echo 1)" "$out"
else
    skip "systemd-analyze verify" "systemd-analyze not installed"
fi
grace=$(awk -F= '$1 == "TimeoutStopSec" { print $2 }' "$KIT/systemd/holdfast.service")
check "unit: TimeoutStopSec ($grace s) above the default drain grace (10 s)" "$([[ $grace =~ ^[0-9]+$ ]] && ((grace > 10)) && echo 0 || echo 1)"

echo "== nftables notrack"
HOLDFAST_NFT=$TMP/no-such-nft t notrack
check "notrack without nft: exit 3, says so" "$([[ $RC == 3 ]] && has "nft not found" && has "install the nftables package" && echo 0 || echo 1)" "$OUT"
HOLDFAST_NFT=$TMP/no-such-nft t notrack --dry-run
check "notrack --dry-run without nft: prints the ruleset, exit 0" "$([[ $RC == 0 ]] && has "tcp dport \$holdfast_port notrack" && has "define holdfast_port = 7443" && echo 0 || echo 1)" "$OUT"
t notrack --port 99999 --dry-run
check "notrack bad port: exit 2" "$([[ $RC == 2 ]] && echo 0 || echo 1)" "$OUT"

NETNS_OK=0
NETNS_WHY=""
if [[ $EUID -ne 0 ]]; then
    NETNS_WHY="not root"
elif ! command -v ip >/dev/null 2>&1; then
    NETNS_WHY="ip (iproute2) not installed"
elif ! timeout 10 ip netns add "$NS_PREFIX-probe" 2>/dev/null; then
    NETNS_WHY="cannot create a network namespace here"
else
    timeout 10 ip netns del "$NS_PREFIX-probe" || true
    NETNS_OK=1
fi
newns() { # NAME -> creates and registers for cleanup
    timeout 10 ip netns add "$1"
    NAMESPACES+=("$1")
    timeout 10 ip -n "$1" link set lo up
}

if ((NETNS_OK)) && command -v nft >/dev/null 2>&1; then
    NS=$NS_PREFIX-nft
    newns "$NS"
    export HOLDFAST_TUNE_STATE=$TMP/state-nft
    tns "$NS" notrack --dry-run
    check "netns: notrack --dry-run checks the ruleset, loads nothing" \
        "$([[ $RC == 0 ]] && has "checked by nft -c" && ! ip netns exec "$NS" nft list table inet holdfast_notrack >/dev/null 2>&1 && echo 0 || echo 1)" "$OUT"
    tns "$NS" notrack
    t1=$RC
    tns "$NS" notrack-verify
    check "netns: notrack loads, notrack-verify ok" "$([[ $t1 == 0 && $RC == 0 ]] && echo 0 || echo 1)" "$OUT"
    tns "$NS" notrack
    check "netns: notrack again: nothing changed" "$([[ $RC == 0 ]] && has "already in force" && echo 0 || echo 1)" "$OUT"
    # Proof: with a conntrack user in the namespace, a connection to the gateway port
    # creates no conntrack entry while notrack is loaded, and one after revert.
    if command -v python3 >/dev/null 2>&1 && [[ -d /proc/sys/net/netfilter ]] &&
        timeout 10 ip netns exec "$NS" nft -f - <<<'table inet holdfast_test_ct { chain in { type filter hook input priority 0; ct state new counter; }; }' 2>/dev/null; then
        connect_once() {
            timeout 20 ip netns exec "$NS" python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7443)); s.listen(8)
c = socket.create_connection(("127.0.0.1", 7443), timeout=5); a, _ = s.accept()
c.sendall(b"x"); assert a.recv(1) == b"x"; c.close(); a.close(); s.close()'
        }
        ctcount() { ip netns exec "$NS" cat /proc/sys/net/netfilter/nf_conntrack_count; }
        c0=$(ctcount)
        connect_once
        c1=$(ctcount)
        check "netns: a connection to port 7443 creates no conntrack entry with notrack ($c0 -> $c1)" "$([[ $c1 == "$c0" ]] && echo 0 || echo 1)"
        tns "$NS" notrack-revert
        t1=$RC
        connect_once
        c2=$(ctcount)
        check "netns: after notrack-revert the same connection is tracked ($c1 -> $c2)" "$([[ $t1 == 0 ]] && ((c2 > c1)) && echo 0 || echo 1)" "$OUT"
    else
        skip "notrack conntrack proof" "python3 or conntrack not available in a namespace"
        tns "$NS" notrack-revert
    fi
    check "netns: notrack-revert removes the table" "$([[ $RC == 0 ]] && ! ip netns exec "$NS" nft list table inet holdfast_notrack >/dev/null 2>&1 && echo 0 || echo 1)" "$OUT"
    tns "$NS" notrack-verify
    check "netns: notrack-verify after revert: exit 1" "$([[ $RC == 1 ]] && echo 0 || echo 1)" "$OUT"
    export HOLDFAST_TUNE_STATE=$STATE
else
    skip "notrack in a network namespace" "${NETNS_WHY:-nft (nftables) not installed}"
fi

echo "== real kernel: per-namespace sysctls inside a network namespace"
if ((NETNS_OK)); then
    NS=$NS_PREFIX-sysctl
    newns "$NS"
    # Only keys that are per network namespace: writing them cannot touch the host.
    cat >"$TMP/netns.conf" <<'EOF'
# test profile: per-namespace keys only
net.ipv4.tcp_fin_timeout = 15
net.ipv4.tcp_keepalive_time = 300
net.core.somaxconn = 65535
net.ipv4.tcp_rmem = 4096 16384 1048576
net.ipv4.ip_local_port_range = 10240 65535
EOF
    host_before=$(cat /proc/sys/net/ipv4/tcp_fin_timeout /proc/sys/net/core/somaxconn /proc/sys/net/ipv4/ip_local_port_range)
    ns_before=$(ip netns exec "$NS" cat /proc/sys/net/ipv4/tcp_fin_timeout /proc/sys/net/core/somaxconn /proc/sys/net/ipv4/tcp_rmem /proc/sys/net/ipv4/ip_local_port_range /proc/sys/net/ipv4/tcp_keepalive_time)
    export HOLDFAST_SYSCTL_ROOT=/proc/sys HOLDFAST_TUNE_STATE=$TMP/state-netns
    tns "$NS" apply "$TMP/netns.conf"
    t1=$RC
    tns "$NS" verify "$TMP/netns.conf"
    check "netns: apply + verify against the real /proc/sys" "$([[ $t1 == 0 && $RC == 0 ]] && has "all 5 settings in force" && echo 0 || echo 1)" "$OUT"
    tns "$NS" apply "$TMP/netns.conf"
    check "netns: second apply changes nothing" "$([[ $RC == 0 ]] && has "nothing was changed" && echo 0 || echo 1)" "$OUT"
    tns "$NS" revert
    ns_after=$(ip netns exec "$NS" cat /proc/sys/net/ipv4/tcp_fin_timeout /proc/sys/net/core/somaxconn /proc/sys/net/ipv4/tcp_rmem /proc/sys/net/ipv4/ip_local_port_range /proc/sys/net/ipv4/tcp_keepalive_time)
    check "netns: revert restores the namespace's original values" "$([[ $RC == 0 && $ns_after == "$ns_before" ]] && echo 0 || echo 1)" "$OUT"
    # A value the kernel rejects after another was written: the written one is put back.
    printf 'net.ipv4.tcp_fin_timeout = 15\nnet.ipv4.ip_local_port_range = 70000 10\n' >"$TMP/reject.conf"
    tns "$NS" apply "$TMP/reject.conf"
    ns_after=$(ip netns exec "$NS" cat /proc/sys/net/ipv4/tcp_fin_timeout /proc/sys/net/core/somaxconn /proc/sys/net/ipv4/tcp_rmem /proc/sys/net/ipv4/ip_local_port_range /proc/sys/net/ipv4/tcp_keepalive_time)
    check "netns: kernel rejects a value mid-apply: exit 4, earlier writes rolled back, no state" \
        "$([[ $RC == 4 && $ns_after == "$ns_before" && ! -e $TMP/state-netns/sysctl.state ]] && has "put back" && echo 0 || echo 1)" "$OUT"
    host_after=$(cat /proc/sys/net/ipv4/tcp_fin_timeout /proc/sys/net/core/somaxconn /proc/sys/net/ipv4/ip_local_port_range)
    check "host sysctls untouched by the namespace tests" "$([[ $host_after == "$host_before" ]] && echo 0 || echo 1)"
    export HOLDFAST_SYSCTL_ROOT=$ROOT HOLDFAST_TUNE_STATE=$STATE
else
    skip "real-kernel sysctl apply in a network namespace" "$NETNS_WHY"
fi

echo "== NIC"
t nic nosuch0 --cores 2
check "nic: missing interface: exit 2, clear error, nothing changed" \
    "$([[ $RC == 2 ]] && has "no such interface: nosuch0" && has "nothing was changed" && [[ -z $(find "$STATE" -name 'nic-*' 2>/dev/null) ]] && echo 0 || echo 1)" "$OUT"
t nic-revert nosuch0
check "nic-revert: missing interface: exit 2" "$([[ $RC == 2 ]] && echo 0 || echo 1)" "$OUT"

# A physical multi-queue NIC, emulated: fake sysfs, fake /proc (interrupts, irq/N) and
# a fake ethtool. Covers hardware RSS: channels, IRQ affinity, rings, coalescing, XPS.
FN=$TMP/fakenic
export FAKE_NIC_DIR=$FN
"$FAKE_ETHTOOL" --init
export HOLDFAST_SYSFS_ROOT=$FN/sys HOLDFAST_PROC_ROOT=$FN/proc HOLDFAST_ETHTOOL=$FAKE_ETHTOOL HOLDFAST_TUNE_STATE=$TMP/state-fake
irqs() { for i in 59 60 61 62 63 64 65 66 67; do printf '%s=%s ' "$i" "$(cat "$FN/proc/irq/$i/smp_affinity_list" 2>/dev/null || echo -)"; done; }
before=$(snap "$FN")
t nic fake0 --cores 4 --dry-run
check "fake NIC: dry-run shows channels, rings, coalescing, IRQ rows; nothing changed" \
    "$([[ $RC == 0 ]] && has "channels combined" && has "ring rx" && has "coalesce adaptive-rx" && grep -q 'irq 60 fake0-TxRx-0 (queue 0) *0-7 *0 *change' <<<"$OUT" && ! has "irq 59" && ! has "irq 45" && [[ $(snap "$FN") == "$before" ]] && echo 0 || echo 1)" "$OUT"
t nic fake0 --cores 4
a_rc=$RC a_out=$OUT
expect="59=0-7 60=0 61=1 62=2 63=3 64=0-7 65=0-7 66=0-7 67=0-7 "
check "fake NIC: apply: 4 channels, queue i's IRQ on CPU i, rings 4096, adaptive coalescing" \
    "$([[ $a_rc == 0 && $(irqs) == "$expect" ]] && grep -q '^combined=4' "$FN/ethtool.state" && grep -q '^rx=4096' "$FN/ethtool.state" && grep -q '^arx=on' "$FN/ethtool.state" && echo 0 || echo 1)" "$a_out $(irqs)"
check "fake NIC: XPS tx-i -> CPU i; RPS left alone (hardware RSS)" \
    "$([[ $(cat "$FN/sys/class/net/fake0/queues/tx-2/xps_cpus") == 4 && $(cat "$FN/sys/class/net/fake0/queues/rx-0/rps_cpus") == 00 ]] && grep -q 'rps/rfs.*skip: hardware RSS' <<<"$a_out" && echo 0 || echo 1)" "$a_out"
t nic-verify fake0
check "fake NIC: nic-verify (cores from the saved state): all in force" "$([[ $RC == 0 ]] && has "NIC settings in force on fake0" && echo 0 || echo 1)" "$OUT"
st=$(cat "$TMP/state-fake/nic-fake0.state")
applied=$(snap "$FN")
t nic fake0 --cores 4
check "fake NIC: second apply: nothing changed, state unchanged" \
    "$([[ $RC == 0 ]] && has "nothing was changed" && [[ $(snap "$FN") == "$applied" && $(cat "$TMP/state-fake/nic-fake0.state") == "$st" ]] && echo 0 || echo 1)" "$OUT"
t nic-revert fake0
check "fake NIC: nic-revert: channels, rings, coalescing and IRQ affinity as before" \
    "$([[ $RC == 0 && $(snap "$FN") == "$before" && ! -e $TMP/state-fake/nic-fake0.state ]] && echo 0 || echo 1)" "$OUT"
t nic-verify fake0 --cores 4
check "fake NIC: nic-verify after revert: exit 1 with a table" "$([[ $RC == 1 ]] && has "not in force" && has "channels combined" && echo 0 || echo 1)" "$OUT"
t nic fake0 --cores 2 --cpus 2-3
check "fake NIC: --cpus 2-3: queue 0 -> CPU 2, queue 1 -> CPU 3" \
    "$([[ $RC == 0 && $(cat "$FN/proc/irq/60/smp_affinity_list") == 2 && $(cat "$FN/proc/irq/61/smp_affinity_list") == 3 ]] && echo 0 || echo 1)" "$OUT"
t nic-revert fake0
t nic fake0 --cores 4 --cpus 6-9
check "fake NIC: offline CPU in --cpus: exit 2, nothing changed" "$([[ $RC == 2 && $(snap "$FN") == "$before" ]] && has "not online" && echo 0 || echo 1)" "$OUT"
FAKE_ETHTOOL_FAIL=-G t nic fake0 --cores 4
check "fake NIC: ethtool fails mid-apply: exit 4, the channel change undone, no state" \
    "$([[ $RC == 4 && $(snap "$FN") == "$before" && ! -e $TMP/state-fake/nic-fake0.state ]] && has "undone" && echo 0 || echo 1)" "$OUT"
HOLDFAST_ETHTOOL=$TMP/no-such-ethtool t nic fake0 --cores 4
check "nic without ethtool: exit 3, says so" "$([[ $RC == 3 ]] && has "ethtool not found" && echo 0 || echo 1)" "$OUT"
export HOLDFAST_SYSFS_ROOT=$TMP/nosys HOLDFAST_PROC_ROOT=$TMP/noproc HOLDFAST_TUNE_STATE=$STATE
unset HOLDFAST_ETHTOOL

# A real NIC driver in a network namespace: veth with 4 queues (no IRQs: software RPS/RFS).
if ((NETNS_OK)) && command -v ethtool >/dev/null 2>&1; then
    NS=$NS_PREFIX-nic
    newns "$NS"
    if ! timeout 10 ip -n "$NS" link add name hft0 numtxqueues 4 numrxqueues 4 type veth peer name hft1 numtxqueues 4 numrxqueues 4 2>/dev/null; then
        skip "veth NIC in a network namespace" "cannot create a multi-queue veth pair"
    elif ! timeout 10 ip netns exec "$NS" ethtool -l hft0 >/dev/null 2>&1; then
        skip "veth NIC in a network namespace" "this kernel's veth does not support ethtool -l"
    else
        ncpu=$(getconf _NPROCESSORS_ONLN)
        cores=2
        ((ncpu >= 2)) || cores=1
        # rps_sock_flow_entries exists only in the initial namespace: give the tool a fake one.
        mkdir -p "$TMP/nicroot/net/core"
        echo 0 >"$TMP/nicroot/net/core/rps_sock_flow_entries"
        export HOLDFAST_SYSCTL_ROOT=$TMP/nicroot HOLDFAST_TUNE_STATE=$TMP/state-veth HOLDFAST_SYSFS_ROOT=/sys HOLDFAST_PROC_ROOT=/proc
        vsnap() { timeout 10 ip netns exec "$NS" sh -c 'ethtool -l hft0 | tail -4; ethtool -k hft0 | grep generic-receive; cat /sys/class/net/hft0/queues/*/rps_cpus /sys/class/net/hft0/queues/*/rps_flow_cnt /sys/class/net/hft0/queues/*/xps_cpus'; cat "$TMP/nicroot/net/core/rps_sock_flow_entries"; }
        v0=$(vsnap)
        tns "$NS" nic hft0 --cores "$cores" --dry-run
        check "veth: nic --dry-run: nothing changed" "$([[ $RC == 0 && $(vsnap) == "$v0" ]] && has "channels rx" && echo 0 || echo 1)" "$OUT"
        tns "$NS" nic hft0 --cores "$cores"
        a_rc=$RC a_out=$OUT
        rx=$(ip netns exec "$NS" ethtool -l hft0 | awk '/^Current/ { c = 1 } c && /^RX:/ { print $2 }')
        check "veth: nic: $cores rx queue(s) via ethtool -L, RPS/RFS set" \
            "$([[ $a_rc == 0 && $rx == "$cores" ]] && [[ $(ip netns exec "$NS" cat /sys/class/net/hft0/queues/rx-0/rps_flow_cnt) != 0 && $(cat "$TMP/nicroot/net/core/rps_sock_flow_entries") == 131072 ]] && echo 0 || echo 1)" "$a_out"
        tns "$NS" nic-verify hft0
        check "veth: nic-verify: all in force" "$([[ $RC == 0 ]] && echo 0 || echo 1)" "$OUT"
        v1=$(vsnap)
        st=$(cat "$TMP/state-veth/nic-hft0.state")
        tns "$NS" nic hft0 --cores "$cores"
        check "veth: second nic: nothing changed, state unchanged" \
            "$([[ $RC == 0 && $(vsnap) == "$v1" && $(cat "$TMP/state-veth/nic-hft0.state") == "$st" ]] && has "nothing was changed" && echo 0 || echo 1)" "$OUT"
        tns "$NS" nic-revert hft0
        check "veth: nic-revert: queues, GRO, RPS/RFS/XPS as before" "$([[ $RC == 0 && $(vsnap) == "$v0" ]] && echo 0 || echo 1)" "$OUT$(diff <(echo "$v0") <(vsnap))"
        tns "$NS" nic-verify hft0 --cores "$cores"
        check "veth: nic-verify after revert: exit 1 with a table" "$([[ $RC == 1 ]] && has "not in force" && echo 0 || echo 1)" "$OUT"
    fi
    export HOLDFAST_SYSCTL_ROOT=$ROOT HOLDFAST_TUNE_STATE=$STATE HOLDFAST_SYSFS_ROOT=$TMP/nosys HOLDFAST_PROC_ROOT=$TMP/noproc
else
    skip "veth NIC in a network namespace" "${NETNS_WHY:-ethtool not installed}"
fi

echo "== shellcheck"
if command -v shellcheck >/dev/null 2>&1; then
    out=$(timeout 120 shellcheck -x "$TUNE" "$HERE/run.sh" "$HERE/fake-ethtool" 2>&1) && rc=0 || rc=$?
    check "shellcheck: holdfast-tune, tests/run.sh, tests/fake-ethtool" "$rc" "$out"
else
    skip "shellcheck" "shellcheck not installed (CI: apt-get install shellcheck)"
fi

echo
if ((SKIP)); then
    echo "$SKIP skipped:"
    printf '  %s\n' "${SKIPPED[@]}"
fi
echo "$PASS passed, $FAIL failed, $SKIP skipped"
((FAIL == 0))
