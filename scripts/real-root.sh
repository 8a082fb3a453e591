# Sourced by scripts/test.sh and scripts/demo.sh.
# Containers need pivot_root(2), which fails with EINVAL when the process root
# is not a mount point — as inside a plain chroot (e.g. a freshly bootstrapped
# Debian root used to check a new machine). In that case re-run the calling
# script in a private mount namespace whose root is a bind mount of the same
# tree, so pivot_root and CRIU's --root work. On a normal machine: no effect.
ferry_ensure_real_root() {
  if awk '$5 == "/" {found = 1} END {exit !found}' /proc/self/mountinfo; then return 0; fi
  [ -z "${FERRY_REAL_ROOT:-}" ] || { echo "cannot make / a mount point" >&2; exit 1; }
  echo "note: / is not a mount point (a chroot?): re-running in a mount namespace rooted at a bind mount" >&2
  local script; script=$(readlink -f "$1"); shift
  exec unshare --mount --propagation unchanged -- env FERRY_REAL_ROOT=1 bash -c '
    set -e; mkdir -p /run/ferry-root; mount --rbind / /run/ferry-root; mount --make-rprivate /run/ferry-root
    cd /run/ferry-root; exec chroot /run/ferry-root bash -c "cd \"$1\" && shift && exec bash \"\$@\"" bash "$@"' \
    bash "$PWD" "$script" "$@"
}
