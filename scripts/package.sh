#!/usr/bin/env bash
# Builds the Debian package: $CARGO_TARGET_DIR/debian/holdfast_VERSION_ARCH.deb (target/
# by default), and prints its path as the last line.
#
#   scripts/package.sh            release build (what to install on a box)
#   scripts/package.sh --debug    the debug build (quicker; scripts/test-package.sh uses it)
#
# The package is staged as a tree and built with `dpkg-deb --build` (no cargo-deb, no
# debhelper): binaries in /usr/bin (holdfast, holdfast-worker, holdfast-bench, and
# holdfast-tune, a wrapper of the kit in /usr/share/holdfast/kernel-tuning), the systemd
# units of the gateway and of a worker template (holdfast-worker@echo, @nats), the
# commented /etc/holdfast/gateway.toml and the workers' env files as conffiles, the
# tuning profile as /usr/lib/sysctl.d/60-holdfast.conf and
# /etc/security/limits.d/holdfast.conf, man pages and bash/zsh/fish completions written
# by each binary's hidden `generate-docs`. postinst creates the holdfast user.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
script=package
work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-package.XXXXXX")
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
install_cleanup 1

profile=release
cargo_profile=(--release)
case "${1:-}" in
    "") ;;
    --debug) profile=debug cargo_profile=() ;;
    *) die "usage: scripts/package.sh [--debug]" ;;
esac
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg)"

say "cargo build ${cargo_profile[*]} (holdfast, holdfast-worker, holdfast-bench)" >&2
cargo build ${cargo_profile[@]+"${cargo_profile[@]}"} -p holdfast -p holdfast-worker -p holdfast-bench --bins >&2
bin=$(target_dir)/$profile
version=$("$bin/holdfast" --version | awk '{ print $2 }')
arch=$(dpkg --print-architecture)
[[ -n $version ]] || die "cannot read the version from $bin/holdfast --version"
name=holdfast_${version}_$arch
out=$(target_dir)/debian
root=$work/$name
say "staging $name" >&2

# ---- files -------------------------------------------------------------------------------

install -d "$root/usr/bin" "$root/usr/share/holdfast" "$root/usr/share/doc/holdfast" \
    "$root/lib/systemd/system" "$root/etc/holdfast" "$root/etc/security/limits.d" \
    "$root/usr/lib/sysctl.d" "$root/usr/share/man/man1" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d" "$root/DEBIAN"
for b in holdfast holdfast-worker holdfast-bench; do
    install -m 0755 "$bin/$b" "$root/usr/bin/$b"
    # Debug info stays in the build tree; the package ships stripped binaries.
    if command -v strip >/dev/null; then strip --strip-debug "$root/usr/bin/$b"; fi
done

# The kernel-tuning kit finds its profiles next to itself: it lives in /usr/share, and
# /usr/bin/holdfast-tune calls it there (relative to itself, so a scratch root works).
kit=$root/usr/share/holdfast/kernel-tuning
install -d "$kit"
cp -r kernel-tuning/holdfast-tune kernel-tuning/profiles kernel-tuning/limits.d \
    kernel-tuning/systemd kernel-tuning/nftables kernel-tuning/README.md "$kit/"
cat >"$root/usr/bin/holdfast-tune" <<'EOF'
#!/bin/sh
# The holdfast kernel-tuning kit (sysctl profiles, limits, NIC/IRQ, nftables notrack).
exec "$(dirname "$(readlink -f "$0")")/../share/holdfast/kernel-tuning/holdfast-tune" "$@"
EOF
chmod 0755 "$root/usr/bin/holdfast-tune"

# The gateway unit: the kit's unit (one source for both) with the package's paths.
{
    echo "# holdfast gateway service, from the holdfast package. Put a certificate in"
    echo "# /etc/holdfast (see gateway.toml there), start a worker, then"
    echo "#   systemctl enable --now holdfast-worker@echo holdfast"
    echo "# Override settings with \`systemctl edit holdfast\`, not by editing this file."
    echo
    sed -e '1,/^$/d' \
        -e 's|/usr/local/bin/|/usr/bin/|g' \
        -e 's|^Documentation=.*|Documentation=man:holdfast(1) man:holdfast-run(1) file:///usr/share/doc/holdfast/README.md|' \
        -e 's|^ProtectSystem=full|ProtectSystem=strict|' \
        kernel-tuning/systemd/holdfast.service
} >"$root/lib/systemd/system/holdfast.service"
install -m 0644 packaging/debian/holdfast-worker@.service "$root/lib/systemd/system/"

install -m 0640 packaging/debian/gateway.toml "$root/etc/holdfast/gateway.toml"
install -m 0640 packaging/debian/worker-echo.env "$root/etc/holdfast/worker-echo.env"
install -m 0640 packaging/debian/worker-nats.env "$root/etc/holdfast/worker-nats.env"
install -m 0644 kernel-tuning/profiles/gateway.conf "$root/usr/lib/sysctl.d/60-holdfast.conf"
install -m 0644 kernel-tuning/limits.d/holdfast.conf "$root/etc/security/limits.d/holdfast.conf"
install -m 0644 README.md ARCHITECTURE.md "$root/usr/share/doc/holdfast/"
printf 'holdfast\nLicense: Apache-2.0\n' >"$root/usr/share/doc/holdfast/copyright"

for b in holdfast holdfast-worker holdfast-bench; do
    "$bin/$b" generate-docs "$work/docs" >/dev/null
done
for page in "$work"/docs/man/*.1; do
    gzip -9n -c -- "$page" >"$root/usr/share/man/man1/${page##*/}.gz"
done
for b in holdfast holdfast-worker holdfast-bench; do
    install -m 0644 "$work/docs/completions/$b.bash" "$root/usr/share/bash-completion/completions/$b"
    install -m 0644 "$work/docs/completions/_$b" "$root/usr/share/zsh/vendor-completions/_$b"
    install -m 0644 "$work/docs/completions/$b.fish" "$root/usr/share/fish/vendor_completions.d/$b.fish"
done

# ---- control -----------------------------------------------------------------------------

(cd "$root" && find etc -type f | sort | sed 's|^|/|') >"$root/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/postrm "$root/DEBIAN/"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@DEPENDS@/libc6, libgcc-s1, passwd/" \
    packaging/debian/control.in >"$root/DEBIAN/control"

mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz -z1 --build "$root" "$out/$name.deb" >&2
echo "$out/$name.deb"
