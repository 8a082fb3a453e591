#!/usr/bin/env bash
# Benchmark of replicated writes on a 3-member loopback cluster: commit latency
# p50/p99 and throughput (see doc/benchmarks.md). Not a test. Run as root.
#
#   scripts/bench-raft.sh                      debug build (what `cargo build --workspace` makes)
#   scripts/bench-raft.sh --release            optimized build (target/release)
#   scripts/bench-raft.sh --no-doc             print the results only
#   scripts/bench-raft.sh -- --writes 200      pass arguments to raft-bench (see --help)
#
# Writes the results into doc/benchmarks.md, in the section of the build
# profile used (the rest of the file is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-common.sh
bench_main bench-raft raft-bench doc/benchmarks.md \
  "ferryd creates namespaces" -- "$@"
