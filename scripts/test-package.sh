#!/usr/bin/env bash
# Tests the Debian package (scripts/test.sh runs this): builds it from the debug build
# (scripts/package.sh --debug), unpacks it into a scratch root with `dpkg -x` (nothing is
# installed on this machine), checks its contents, conffiles and maintainer scripts,
# verifies its systemd units with `systemd-analyze verify`, and starts the unpacked gateway
# with the unpacked echo worker, reading the unpacked gateway.toml, for a short echo by the
# unpacked load generator. Without systemd-analyze that check fails, unless
# HOLDFAST_ALLOW_SKIP=1 counts it as skipped. The last line is `N passed, N failed,
# N skipped`; the exit status is non-zero on any failure. Bounded: about a minute.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
script=test-package
work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-pkgtest.XXXXXX")
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
install_cleanup 5

passed=0 failed=0 skipped=0
pass() {
    passed=$((passed + 1))
    echo "ok    $1"
}
fail() {
    failed=$((failed + 1))
    echo "FAIL  $1"
    if [[ -n ${2:-} ]]; then printf '%s\n' "$2" | sed 's/^/      | /' | head -30; fi
}
skip() {
    if [[ ${HOLDFAST_ALLOW_SKIP:-} != 1 ]]; then
        fail "$1: cannot run: $2 (set HOLDFAST_ALLOW_SKIP=1 to skip it)"
        return
    fi
    skipped=$((skipped + 1))
    echo "SKIP  $1 ($2)"
}
check() { # NAME STATUS [DETAIL]
    if [[ $2 == 0 ]]; then pass "$1"; else fail "$1" "${3:-}"; fi
}
finish() {
    echo "$passed passed, $failed failed, $skipped skipped"
    ((failed == 0))
    exit
}
ok() { "$@" >/dev/null 2>&1 && echo 0 || echo 1; }

# ---- build and unpack ----------------------------------------------------------------

if ! deb=$(timeout 600 scripts/package.sh --debug 2>"$work/package.err" | tail -n 1) || [[ ! -f $deb ]]; then
    fail "scripts/package.sh --debug builds the package" "$(tail -n 20 "$work/package.err")"
    finish
fi
pass "scripts/package.sh --debug builds $(basename "$deb")"
version=$("$(target_dir)/debug/holdfast" --version | awk '{ print $2 }')
check "named holdfast_VERSION_ARCH.deb under the target dir" \
    "$(ok test "$deb" = "$(target_dir)/debian/holdfast_${version}_$(dpkg --print-architecture).deb")" "$deb"

root=$work/root
if ! out=$(dpkg -x "$deb" "$root" 2>&1); then
    fail "dpkg -x unpacks it into a scratch root" "$out"
    finish
fi
pass "dpkg -x unpacks it into a scratch root"
dpkg-deb -e "$deb" "$work/control"
info=$(dpkg-deb --info "$deb")
check "control: package holdfast, version $version" \
    "$(ok grep -qx " Version: $version" <<<"$info")" "$info"

missing=()
for f in usr/bin/holdfast usr/bin/holdfast-worker usr/bin/holdfast-bench usr/bin/holdfast-tune \
    lib/systemd/system/holdfast.service lib/systemd/system/holdfast-worker@.service \
    etc/holdfast/gateway.toml etc/holdfast/worker-nats.env etc/security/limits.d/holdfast.conf \
    usr/lib/sysctl.d/60-holdfast.conf usr/share/man/man1/holdfast.1.gz \
    usr/share/man/man1/holdfast-run.1.gz usr/share/man/man1/holdfast-worker.1.gz \
    usr/share/man/man1/holdfast-bench.1.gz usr/share/bash-completion/completions/holdfast \
    usr/share/zsh/vendor-completions/_holdfast usr/share/fish/vendor_completions.d/holdfast.fish; do
    [[ -e $root/$f ]] || missing+=("$f")
