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
. scripts/bench-common.sh
bench_main bench-evacuate evacuate-bench doc/benchmarks-evacuation.md \
  "namespaces, CRIU, KVM" --reps --command -- "$@"
