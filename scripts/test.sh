#!/usr/bin/env bash
# The project's one test command: every unit, property and integration test of the
# workspace. The integration tests start the gateway and the reference worker as real
# processes, so every binary is built first; `cargo test` alone builds only the binaries
# of the package under test.
#
# Extra arguments go to `cargo test`; naming packages narrows the run, e.g.
#   scripts/test.sh -p holdfast --test bad_input
#   scripts/test.sh -- --nocapture
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# `--workspace` would override `-p`, so it is only added when no package is named.
scope=(--workspace)
for arg in "$@"; do
    case "$arg" in
        --) break ;;
        -p | --package | -p?* | --package=*) scope=() ;;
    esac
done

cargo build --workspace --bins
cargo test ${scope[@]+"${scope[@]}"} "$@"

# The whole suite (no package named) also runs the kernel-tuning kit's tests and the
# dashboards check (which skips itself when Prometheus is not installed).
if [ "${#scope[@]}" -gt 0 ]; then
    kernel-tuning/tests/run.sh
    scripts/check-dashboards.sh
fi
