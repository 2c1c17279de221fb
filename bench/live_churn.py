#!/usr/bin/python3
"""live_churn.py: the churn of bench/live_bench.sh, written into a running guest.

  live_churn.py plan IMAGE DIR --bytes N [--piece 65536] [--seed 7]
      picks N bytes' worth of distinct piece-aligned places inside IMAGE's
      allocated extents (qemu-img map), seeded, and writes DIR/plan.tsv
      (offset, pattern file) and DIR/p-NNNNN (random, incompressible data,
      one file a piece, so no two pieces deduplicate).
  live_churn.py apply DIR (--qmp SOCKET | --libvirt DOMAIN) --qdev ID
      writes every piece of the plan through the guest's virtio disk (its
      BlockBackend, as the guest's own writes would arrive: the dirty bitmaps
      see them) with the monitor's `qemu-io -d /machine/peripheral/ID/
      virtio-backend "write -s FILE OFFSET LEN"`, over QMP or through libvirt.

Prints one JSON object (what was planned or written, and the seconds taken).
"""
import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time


def plan(args):
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", args.image],
                         check=True, capture_output=True, text=True).stdout
    piece = args.piece
    places = []
    for e in json.loads(out):
        if not e["data"]:
            continue
        first = (e["start"] + piece - 1) // piece
        last = (e["start"] + e["length"]) // piece
        places.extend(range(first, last))
    rng = random.Random(args.seed)
    want = min(len(places), args.bytes // piece)
    chosen = sorted(rng.sample(places, want))
    root = os.path.abspath(args.dir)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "plan.tsv"), "w") as f:
        for i, p in enumerate(chosen):
            name = os.path.join(root, "p-%05d" % i)
            with open(name, "wb") as pf:
                pf.write(rng.randbytes(piece))
            os.chmod(name, 0o644)
            f.write("%d\t%s\n" % (p * piece, name))
    print(json.dumps({"pieces": want, "piece": piece, "bytes": want * piece,
                      "allocated_pieces": len(places)}))


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **arguments):
        self.f.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError("%s: %s" % (name, reply["error"]))
            return reply["return"]

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})


def apply(args):
    if args.qmp:
        mon = Qmp(args.qmp)
        hmp = mon.hmp
    else:
        import libvirt
        import libvirt_qemu
        conn = libvirt.open("qemu:///system")
        dom = conn.lookupByName(args.libvirt)

        def hmp(line):
            return libvirt_qemu.qemuMonitorCommand(
                dom, line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    path = "/machine/peripheral/%s/virtio-backend" % args.qdev
    start = time.monotonic()
    n = 0
    size = 0
    with open(os.path.join(args.dir, "plan.tsv")) as f:
        for line in f:
            offset, name = line.rstrip("\n").split("\t")
            length = os.path.getsize(name)
            reply = hmp('qemu-io -d %s "write -q -s %s %s %d"' % (path, name, offset, length))
            if reply.strip():
                sys.exit("qemu-io failed at offset %s: %s" % (offset, reply.strip()))
            n += 1
            size += length
    print(json.dumps({"pieces": n, "bytes": size,
                      "seconds": round(time.monotonic() - start, 3)}))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    pl = sub.add_parser("plan")
    pl.add_argument("image")
    pl.add_argument("dir")
    pl.add_argument("--bytes", type=int, required=True)
    pl.add_argument("--piece", type=int, default=65536)
    pl.add_argument("--seed", type=int, default=7)
    ap = sub.add_parser("apply")
    ap.add_argument("dir")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--qmp")
    g.add_argument("--libvirt")
    ap.add_argument("--qdev", required=True)
    args = p.parse_args()
    plan(args) if args.what == "plan" else apply(args)


if __name__ == "__main__":
    main()
