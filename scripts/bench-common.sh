# Sourced by scripts/bench-raft.sh, scripts/bench-move.sh and
# scripts/bench-evacuate.sh, from the repository root: what they share.
#
# bench_main SCRIPT BIN DOC WHY [--reps] [--command] -- ARGS...
#   takes the script's ARGS: --release (target/release, else target/debug),
#   --no-doc (print only, else --write-doc DOC), with --reps: --reps N,
#   after -- anything for BIN, and passes whatever else to BIN as it is.
#   Needs root (WHY says why), builds the workspace in that profile, then
#   execs target/<profile>/BIN, with --command: --command "scripts/SCRIPT.sh
#   ARGS" first (the command line recorded in the doc). BIN finds ferryd and
#   ferry next to itself; the doc gets one results section per build profile.
bench_main() {
  local script=$1 bin=$2 doc_file=$3 why=$4
  shift 4
  local reps=0 command=0
  while [ "$1" != -- ]; do
    case "$1" in
      --reps) reps=1 ;;
      --command) command=1 ;;
    esac
    shift
  done
  shift
  local cmdline="scripts/$script.sh${*:+ $*}"
  local profile=debug doc=1 args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --reps) if [ "$reps" = 1 ]; then
                [ $# -ge 2 ] || { echo "$script: --reps needs a number" >&2; exit 2; }
                args+=(--reps "$2"); shift
              else
                args+=("$1")
              fi ;;
      --release) profile=release ;;
      --no-doc) doc=0 ;;
      --) shift; args+=("$@"); break ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  [ "$(id -u)" = 0 ] || { echo "$script: must run as root ($why)" >&2; exit 1; }
  echo "== build ($profile)" >&2
  if [ "$profile" = release ]; then
    cargo build --workspace --release
  else
    cargo build --workspace
  fi
  if [ "$doc" = 1 ]; then
    args+=(--write-doc "$doc_file")
  fi
  if [ "$command" = 1 ]; then
    args=(--command "$cmdline" "${args[@]}")
  fi
  exec "target/$profile/$bin" "${args[@]}"
}
