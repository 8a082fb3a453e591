#!/usr/bin/env bash
# ferry demo: installs what is missing, builds, starts a 3-member cluster of
# ferryd daemons on loopback (raft-replicated DB, mTLS between members),
# launches a container (CRIU) on member2 and a VM (QEMU/KVM) on member3, shows
# their counters advancing, stateful-stops and starts both, moves both live to
# other members (then a post-copy container move and a capped VM move),
# shows that the counters continued, evacuates the member holding both and
# restores it, and cleans up. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/real-root.sh; ferry_ensure_real_root "$0" "$@"
bash scripts/setup.sh
echo "== building ferry" >&2
cargo build --workspace --locked -q
BIN=$PWD/target/debug
WORK=$(mktemp -d /tmp/ferry-demo.XXXXXX)
PIDS=()
cleanup() {
  set +e
  for i in c1 v1; do FERRY_DIR=$WORK/member1 "$BIN/ferry" delete --force "$i" >/dev/null 2>&1; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
ferry() { echo "\$ ferry $*" >&2; "$BIN/ferry" "$@"; }
on() { local m=$1; shift; echo "[$m] \$ ferry $*" >&2; FERRY_DIR=$WORK/$m "$BIN/ferry" "$@"; }
step() { printf '\n== %s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "starting three members (ferryd), each with its own data dir and HTTPS port"
for m in member1 member2 member3; do
  port=$(free_port)
  "$BIN/ferryd" --dir "$WORK/$m" --listen "127.0.0.1:$port" --name "$m" >"$WORK/$m.log" 2>&1 &
  PIDS+=($!)
  echo "$m: https://127.0.0.1:$port  (data dir $WORK/$m)"
done
for m in member1 member2 member3; do
  for _ in $(seq 100); do [ -S "$WORK/$m/unix.socket" ] && break; sleep 0.1; done
  [ -S "$WORK/$m/unix.socket" ] || { cat "$WORK/$m.log"; exit 1; }
done
[ -e /dev/kvm ] && echo "KVM: /dev/kvm present" || echo "KVM: /dev/kvm absent: VMs run under TCG emulation"

step "forming the cluster: enable on member1, join the others with one-time tokens (raft over mTLS)"
on member1 cluster enable member1
for m in member2 member3; do
  token=$(on member1 cluster add "$m")
  on "$m" cluster join "$token"
done
sleep 2
on member3 cluster list

export FERRY_DIR=$WORK/member1
step "launching a container on member2 and a VM on member3 (from member1: requests are forwarded)"
ferry launch busybox c1 --target member2 -c limits.memory=64MiB
ferry launch testvm v1 --vm --target member3 -c limits.memory=256MiB -c testvm.dirty_mib=32
on member2 list

c_counter() { "$BIN/ferry" exec c1 -- cat /counter | tr -d '[:space:]'; }
v_counter() { "$BIN/ferry" console --show-log v1 | grep -a '^counter ' | tail -1 | awk '{print $2}'; }
wait_vm() { for _ in $(seq 100); do [ -n "$(v_counter)" ] && return; sleep 0.1; done; echo "VM printed no counter" >&2; exit 1; }

step "both are running: counters advance"
wait_vm
c0=$(c_counter); v0=$(v_counter); sleep 1.5; c1=$(c_counter); v1=$(v_counter)
echo "container c1 /counter:     $c0 -> $c1"
echo "VM v1 serial 'counter N':  $v0 -> $v1"

step "stateful stop (container: CRIU dump; VM: QEMU migrate to a state file)"
t0=$(date +%s.%N); ferry stop --stateful c1; t1=$(date +%s.%N); ferry stop --stateful v1; t2=$(date +%s.%N)
ferry list
c_saved=$(tr -d '[:space:]' < "$WORK/member2/storage-pools/default/containers/c1/rootfs/counter"); v_saved=$(v_counter)
echo "saved: container at $c_saved, VM at $v_saved; waiting 2 s while stopped"
sleep 2

step "stateful start (container: CRIU restore; VM: migrate-incoming + cont)"
t3=$(date +%s.%N); ferry start c1; t4=$(date +%s.%N); ferry start v1; t5=$(date +%s.%N)
wait_vm; sleep 1
c2=$(c_counter); v2=$(v_counter)
ferry list

step "what happened"
verdict() { if [ "$2" -ge "$1" ]; then echo "continued from $1 (now $2): state kept"; else echo "RESET: $1 -> $2"; fi; }
secs() { awk "BEGIN{printf \"%.2f\", $2 - $1}"; }
echo "container c1: $(verdict "$c_saved" "$c2")  [stateful stop $(secs "$t0" "$t1")s, start $(secs "$t3" "$t4")s]"
echo "VM v1:        $(verdict "$v_saved" "$v2")  [stateful stop $(secs "$t1" "$t2")s, start $(secs "$t4" "$t5")s]"
step "live move: container c1 from member2 to member3 (CRIU over ferry's websockets)"
c_before=$(c_counter)
ferry move c1 --target member3
c_after=$(c_counter)
sleep 1
c_later=$(c_counter)
on member2 list
echo "container c1: $c_before before the move -> $c_after right after -> $c_later a second later (on member3)"
[ "$c_after" -ge "$c_before" ] && echo "  counter continued: the running state moved" || echo "  RESET: the counter restarted"
step "live move: VM v1 from member3 to member1 (QEMU-to-QEMU over ferry's websockets)"
v_before=$(v_counter)
ferry move v1 --target member1
sleep 1
v_after=$(v_counter)
on member3 list
echo "VM v1: serial counter $v_before before the move -> $v_after a second after (now on member1)"
[ "$v_after" -ge "$v_before" ] && echo "  counter continued: the running guest moved" || echo "  RESET: the guest restarted"
step "post-copy move: container c1 back to member2 (resumes first, memory follows via CRIU lazy pages)"
c_before=$(c_counter)
ferry move c1 --target member2 --postcopy
sleep 1
c_after=$(c_counter)
echo "container c1: $c_before before -> $c_after a second after (now on member2)"
[ "$c_after" -ge "$c_before" ] && echo "  counter continued" || echo "  RESET: the counter restarted"
step "VM v1 to member2 with a 64 MiB/s cap and a 100 ms downtime limit (disk mirrored while it runs)"
ferry move v1 --target member2 --bandwidth 64MiB --max-downtime 100 --format json \
  | python3 -c 'import json,sys; m=json.load(sys.stdin); q=m.get("qemu",{}); print("path: %s; total %s ms; downtime %s ms (QEMU: %s ms); RAM sent %.0f MiB in %s passes; disk mirror %s ms; state stream %s" % (m.get("path"), m.get("total_ms"), m.get("downtime_ms"), q.get("downtime_ms"), q.get("transferred",0)/1048576, q.get("passes"), m.get("disk_mirror_ms"), m["plan"]["state_compression"]))'
on member1 list
ferry operation list
step "evacuating member2 for maintenance: both instances move live to the members with the most free memory"
c_before=$(c_counter); v_before=$(v_counter)
ferry cluster evacuate member2 --action live-migrate --force
on member3 cluster list
sleep 1
echo "container c1: $c_before -> $(c_counter); VM v1: $v_before -> $(v_counter) (both still counting, away from member2)"
step "restoring member2: the instances come back live, the member takes new instances again"
ferry cluster restore member2 --force
on member1 list
ferry operation list
step "cleaning up"
ferry delete --force c1
ferry delete --force v1
echo "demo done"
