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
cmdline="scripts/bench-move.sh${*:+ $*}"
profile=debug doc=1 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) [ $# -ge 2 ] || { echo "bench-move: --reps needs a number" >&2; exit 2; }
            args+=(--reps "$2"); shift ;;
    --release) profile=release ;;
    --no-doc) doc=0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "bench-move: must run as root (namespaces, CRIU, KVM)" >&2; exit 1; }
echo "== build ($profile)" >&2
if [ "$profile" = release ]; then
  cargo build --workspace --release
else
  cargo build --workspace
fi
[ "$doc" = 1 ] && args+=(--write-doc doc/benchmarks-moves.md)
# move-bench finds ferryd and ferry next to itself (target/<profile>/); the
# doc gets one results section per build profile.
exec "target/$profile/move-bench" --command "$cmdline" "${args[@]}"
