#!/usr/bin/env python3
"""Raw QEMU-to-QEMU on one host: what would starting the source's RAM
migration before the target QEMU is up save?

An experiment behind doc/benchmarks-moves.md (twentieth session), not part
of the test suite. In a live VM move the target QEMU's start (50-130 ms on
this host) comes before any RAM is sent. The lever asked about: let the
source's migration start at once and its stream wait in the link's buffers
until the target QEMU listens. This measures the most it could save, with a
link that holds everything (an unbounded buffer; ferry's links hold a few
MiB, more only where the pages compress).

Each run boots the test guest (1 GiB, a 64 MiB hot set rewritten
continuously) as the source, with a shared disk (no mirror), multifd with 2
channels, auto-converge, no bandwidth cap. A relay here accepts the source
QEMU's connections and joins each to one to the target QEMU.
- `sequential`: the target QEMU starts and listens, then the source
  migrates (what ferry does).
- `early`: the source migrates at once (its `downtime-limit` at 1 ms, so it
  cannot switch over while the target is not there), the relay buffers what
  it receives; the target QEMU starts at the same time, and once it listens
  the relay drains the buffers into it and the source's `downtime-limit`
  goes to 300 ms.
Both then switch over by QEMU's own rule (300 ms). `wall` runs from the
start of the target QEMU's launch (sequential) or of the migration (early)
to `completed`.

Usage: python3 scripts/experiments/raw-early-ram.py [ROUNDS]
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
spec = importlib.util.spec_from_file_location("raw_multifd", os.path.join(HERE, "raw-multifd.py"))
raw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(raw)

CHANNELS = 2


class Relay:
    """Accepts the source QEMU's connections on `path`; each is read into a
    buffer at once and written to a connection to `target` once `open()`
    was called (then it relays as it reads)."""

    def __init__(self, path, target):
        self.target = target
        self.ready = threading.Event()
        self.buffered = 0
        self.lock = threading.Lock()
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(8)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self.pipe, args=(c,), daemon=True).start()

    def pipe(self, c):
        chunks, cond, done = [], threading.Condition(), [False]

        def writer():
            self.ready.wait()
            out = socket.socket(socket.AF_UNIX)
            out.connect(self.target)
            while True:
                with cond:
                    while not chunks and not done[0]:
                        cond.wait()
                    batch, chunks[:] = chunks[:], []
                    end = done[0]
                try:
                    for b in batch:
                        out.sendall(b)
                    if end and not batch:
                        out.shutdown(socket.SHUT_WR)
                        return
                except OSError:
                    return  # the target QEMU is gone (killed after the run)

        threading.Thread(target=writer, daemon=True).start()
        while True:
            b = c.recv(1 << 20)
            with cond:
                if not b:
                    done[0] = True
                    cond.notify()
                    return
                chunks.append(b)
                if not self.ready.is_set():
                    with self.lock:
                        self.buffered += len(b)
                cond.notify()

    def open(self):
        self.ready.set()

    def close(self):
        self.srv.close()


def run(d, early):
    pids = [raw.start_qemu(d, "src", False)]
    relay = None
    try:
        time.sleep(raw.WARM_S)
        src = raw.Qmp(f"{d}/src.qmp")
        caps = [{"capability": c, "state": True} for c in ("events", "auto-converge", "multifd")]
        params = {"max-bandwidth": 100 << 30, "multifd-channels": CHANNELS}
        src.cmd("migrate-set-capabilities", capabilities=caps)
        src.cmd("migrate-set-parameters", **params, **{"downtime-limit": 1 if early else 300})
        for s in ("in.sock", "out.sock"):
            if os.path.exists(f"{d}/{s}"):
                os.unlink(f"{d}/{s}")
        relay = Relay(f"{d}/out.sock", f"{d}/in.sock")
        t0 = time.monotonic()
        if early:
            src.cmd("migrate", uri=f"unix:{d}/out.sock")
        pids.append(raw.start_qemu(d, "dst", True))
        dst = raw.Qmp(f"{d}/dst.qmp")
        dst.cmd("migrate-set-capabilities", capabilities=caps)
        dst.cmd("migrate-set-parameters", **params)
        dst.cmd("migrate-incoming", uri=f"unix:{d}/in.sock")
        target_up = (time.monotonic() - t0) * 1000
        relay.open()
        buffered = relay.buffered / (1 << 20)
        if early:
            src.cmd("migrate-set-parameters", **{"downtime-limit": 300})
        else:
            src.cmd("migrate", uri=f"unix:{d}/out.sock")
        r = raw.wait_completed(src)
        return {
            "wall": (time.monotonic() - t0) * 1000, "target_up": target_up,
            "buffered_mib": buffered, **raw.figures(r),
        }
    finally:
        if relay:
            relay.close()
        raw.kill_all(pids)
        time.sleep(6)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    label = lambda v: "early" if v else "sequential"  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="ferry-early-ram-") as d:
        raw.make_disk(d)
        results = raw.interleave(d, rounds, [False, True], run, label)
    raw.print_medians(
        results, ("wall", "target_up", "buffered_mib", "qemu_total", "downtime", "mib", "passes"),
        label)


if __name__ == "__main__":
    main()