done
check "contents: binaries, units, config, tuning profile, man pages, completions" \
    "$(ok test "${#missing[@]}" -eq 0)" "missing: ${missing[*]}"
check "/etc files are conffiles" \
    "$(ok grep -qx /etc/holdfast/gateway.toml "$work/control/conffiles")" "$(cat "$work/control/conffiles")"
check "postinst creates the holdfast user" "$(ok grep -q 'useradd --system' "$work/control/postinst")"
check "sysctl.d and limits.d files are the kernel-tuning profile" \
    "$(ok sh -c "cmp -s kernel-tuning/profiles/gateway.conf '$root/usr/lib/sysctl.d/60-holdfast.conf' &&
        cmp -s kernel-tuning/limits.d/holdfast.conf '$root/etc/security/limits.d/holdfast.conf'")"
check "man page renders (holdfast-run.1)" \
    "$(ok sh -c "zcat '$root/usr/share/man/man1/holdfast-run.1.gz' | grep -q '^\.TH holdfast-run 1' &&
        zcat '$root/usr/share/man/man1/holdfast-run.1.gz' | grep -q 'listen'")"
out=$("$root/usr/bin/holdfast-tune" verify gateway 2>&1)
rc=$?
check "holdfast-tune runs from the package (verify gateway: exit 0 or 1, not a missing kit)" \
    "$(ok test "$rc" -le 1)" "$out"

# ---- the units -----------------------------------------------------------------------

unit=$root/lib/systemd/system/holdfast.service
hardening=()
for want in '^User=holdfast$' '^NoNewPrivileges=yes$' '^CapabilityBoundingSet=CAP_NET_BIND_SERVICE$' \
    '^ProtectSystem=strict$' '^LimitNOFILE=1048576$' '^ExecStart=/usr/bin/holdfast run --config /etc/holdfast/gateway.toml$'; do
    grep -q "$want" "$unit" || hardening+=("$want")
done
check "holdfast.service: its user, no new privileges, one capability, strict, LimitNOFILE of the profile" \
    "$(ok test "${#hardening[@]}" -eq 0)" "missing: ${hardening[*]}"
nofile=$(awk '$3 == "nofile" { print $4; exit }' kernel-tuning/limits.d/holdfast.conf)
check "LimitNOFILE ($nofile) is the tuning profile's nofile" \
    "$(ok grep -qx "LimitNOFILE=$nofile" "$unit")"
check "holdfast-worker@.service: its user, no capabilities, strict" \
    "$(ok sh -c "grep -qx 'User=holdfast' '$root/lib/systemd/system/holdfast-worker@.service' &&
        grep -qx 'CapabilityBoundingSet=' '$root/lib/systemd/system/holdfast-worker@.service' &&
        grep -qx 'ProtectSystem=strict' '$root/lib/systemd/system/holdfast-worker@.service'")"
if command -v systemd-analyze >/dev/null; then
    mkdir -p "$work/units"
    cp "$unit" "$work/units/"
    for kind in echo nats; do
        cp "$root/lib/systemd/system/holdfast-worker@.service" "$work/units/holdfast-worker@$kind.service"
    done
    out=$(cd "$work/units" && timeout 60 systemd-analyze verify --man=no ./*.service 2>&1)
    # The binaries are in the scratch root, not in /usr/bin here.
    rest=$(grep -v -e 'is not executable: No such file or directory' <<<"$out" || true)
    check "systemd-analyze verify: holdfast.service, holdfast-worker@echo/@nats (only the absent binaries may be reported)" \
        "$(ok test -z "$rest")" "$out"
else
    skip "systemd-analyze verify of the units" "systemd-analyze not installed (apt-get install systemd)"
fi

# ---- the unpacked binaries echo -------------------------------------------------------

ubin=$root/usr/bin
if ! "$ubin/holdfast-bench" gen-cert --out "$work/pki" >"$work/gen-cert.log" 2>&1; then
    fail "the packaged holdfast-bench gen-cert" "$(cat "$work/gen-cert.log")"
    finish
fi
sock=$work/echo.sock
spawn worker "the packaged holdfast-worker" "holdfast-worker: listening on" 20 \
    "$ubin/holdfast-worker" echo --socket "$sock"
pass "the packaged holdfast-worker echo listens"
spawn gateway "the packaged holdfast" "holdfast ready " 30 \
    "$ubin/holdfast" run --config "$root/etc/holdfast/gateway.toml" --listen 127.0.0.1:0 \
    --admin 127.0.0.1:0 --cores 1 --max-conns-per-core 1000 \
    --cert "$work/pki/cert.pem" --key "$work/pki/key.pem" --worker "$sock"
pass "the packaged holdfast starts with the packaged gateway.toml"
listen=$(field "$spawned_line" listen)
if timeout 60 "$ubin/holdfast-bench" echo --target "$listen" --ca "$work/pki/ca.pem" --conns 2 \
    --size 64 --rate 50 --duration 1 --json "$work/echo.json" >"$work/echo.log" 2>&1; then
    pass "the packaged holdfast-bench echoes through the gateway and the worker"
else
    fail "the packaged holdfast-bench echoes through the gateway and the worker" "$(cat "$work/echo.log")"
fi

finish
