#!/usr/bin/env bash
# Benchmark of cluster evacuation (issue 6): the wall time of `ferry cluster
# evacuate m1 --action live-migrate` for 8 instances (4 busybox containers,
# 4 test VMs) against the slowest single move × ⌈8 / parallelism⌉, on three
# real members (see doc/benchmarks-evacuation.md). Not a test: it prints
# figures and asserts no timings. Run as root; VMs need /dev/kvm (left out,
# with a note, without it), containers need criu.
#
#   scripts/bench-evacuate.sh                    3 repetitions per configuration (parallel 2 and 4),
#                                                debug build, writes doc/benchmarks-evacuation.md
#   scripts/bench-evacuate.sh --release          optimized build (target/release), its own section of the doc
#   scripts/bench-evacuate.sh --reps 1           fewer repetitions
#   scripts/bench-evacuate.sh --no-doc           print the results only
#   scripts/bench-evacuate.sh -- --parallel 2    pass arguments to evacuate-bench (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."
cmdline="scripts/bench-evacuate.sh${*:+ $*}"
profile=debug doc=1 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) [ $# -ge 2 ] || { echo "bench-evacuate: --reps needs a number" >&2; exit 2; }
            args+=(--reps "$2"); shift ;;
    --release) profile=release ;;
    --no-doc) doc=0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "bench-evacuate: must run as root (namespaces, CRIU, KVM)" >&2; exit 1; }
echo "== build ($profile)" >&2
if [ "$profile" = release ]; then
  cargo build --workspace --release
else
  cargo build --workspace
fi
[ "$doc" = 1 ] && args+=(--write-doc doc/benchmarks-evacuation.md)
# evacuate-bench finds ferryd and ferry next to itself (target/<profile>/);
# the doc gets one results section per build profile.
exec "target/$profile/evacuate-bench" --command "$cmdline" "${args[@]}"
