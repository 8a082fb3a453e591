#!/usr/bin/env python3
"""Raw QEMU: does changing migration capabilities right after a failed
multifd migration make the source QEMU abort?

An experiment behind doc/moves.md (eighteenth session), not part of the test
suite. A failed migration ends in two steps in QEMU 10.0: the migration
thread sets the status `failed` (and emits the MIGRATION event), then a
bottom half on the main loop cleans up. That clean-up stops multifd's
channels only if the `multifd` capability is still on; if it was turned off
in between, the channels stay registered with the yank instance and QEMU
aborts (util/yank.c: `yank_unregister_instance`: assertion
`QLIST_EMPTY(&entry->yankfns)`).

Each round boots the test guest as a source, lets a plain socket here take
QEMU's multifd connections (a main and 2 more), drops them after a moment
so the migration fails, and on the `failed` event turns `multifd` off:
- `immediate`: at once (what ferry did before the fix);
- `wait-yank`: only once `query-yank` no longer lists the migration
  instance (what ferry does now).
It then counts the rounds whose source QEMU died.

Usage: python3 scripts/experiments/multifd-yank-race.py [ROUNDS]
       (default 10 per variant). Needs root, KVM, nasm, qemu-system-x86_64.
"""
import importlib.util
import json
import os
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("raw_multifd", os.path.join(HERE, "raw-multifd.py"))
raw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(raw)


def send(q, name, **args):
    q.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
    q.f.flush()


def wait_failed(q, timeout):
    """Read QMP lines until the MIGRATION event says failed (or cancelled)."""
    q.sock.settimeout(timeout)
    while True:
        msg = json.loads(q.f.readline())
        if msg.get("event") == "MIGRATION" and msg["data"]["status"] in ("failed", "cancelled"):
            return msg["data"]["status"]


def yank_registered(q):
    send(q, "query-yank")
    while True:
        msg = json.loads(q.f.readline())
        if "return" in msg:
            return any(i.get("type") == "migration" for i in msg["return"])
        if "error" in msg:
            raise RuntimeError(msg["error"])


def alive(pid):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def breaking_listener(path, conns, hold_s):
    """Accept QEMU's connections, read for `hold_s`, then drop them all."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    srv.settimeout(5)

    def reader(c):
        try:
            while c.recv(1 << 20):
                pass
        except OSError:
            pass

    def accept():
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            try:
                srv.settimeout(max(0.01, deadline - time.monotonic()))
                c, _ = srv.accept()
            except (socket.timeout, OSError):
                continue
            conns.append(c)
            threading.Thread(target=reader, args=(c,), daemon=True).start()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        srv.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    return t


def multifd_source(d):
    """Boot the test guest as a source with multifd (2 channels, 8 MiB/s)
    set up; returns its QMP and the socket path to migrate to (removed)."""
    time.sleep(2)  # the guest fills its 64 MiB hot set
    q = raw.Qmp(f"{d}/src.qmp")
    q.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "events", "state": True},
        {"capability": "multifd", "state": True},
    ])
    q.cmd("migrate-set-parameters", **{"multifd-channels": 2, "max-bandwidth": 8 << 20})
    sock = f"{d}/mig.sock"
    if os.path.exists(sock):
        os.unlink(sock)
    return q, sock


def round_(d, variant):
    pid = raw.start_qemu(d, "src", False)
    try:
        q, sock = multifd_source(d)
        conns = []
        t = breaking_listener(sock, conns, 0.3)
        q.cmd("migrate", uri=f"unix:{sock}")
        status = wait_failed(q, 10)
        if variant == "wait-yank":
            deadline = time.monotonic() + 10
            while yank_registered(q) and time.monotonic() < deadline:
                time.sleep(0.005)
        send(q, "migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": False}])
        t.join()
        time.sleep(0.5)
        return status, len(conns), alive(pid)
    finally:
        raw.kill_all([pid])
        time.sleep(0.3)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    dead = {"immediate": 0, "wait-yank": 0}
    with tempfile.TemporaryDirectory(prefix="ferry-yank-") as d:
        raw.make_disk(d)
        for i in range(rounds):
            for v in dead:
                status, n, ok = round_(d, v)
                dead[v] += not ok
                print(f"round {i} {v}: migration {status} ({n} connections), "
                      f"source QEMU {'alive' if ok else 'DEAD'}", flush=True)
    for v, n in dead.items():
        print(f"{v}: the source QEMU died in {n} of {rounds} rounds")


if __name__ == "__main__":
    main()
