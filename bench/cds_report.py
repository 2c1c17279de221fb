#!/usr/bin/env python3
"""cds_report.py OUT: the tables of a bench/cds_bench.sh run (docs/benchmarks.md).

Per configuration (CDS budget, seeded or not) over the measured VMs (backed
up after that CDS version was published):
  - data left after level 1, 1+2, 1+2+3 (% of non-zero data; CLOUD 2012 Fig. 4)
  - stored = new block bytes + the CDS version's block bytes (uncompressed,
    the same unit as exact global dedup), and compressed (containers + CDS)
  - dedup efficiency = our saving / exact global dedup's saving, each over
    its own count of non-zero bytes (the two agree to within a few 0.1 %)
  - the CDS version: blocks, bytes, index memory, build time and peak RSS
The training VMs ("t-", levels 0-2 only) are the no-CDS baseline.
"""
import glob
import json
import os
import re
import sys


def load_snaps(out, prefix):
    snaps = []
    for path in sorted(glob.glob(os.path.join(out, "snap", prefix + "-vm*-*.json"))):
        rest = os.path.basename(path)[len(prefix) + 1:]
        if not re.fullmatch(r"vm\d+-[a-z]+-\d+\.json", rest):
            continue
        with open(path) as f:
            text = f.read().strip()
        if text:
            snaps.append(json.loads(text))
    return snaps


def time_field(path, name):
    try:
        with open(path) as f:
            for line in f:
                if name in line:
                    return line.split(": ", 1)[1].strip()
    except OSError:
        pass
    return "?"


def totals(snaps):
    t = {k: sum(s[k] for s in snaps) for k in ("size", "zero", "segment", "block", "cds", "new", "stored")}
    t["nonzero"] = t["size"] - t["zero"]
    t["n"] = len(snaps)
    return t


def pct(a, b):
    return 100.0 * a / b if b else 0.0


def main():
    out = sys.argv[1]
    with open(os.path.join(out, "global.json")) as f:
        g = json.load(f)
    g_saving = 1 - g["unique_global"] / g["nonzero"]
    gib = 1 << 30
    print(f"exact global dedup ({g['chunker']}): non-zero {g['nonzero'] / gib:.2f} GiB, unique "
          f"{g['unique_global'] / gib:.3f} GiB ({pct(g['unique_global'], g['nonzero']):.1f} % left), "
          f"inner-VM only {pct(g['unique_inner_vm'], g['nonzero']):.1f} % left")
    print()
    print("| config | snaps | left L1 | left L1+2 | left L1+2+3 | new | CDS blocks | CDS bytes "
          "| stored (new+CDS) | efficiency | compressed (own+CDS) | index | build | build RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [("no CDS (training VMs)", "t", None)]
    for path in sorted(glob.glob(os.path.join(out, "build", "*.json")),
                       key=lambda p: (["seedno", "seedyes", "seedonly"].index(
                           re.search(r"-(seed\w+)\.json$", p).group(1)),
                           float(re.search(r"b([\d.]+)-", p).group(1)))):
        cfg = os.path.basename(path)[:-5]
        rows.append((cfg, cfg, path))
    for label, prefix, build_path in rows:
        snaps = load_snaps(out, prefix)
        if not snaps:
            continue
        t = totals(snaps)
        b = {}
        if build_path:
            with open(build_path) as f:
                text = f.read().strip()
            b = json.loads(text) if text else {}
        cds_raw = b.get("raw_bytes", 0)
        cds_stored = b.get("stored_bytes", 0)
        ours = t["new"] + cds_raw
        saving = 1 - ours / t["nonzero"]
        eff = saving / g_saving
        build = ""
        rss = ""
        if build_path:
            build = f"{b.get('duration_ms', 0) / 1000:.1f} s"
            kb = time_field(os.path.join(out, "time", f"build-{prefix}.txt"), "Maximum resident")
            rss = f"{int(kb) / 1024:.0f} MiB" if kb.isdigit() else "?"
        print(f"| {label} | {t['n']} | {pct(t['block'] + t['cds'] + t['new'], t['nonzero']):.1f} % "
              f"| {pct(t['cds'] + t['new'], t['nonzero']):.1f} % | {pct(t['new'], t['nonzero']):.1f} % "
              f"| {t['new'] / gib:.3f} GiB | {b.get('blocks', 0)} | {cds_raw / gib:.3f} GiB "
              f"| {ours / gib:.3f} GiB ({pct(ours, t['nonzero']):.1f} %) | **{100 * eff:.1f} %** "
              f"| {(t['stored'] + cds_stored) / gib:.3f} GiB | {b.get('index_memory', 0) / (1 << 20):.2f} MiB "
              f"| {build} | {rss} |")


if __name__ == "__main__":
    main()
