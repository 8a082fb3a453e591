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
profile=debug doc=1 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release ;;
    --no-doc) doc=0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "bench-raft: must run as root (ferryd creates namespaces)" >&2; exit 1; }
echo "== build ($profile)" >&2
if [ "$profile" = release ]; then
  cargo build --workspace --release
else
  cargo build --workspace
fi
[ "$doc" = 1 ] && args+=(--write-doc doc/benchmarks.md)
# raft-bench finds ferryd and ferry next to itself (target/<profile>/).
exec "target/$profile/raft-bench" "${args[@]}"
