#!/usr/bin/env python3
"""fleet_report.py - tables from a bench/fleet_bench.sh output directory.

usage: fleet_report.py OUT [--analysis analysis.json] [--json FILE]

Reads OUT/snap/CH-VM-K.json (backup --json), OUT/time/CH-VM-K.txt
(/usr/bin/time -v), OUT/stats-CH.json, OUT/global-CH.json
(global_dedup_bench) and, for the fixed chunker, optionally analyze.py's
JSON as a second reference. Prints Markdown tables.

Dedup efficiency (DESIGN.md) = (logical - new) / (logical - unique_global),
without compression, where new = vmdedup's new block bytes and
unique_global = bytes stored by exact global dedup at the same chunking.
Two bases are shown: logical = virtual sizes (the definition) and
logical = non-zero bytes (zeros removed from both sides; stricter).
"""
import argparse
import glob
import json
import os
import re

MiB = 1 << 20


def mib(n):
    return "%.1f" % (n / MiB)


def parse_time(path):
    t = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("Elapsed (wall clock)"):
                v = line.split(": ", 1)[1]
                parts = [float(x) for x in v.split(":")]
                s = 0.0
                for p in parts:
                    s = s * 60 + p
                t["wall"] = s
            elif line.startswith("User time"):
                t["user"] = float(line.split(": ")[1])
            elif line.startswith("System time"):
                t["sys"] = float(line.split(": ")[1])
            elif line.startswith("Maximum resident set size"):
                t["rss_kb"] = int(line.split(": ")[1])
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--analysis")
    ap.add_argument("--json")
    a = ap.parse_args()
    out = a.out
    rows = {}
    for p in sorted(glob.glob(os.path.join(out, "snap", "*.json"))):
        m = re.match(r"(\w+)-(.+)-(\d+)\.json$", os.path.basename(p))
        ch, vm, k = m.group(1), m.group(2), int(m.group(3))
        with open(p) as f:
            s = json.load(f)
        t = parse_time(os.path.join(out, "time", "%s-%s-%d.txt" % (ch, vm, k)))
        lp = os.path.join(out, "time", "%s-%s-%d.load" % (ch, vm, k))
        s["load"] = open(lp).read().strip() if os.path.exists(lp) else ""
        s.update(t)
        rows.setdefault(ch, []).append((vm, k, s))
    chunkers = [c for c in ("fixed", "cdc") if c in rows] + [c for c in rows if c not in ("fixed", "cdc")]
    glob_ref = {}
    for ch in chunkers:
        p = os.path.join(out, "global-%s.json" % ch)
        if os.path.exists(p):
            with open(p) as f:
                glob_ref[ch] = json.load(f)
    analysis = None
    if a.analysis:
        with open(a.analysis) as f:
            analysis = json.load(f)
    summary = {}

    for ch in chunkers:
        g = glob_ref.get(ch)
        gimg = {}
        if g:
            for im in g["images"]:
                gimg[(im["vm"], im["snap"])] = im
        print("\n### Chunker `%s`: per snapshot (MiB; times in s)\n" % ch)
        print("| VM | snap | read mode | read | zero | segment (L1) | block (L2) | new | stored | meta | "
              "global-new (ref) | efficiency | wall | CPU | peak RSS | read MB/s | load |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        tot = {k: 0 for k in ("size", "read_bytes", "zero", "segment", "block", "cds", "new", "stored",
                              "metadata", "wall", "cpu", "new_blocks")}
        first = {"read_bytes": 0, "wall": 0.0, "cpu": 0.0}
        incr = {"read_bytes": 0, "wall": 0.0, "cpu": 0.0}
        rss = 0
        for vm, k, s in sorted(rows[ch], key=lambda r: (r[1], r[0])):
            cpu = s.get("user", 0) + s.get("sys", 0)
            for key in tot:
                if key == "cpu":
                    tot[key] += cpu
                elif key in s:
                    tot[key] += s[key]
            rss = max(rss, s.get("rss_kb", 0))
            bucket = first if s["read_mode"].startswith("full") else incr
            bucket["read_bytes"] += s["read_bytes"]
            bucket["wall"] += s.get("wall", 0)
            bucket["cpu"] += cpu
            ref = gimg.get((vm, k))
            eff = ""
            if ref:
                denom = s["size"] - ref["new_global"]
                eff = "%.1f%%" % (100.0 * (s["size"] - s["new"]) / denom) if denom else ""
            mbps = s["read_bytes"] / s["wall"] / 1e6 if s.get("wall") else 0
            print("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.2f | %.2f | %d MiB | %.0f | %s |" % (
                vm, k, "full" if s["read_mode"].startswith("full") else "incr", mib(s["read_bytes"]),
                mib(s["zero"]), mib(s["segment"]), mib(s["block"]), mib(s["new"]), mib(s["stored"]),
                mib(s["metadata"]), mib(ref["new_global"]) if ref else "-", eff, s.get("wall", 0), cpu,
                s.get("rss_kb", 0) // 1024, mbps, s["load"].split()[0] if s["load"] else ""))
        with open(os.path.join(out, "stats-%s.json" % ch)) as f:
            st = json.load(f)["total"]
        L = st["logical"]
        new = st["new"]
        res = {"chunker": ch, "logical": L, "nonzero_vmdedup": st["nonzero"], "zero": st["zero"],
               "segment": st["segment"], "block": st["block"], "cds": st["cds"], "new": new,
               "stored_containers": st["stored"], "metadata_store": st["metadata"],
               "metadata_written": tot["metadata"], "new_blocks": tot["new_blocks"],
               "left_after_l1": st["left_after_l1"], "left_after_l12": st["left_after_l12"],
               "left_after_l123": st["left_after_l123"], "wall_total": tot["wall"], "cpu_total": tot["cpu"],
               "peak_rss_kb": rss, "first": first, "incr": incr}
        if g:
            U, N, I = g["unique_global"], g["nonzero"], g["unique_inner_vm"]
            res.update({"ref_unique_global": U, "ref_nonzero": N, "ref_unique_inner_vm": I,
                        "ref_avg_block": g["avg_block"],
                        "eff_logical": (L - new) / (L - U), "eff_nonzero": (N - new) / (N - U),
                        "eff_vs_inner_vm_limit": (N - new) / (N - I)})
        if analysis and ch == "fixed":
            U2 = analysis["summary"]["unique_bytes_global"]
            res["analyze_unique_global"] = U2
            res["eff_logical_analyze"] = (L - new) / (L - U2)
        summary[ch] = res

    print("\n### Totals\n")
    print("| | " + " | ".join("`%s`" % c for c in chunkers) + " |")
    print("|---|" + "---|" * len(chunkers))

    def line(name, f):
        vals = []
        for c in chunkers:
            try:
                vals.append(f(summary[c]))
            except (KeyError, ZeroDivisionError):
                vals.append("-")
        print("| %s | %s |" % (name, " | ".join(vals)))

    line("logical (MiB)", lambda r: mib(r["logical"]))
    line("non-zero per vmdedup (MiB)", lambda r: mib(r["nonzero_vmdedup"]))
    line("L0 zero (MiB)", lambda r: mib(r["zero"]))
    line("L1 segment (MiB)", lambda r: mib(r["segment"]))
    line("L2 block (MiB)", lambda r: mib(r["block"]))
    line("L3 cds (MiB)", lambda r: mib(r["cds"]))
    line("new, uncompressed (MiB)", lambda r: mib(r["new"]))
    line("new blocks", lambda r: "%d" % r["new_blocks"])
    line("stored: containers (MiB)", lambda r: mib(r["stored_containers"]))
    line("metadata store on disk (MiB)", lambda r: mib(r["metadata_store"]))
    line("metadata written by backups (MiB)", lambda r: mib(r["metadata_written"]))
    line("ref: non-zero after chunking (MiB)", lambda r: mib(r["ref_nonzero"]))
    line("ref: exact global unique (MiB)", lambda r: mib(r["ref_unique_global"]))
    line("ref: inner-VM-only unique (MiB)", lambda r: mib(r["ref_unique_inner_vm"]))
    line("ref: average block (B)", lambda r: "%.0f" % r["ref_avg_block"])
    line("efficiency, logical basis", lambda r: "%.1f%%" % (100 * r["eff_logical"]))
    line("efficiency, non-zero basis", lambda r: "%.1f%%" % (100 * r["eff_nonzero"]))
    line("of the inner-VM-only limit (non-zero basis)", lambda r: "%.1f%%" % (100 * r["eff_vs_inner_vm_limit"]))
    line("efficiency vs analyze.py (logical)", lambda r: "%.1f%%" % (100 * r["eff_logical_analyze"]))
    line("left after L1 / L1+2 / L1+2+3", lambda r: "%.1f%% / %.1f%% / %.1f%%" % (
        r["left_after_l1"], r["left_after_l12"], r["left_after_l123"]))
    line("first backups: read MiB, wall s, CPU s", lambda r: "%s, %.1f, %.1f" % (
        mib(r["first"]["read_bytes"]), r["first"]["wall"], r["first"]["cpu"]))
    line("first backups: MB/s (read / wall)", lambda r: "%.0f" % (r["first"]["read_bytes"] / r["first"]["wall"] / 1e6))
    line("first backups: MB/s per CPU-second", lambda r: "%.0f" % (r["first"]["read_bytes"] / r["first"]["cpu"] / 1e6))
    line("incrementals: read MiB, wall s, CPU s", lambda r: "%s, %.1f, %.1f" % (
        mib(r["incr"]["read_bytes"]), r["incr"]["wall"], r["incr"]["cpu"]))
    line("all backups: wall s, CPU s", lambda r: "%.1f, %.1f" % (r["wall_total"], r["cpu_total"]))
    line("peak RSS of any backup (MiB)", lambda r: "%d" % (r["peak_rss_kb"] // 1024))
    vp = os.path.join(out, "verify.txt")
    if os.path.exists(vp):
        print("\nRestore checks:\n")
        for l in open(vp):
            print("    " + l.rstrip())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
