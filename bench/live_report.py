#!/usr/bin/env python3
"""live_report.py OUT: the tables of a bench/live_bench.sh run (markdown)."""
import glob
import json
import os
import re
import statistics
import sys

OUT = sys.argv[1]


def read(path):
    with open(os.path.join(OUT, path)) as f:
        return f.read()


def timev(name):
    """(wall s, user+sys s, max RSS MiB) from /usr/bin/time -v."""
    t = read("time/" + name)
    wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split("\n")[0]
    parts = [float(p) for p in wall.split(":")]
    secs = sum(p * 60 ** (len(parts) - 1 - i) for i, p in enumerate(parts))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", t).group(1))
    sys_ = float(re.search(r"System time \(seconds\): ([\d.]+)", t).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
    return secs, user + sys_, rss


def guest(name):
    return json.loads(read("json/%s.guest" % name))


def read_bytes(tool, name):
    if tool.startswith("vmdedup"):
        return sum(s["read_bytes"] for s in json.loads(read("json/" + name)))
    # virtnbdbackup prints its progress bar: "saving disk vda: ... 104M/107M"
    m = re.findall(r"/([\d.]+)([kMG])\s", read("log/" + name))
    if not m:
        return None
    v, unit = m[-1]
    return float(v) * {"k": 1e3, "M": 1e6, "G": 1e9}[unit]


def mb(x):
    return "–" if x is None else "%.1f" % (x / 1e6)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def speed():
    reps = sorted({int(p.rsplit("-", 1)[1]) for p in
                   (os.path.basename(f) for f in glob.glob(OUT + "/time/vmdedup-full-*"))})
    if not reps:
        return
    print("| run | wall s (median, min) | CPU s user+sys | QEMU CPU s | peak RSS MiB | read MB | stored MB (total) |")
    print("|---|---|---|---|---|---|---|")
    walls = {}
    for kind in ("full", "incr"):
        for tool in ("vmdedup", "virtnbdbackup"):
            rows = [(timev("%s-%s-%d" % (tool, kind, r)), guest("%s-%s-%d" % (tool, kind, r)),
                     int(read("json/%s-%s-%d.stored" % (tool, kind, r))),
                     read_bytes(tool, "%s-%s-%d" % (tool, kind, r))) for r in reps]
            w = [x[0][0] for x in rows]
            walls[(tool, kind)] = w
            print("| %s %s | %.2f, %.2f | %.2f | %.2f | %.0f | %s | %s |" % (
                tool, kind, med(w), min(w), med([x[0][1] for x in rows]),
                med([float(x[1]["qemu_cpu"]) for x in rows]), max(x[0][2] for x in rows),
                mb(med([x[3] for x in rows if x[3] is not None]) if rows[0][3] else None),
                mb(med([x[2] for x in rows]))))
        fl = [timev("nbdcopy-%s-%d" % ("churn" if kind == "incr" else "full", r)) for r in reps]
        walls[("nbdcopy", kind)] = [x[0] for x in fl]
        print("| nbdcopy floor %s | %.2f, %.2f | %.2f | – | %.0f | – | – |" % (
            kind, med([x[0] for x in fl]), min(x[0] for x in fl), med([x[1] for x in fl]),
            max(x[2] for x in fl)))
    print()
    for kind in ("full", "incr"):
        ours = walls[("vmdedup", kind)]
        print("- %s: virtnbdbackup / vmdedup wall time %.2fx (median), %.2fx (best of each); "
              "vmdedup / nbdcopy floor %.2fx (median), %.2fx (best)" % (
                  kind, med(walls[("virtnbdbackup", kind)]) / med(ours),
                  min(walls[("virtnbdbackup", kind)]) / min(ours),
                  med(ours) / med(walls[("nbdcopy", kind)]),
                  min(ours) / min(walls[("nbdcopy", kind)])))
    try:
        print("- vmdedup's restore of the first incremental against the guest's disk: %s"
              % read("json/restore-check").strip())
    except FileNotFoundError:
        pass
    print()


def writer():
    tools = [t for t in ("vmdedup", "vmdedup-normal", "vmdedup-idle", "virtnbdbackup")
             if glob.glob(OUT + "/json/writer-%s-full-*.guest" % t)]
    if not tools:
        return
    print("| tool | writer idle MiB/s (3 windows a run) | full backup: s; writer % of idle; "
          "MiB lost | incremental: s; writer % of idle; MiB lost | backup CPU s full / incr |")
    print("|---|---|---|---|---|")
    for t in tools:
        reps = sorted(int(f.rsplit("-", 1)[1].split(".")[0])
                      for f in glob.glob(OUT + "/json/writer-%s-full-*.guest" % t))
        idle = {}
        for r in reps:
            w = [guest("writer-%s-idle%d-%d" % (t, i, r)) for i in (1, 2, 3)]
            idle[r] = sum(g["writes_mib"] for g in w) / sum(float(g["seconds"]) for g in w)
        cells = []
        cpu = []
        for kind in ("full", "incr"):
            secs, pct, lost, c = [], [], [], []
            for r in reps:
                name = "writer-%s-%s-%d" % (t, kind, r)
                g = guest(name)
                sec = float(g["seconds"])
                secs.append(sec)
                pct.append("%.0f" % (100 * g["writes_mib"] / sec / idle[r]))
                lost.append("%.0f" % (idle[r] * sec - g["writes_mib"]))  # vs the idle rate
                c.append(timev(name)[1])
            cells.append("%s; %s %%; %s" % ("/".join("%.1f" % x for x in secs), "/".join(pct),
                                            "/".join(lost)))
            cpu.append("/".join("%.1f" % x for x in c))
        print("| %s | %s | %s | %s | %s / %s |" % (
            t, "/".join("%.0f" % idle[r] for r in reps), cells[0], cells[1], cpu[0], cpu[1]))
    print()
    print("(one value a run, runs separated by /; MiB lost: what the writer would have written "
          "at that run's idle rate during the backup, less what it wrote)")
    print()


print("```\n" + read("env.txt").strip() + "\n```\n")
speed()
writer()
