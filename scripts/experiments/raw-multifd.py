#!/usr/bin/env python3
"""Raw QEMU-to-QEMU on one host: does QEMU's multifd shorten the RAM phase?

An experiment behind doc/benchmarks-moves.md (seventeenth session), not part
of the test suite or of move-bench. It asks whether parallel RAM channels
(QEMU's `multifd` capability) would be a lever for ferry's VM total time on
this host before building them into the migration protocol.

Each run boots the test guest (drivers/src/vm/testvm.asm, assembled here with
nasm) with 1 GiB of RAM and a 64 MiB hot set rewritten continuously, lets it
warm up, starts a second QEMU with `-incoming defer` on the same disk (a
shared pool: no disk copy) and migrates over a unix socket with QEMU's own
switch-over (`downtime-limit` 300 ms, auto-converge, no bandwidth cap). The
variants (0 = one channel, N = multifd with N channels) are interleaved and
their order reversed every other round; the figures are QEMU's own
(`query-migrate` on the source) plus the wall time from starting the target
QEMU to `completed`.

Usage: python3 scripts/experiments/raw-multifd.py [ROUNDS] [CHANNELS ...]
       (default: 4 rounds of 0 2 4). Needs root, KVM, nasm, qemu-system-x86_64.
"""
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ASM = os.path.join(HERE, "..", "..", "drivers", "src", "vm", "testvm.asm")
WARM_S = 3.0


def make_disk(d):
    """The testvm image padded to 1 MiB with its parameter block patched
    (layout: drivers/src/vm/image.rs)."""
    subprocess.run(["nasm", "-f", "bin", "-o", f"{d}/testvm.bin", ASM], check=True)
    img = bytearray(open(f"{d}/testvm.bin", "rb").read())
    img += bytes((1 << 20) - len(img))
    start, dirty = 4, 64
    params = struct.pack("<IHHIIII", 0x4D525046, 1, 24, -(-(start + dirty) // 2), start, dirty, 100)
    img[0x1C0:0x1C0 + len(params)] = params
    open(f"{d}/disk.img", "wb").write(img)


def start_qemu(d, name, incoming):
    for f in (f"{d}/{name}.qmp", f"{d}/{name}.pid"):
        if os.path.exists(f):
            os.unlink(f)
    args = [
        "qemu-system-x86_64", "-name", f"guest={name},debug-threads=on",
        "-machine", "pc-i440fx-7.2", "-accel", "kvm", "-m", "1024M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-drive", f"file={d}/disk.img,format=raw,if=ide,index=0,media=disk",
        "-chardev", f"file,id=console,path={d}/{name}.console", "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={d}/{name}.qmp,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control", "-pidfile", f"{d}/{name}.pid", "-daemonize",
    ]
    if incoming:
        args += ["-incoming", "defer"]
    subprocess.run(args, check=True, stderr=subprocess.DEVNULL)
    return int(open(f"{d}/{name}.pid").read())


def kill_all(pids):
    for p in pids:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.f = self.sock.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")


def wait_completed(src):
    """Poll the source until its migration ends; its `query-migrate`."""
    while True:
        r = src.cmd("query-migrate")
        if r["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.002)
    if r["status"] != "completed":
        raise RuntimeError(f"migration {r['status']}: {r.get('error-desc')}")
    return r


def figures(r):
    """QEMU's own figures of a completed migration."""
    return {
        "qemu_total": r["total-time"], "downtime": r["downtime"],
        "mib": r["ram"]["transferred"] / (1 << 20), "passes": r["ram"]["dirty-sync-count"],
    }


def interleave(d, rounds, variants, run, label):
    """`run(d, v)` for every variant, `rounds` times, the order reversed
    every other round; prints each result. Returns variant -> results."""
    results = {v: [] for v in variants}
    for i in range(rounds):
        for v in variants if i % 2 == 0 else list(reversed(variants)):
            x = run(d, v)
            results[v].append(x)
            print(f"{label(v)}: " + " ".join(f"{k}={x[k]:.0f}" for k in x), flush=True)
    return results


def print_medians(results, keys, label):
    """results: variant -> list of figure dicts."""
    rounds = len(next(iter(results.values())))
    print("\nmedians (min-max) over", rounds, "rounds, ms unless named:")
    for v, xs in results.items():
        cells = []
        for k in keys:
            vals = [x[k] for x in xs]
            cells.append(f"{k} {statistics.median(vals):.0f} ({min(vals):.0f}-{max(vals):.0f})")
        print(f"  {label(v)}: " + ", ".join(cells))


def run(d, channels):
    pids = [start_qemu(d, "src", False)]
    try:
        time.sleep(WARM_S)
        src = Qmp(f"{d}/src.qmp")
        t0 = time.monotonic()
        pids.append(start_qemu(d, "dst", True))
        dst = Qmp(f"{d}/dst.qmp")
        caps = [{"capability": c, "state": True} for c in ("events", "auto-converge")]
        params = {"downtime-limit": 300, "max-bandwidth": 100 << 30}
        if channels:
            caps.append({"capability": "multifd", "state": True})
            params["multifd-channels"] = channels
        for q in (src, dst):
            q.cmd("migrate-set-capabilities", capabilities=caps)
            q.cmd("migrate-set-parameters", **params)
        sock = f"{d}/migration.sock"
        if os.path.exists(sock):
            os.unlink(sock)
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        src.cmd("migrate", uri=f"unix:{sock}")
        r = wait_completed(src)
        return {"wall": (time.monotonic() - t0) * 1000, **figures(r)}
    finally:
        kill_all(pids)
        # Let the freed memory settle as between move-bench repetitions.
        time.sleep(6)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    variants = [int(c) for c in sys.argv[2:]] or [0, 2, 4]
    label = lambda v: f"multifd {v}" if v else "one channel"  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="ferry-multifd-") as d:
        make_disk(d)
        results = interleave(d, rounds, variants, run, label)
    print_medians(results, ("qemu_total", "wall", "downtime", "mib", "passes"), label)


if __name__ == "__main__":
    main()
