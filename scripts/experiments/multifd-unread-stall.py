#!/usr/bin/env python3
"""Raw QEMU: does a multifd migration whose connections stay open but are no
longer read hold QEMU's clean-up, and does closing them release it?

An experiment behind doc/moves.md (nineteenth session), not part of the test
suite. It stands for a ferry source whose relays stopped reading after the
target side broke, and did not close QEMU's connections until the link's
own timeouts ended them.

Each round boots the test guest as a source and lets a plain socket take
QEMU's multifd connections (a main and 2 more, read at first). After a
moment it stops reading the first connection QEMU opened and drops the last
one, keeping the others open. It then watches for up to HOLD_S seconds:
the migration's status and whether `query-yank` still lists the migration
instance (the last step of QEMU's clean-up drops it). Finally it closes the
remaining connections and measures how long until the instance is gone.

Seen on QEMU 10.0.2: the clean-up waits as long as the connections stay
open, and ends within milliseconds of closing them, except in some rounds
where it never ends: the migration thread waits in
`multifd_send_sync_main` for multifd send threads that already exited
(`gdb -p PID -batch -ex 'thread apply all bt'`), and QEMU refuses another
`migrate` ("duplicate yank instance") while the guest runs on.

Usage: python3 scripts/experiments/multifd-unread-stall.py [ROUNDS]
       (default 5). Needs root, KVM, nasm, qemu-system-x86_64.
"""
import importlib.util
import os
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name, file):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


yank = load("multifd_yank_race", "multifd-yank-race.py")
raw = yank.raw
HOLD_S = 6.0


def listener(path, conns, stopped):
    """Accept QEMU's connections and read each until its index is stopped."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    srv.settimeout(3)

    def reader(i, c):
        try:
            while i not in stopped and c.recv(1 << 16):
                pass
        except OSError:
            pass

    def accept():
        for i in range(3):
            try:
                c, _ = srv.accept()
            except OSError:
                break
            conns.append(c)
            threading.Thread(target=reader, args=(i, c), daemon=True).start()
        srv.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    return t


def yank_gone_within(q, seconds):
    """Seconds until query-yank no longer lists the migration, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if not yank.yank_registered(q):
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


def round_(d):
    pid = raw.start_qemu(d, "src", False)
    try:
        q, sock = yank.multifd_source(d)
        conns, stopped = [], set()
        t = listener(sock, conns, stopped)
        q.cmd("migrate", uri=f"unix:{sock}")
        time.sleep(0.15)
        t.join()
        stopped.add(0)
        time.sleep(0.1)
        conns[-1].shutdown(socket.SHUT_RDWR)
        conns[-1].close()
        held = yank_gone_within(q, HOLD_S)
        status = q.cmd("query-migrate").get("status")
        for c in conns[:-1]:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        after = yank_gone_within(q, HOLD_S) if held is None else 0.0
        final = q.cmd("query-migrate").get("status")
        return held, status, after, final, yank.alive(pid)
    finally:
        raw.kill_all([pid])
        time.sleep(0.3)


def fmt(seconds):
    return "still pending" if seconds is None else f"done in {seconds:.2f} s"


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    held_rounds = stuck_rounds = 0
    with tempfile.TemporaryDirectory(prefix="ferry-unread-") as d:
        raw.make_disk(d)
        for i in range(rounds):
            held, status, after, final, ok = round_(d)
            if held is None:
                held_rounds += 1
                stuck_rounds += after is None
                print(f"round {i}: clean-up still pending after {HOLD_S:.0f} s (status {status}); "
                      f"after closing the other connections: {fmt(after)} (status {final}), "
                      f"source QEMU {'alive' if ok else 'DEAD'}", flush=True)
            else:
                print(f"round {i}: clean-up done {held:.2f} s after the drop (status {status}), "
                      f"source QEMU {'alive' if ok else 'DEAD'}", flush=True)
    print(f"QEMU's clean-up waited on the unread connections in {held_rounds} of {rounds} rounds; "
          f"it stayed stuck after they were closed in {stuck_rounds}")


if __name__ == "__main__":
    main()
