#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds once, runs unit and
# end-to-end tests (real ferryd, real CRIU, real QEMU/KVM). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/real-root.sh; ferry_ensure_real_root "$0" "$@"
bash scripts/setup.sh
echo "== build" >&2
cargo build --workspace --all-targets --locked
echo "== tests" >&2
# End-to-end tests find ferryd and ferry next to their own binaries (target/debug).
cargo test --workspace --locked -- --test-threads="${FERRY_TEST_THREADS:-2}"
