#!/usr/bin/env python3
"""throughput_report.py - tables from a bench/throughput_bench.sh output directory.

usage: throughput_report.py OUT

For every group of repeated runs (TAG-1, TAG-2, ... in OUT/time): best and
median wall time, CPU time (user+sys, children included), peak RSS, the load
average before the run, and for backups the bytes read and MB/s (10^6 B/s)
of read bytes over wall time. nbdcopy rows use the read bytes of the
matching backup (the same allocated extents).
"""
import glob
import json
import os
import re
import statistics
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleet_report import parse_time  # noqa: E402


def main():
    out = sys.argv[1]
    groups = {}
    for p in sorted(glob.glob(os.path.join(out, "time", "*.txt"))):
        tag = os.path.basename(p)[:-4]
        m = re.match(r"(.*)-(\d+)$", tag)
        base = m.group(1) if m else tag
        t = parse_time(p)
        lp = p[:-4] + ".load"
        t["load"] = float(open(lp).read().split()[0]) if os.path.exists(lp) else float("nan")
        jp = os.path.join(out, "json", tag)
        t["read"] = None
        if os.path.exists(jp) and os.path.getsize(jp) > 0:
            try:
                j = json.load(open(jp))
                t["read"] = j.get("read_bytes")
                t["stored"] = j.get("stored")
                t["new"] = j.get("new")
                t["mode"] = j.get("read_mode", "")
            except (ValueError, AttributeError):
                pass
        groups.setdefault(base, []).append(t)
    # bytes for nbdcopy rows: from the matching backups
    def read_of(prefix):
        for k, v in groups.items():
            if k.startswith(prefix) and v[0].get("read"):
                return v[0]["read"]
        return None
    hint = {"nbdcopy-raw": "first-raw-", "nbdcopy-qcow2": "first-qcow2-", "nbdcopy-overlay": "incr"}
    print("| run | n | wall best / median (s) | CPU best / median (s) | peak RSS (MiB) | read (MiB) | "
          "stored (MiB) | MB/s best / median | load before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for base in sorted(groups):
        g = groups[base]
        walls = [x["wall"] for x in g]
        cpus = [x.get("user", 0) + x.get("sys", 0) for x in g]
        rss = max(x.get("rss_kb", 0) for x in g) // 1024
        rd = g[0].get("read") or (read_of(hint[base]) if base in hint else None)
        st = g[0].get("stored")
        mbps = ""
        if rd:
            mbps = "%.0f / %.0f" % (rd / min(walls) / 1e6, rd / statistics.median(walls) / 1e6)
        print("| %s | %d | %.2f / %.2f | %.2f / %.2f | %d | %s | %s | %s | %s |" % (
            base, len(g), min(walls), statistics.median(walls), min(cpus), statistics.median(cpus), rss,
            "%.1f" % (rd / 2**20) if rd else "", "%.1f" % (st / 2**20) if st else "", mbps,
            " ".join("%.1f" % x["load"] for x in g)))


if __name__ == "__main__":
    main()
