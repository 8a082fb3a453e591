#!/usr/bin/env bash
# Benchmark of moves of running instances: ferry's live / post-copy /
# stateful-stop moves next to raw CRIU and raw QEMU-to-QEMU, side by side in
# one run (see doc/benchmarks-moves.md). Not a test. Run as root; VMs need
# /dev/kvm (skipped without it), containers need criu and gcc (static glibc).
#
#   scripts/bench-move.sh                   5 repetitions, debug build (what `cargo build --workspace` makes),
#                                           writes doc/benchmarks-moves.md
#   scripts/bench-move.sh --release         optimized build (target/release), its own section of the doc
#   scripts/bench-move.sh --reps 2          fewer repetitions
#   scripts/bench-move.sh --no-doc          print the results only
#   scripts/bench-move.sh -- --only vm      pass arguments to move-bench (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-common.sh
bench_main bench-move move-bench doc/benchmarks-moves.md \
  "namespaces, CRIU, KVM" --reps --command -- "$@"
