#!/bin/bash
# cds_bench.sh: level 3 (the common data set) on a datagen fleet, for several
# CDS budgets, with and without seeding from the template image the VMs were
# cloned from. Results: bench/cds_report.py OUT (docs/benchmarks.md).
#
# Protocol (one repository, cdc chunker, everything through the vmdedup CLI):
#  1. Training: every VM's snapshots snap-0..N-1 are backed up as VM "t-VM"
#     the way production does (qcow2 working image, persistent dirty bitmap,
#     apply_diff_bench writes snap-(K-1) -> snap-K, incremental backups).
#  2. For each configuration (budget B% of the unique data, seed yes/no):
#     `vmdedup cds build --fraction B [--seed raw:TEMPLATE] --vm t-...`
#     publishes a new CDS version counted over the training VMs only; then
#     the same snapshots are backed up again as VMs "CFG-VM" (fresh working
#     images), which now look up their level-2 survivors in that version.
#     Those measured VMs are what a fleet stores in steady state with that
#     CDS: their own new blocks plus the CDS version. They are deleted after
#     their numbers are recorded (disk space); the CDS versions stay.
#  3. global_dedup_bench: exact global dedup over the same images with the
#     same chunker (the reference for dedup efficiency).
#
# Usage: bench/cds_bench.sh [OUT]
# Environment:
#   FLEET=/var/tmp/vmdata/fleet8      datagen output (DIR/vmNN-ROLE/snap-K.raw)
#   TEMPLATE=/var/tmp/datagen-cache/template-bookworm-default-2147483648.raw
#   NSNAPS=3  BUDGETS="0.5 1 2 5"  SEEDING="no yes"   (and "only": the CDS is
#                                     counted from the template alone, as for a
#                                     cloud that knows its images but has no backups)
#   BUILD=/work/main/build            vmdedup and the bench tools (Release)
#   REUSE=1                           OUT holds a finished run: keep its repository
#                                     and training VMs, run only the new configurations
set -euo pipefail

FLEET=${FLEET:-/var/tmp/vmdata/fleet8}
TEMPLATE=${TEMPLATE:-/var/tmp/datagen-cache/template-bookworm-default-2147483648.raw}
BUILD=${BUILD:-/work/main/build}
NSNAPS=${NSNAPS:-3}
BUDGETS=${BUDGETS:-"0.5 1 2 5"}
SEEDING=${SEEDING:-"no yes"}
OUT=${1:-/var/tmp/vmbench/cds-$(date +%Y%m%d-%H%M%S)}
VMS=$(cd "$FLEET" && ls -d vm*/ | tr -d / | tr '\n' ' ')
SRC=$(cd "$(dirname "$0")/.." && pwd)

REUSE=${REUSE:-0}
mkdir -p "$OUT"/{bin,work,time,snap,log,apply,build}
if [[ "$REUSE" != 1 ]]; then
  cp "$BUILD/cli/vmdedup" "$BUILD/bench/apply_diff_bench" "$BUILD/bench/global_dedup_bench" "$OUT/bin/"
fi
V="$OUT/bin/vmdedup"
REPO="$OUT/repo"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)  nproc: $(nproc)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "git: $(git -C "$SRC" rev-parse --short HEAD) dirty: $(git -C "$SRC" status --short | grep -v '^??' | awk '{print $2}' | tr '\n' ' ')"
  echo "fleet: $FLEET  vms: $VMS  snaps: $NSNAPS  budgets: $BUDGETS  seeding: $SEEDING"
  echo "template: $TEMPLATE"
  echo "loadavg at start: $(cat /proc/loadavg)"
} >> "$OUT/env.txt"
cat "$OUT/env.txt"

log() { echo "[$(date +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $*" | tee -a "$OUT/progress.log"; }

if [[ "$REUSE" != 1 ]]; then
  rm -rf "$REPO"
  "$V" init --json "$REPO" > "$OUT/init.json"
fi

# back_up_fleet PREFIX: all snapshots of every VM as VMs PREFIX-VM.
back_up_fleet() {
  local prefix=$1
  for ((k = 0; k < NSNAPS; k++)); do
    for vm in $VMS; do
      local img="$OUT/work/$vm.qcow2" tag="$prefix-$vm-$k"
      if ((k == 0)); then
        rm -f "$img"
        qemu-img convert -f raw -O qcow2 "$FLEET/$vm/snap-0.raw" "$img"
      else
        "$OUT/bin/apply_diff_bench" "$FLEET/$vm/snap-$((k - 1)).raw" "$FLEET/$vm/snap-$k.raw" \
          "$img" > "$OUT/apply/$tag.json"
      fi
      /usr/bin/time -v -o "$OUT/time/$tag.txt" \
        "$V" backup -r "$REPO" --vm "$prefix-$vm" --disk vda --json "qcow2:$img" \
        > "$OUT/snap/$tag.json" 2> "$OUT/log/$tag.err"
      log "backup $tag: $(head -1 "$OUT/log/$tag.err") wall $(awk -F': ' '/Elapsed/ {print $2}' "$OUT/time/$tag.txt")"
    done
  done
}

[[ "$REUSE" == 1 ]] || back_up_fleet t
training_vms=()
for vm in $VMS; do training_vms+=(--vm "t-$vm"); done

for seed in $SEEDING; do
  for b in $BUDGETS; do
    cfg="b${b}-seed${seed}"
    seed_args=()
    count_vms=("${training_vms[@]}")
    [[ "$seed" != no ]] && seed_args=(--seed "raw:$TEMPLATE")
    # One VM alone makes no block popular: only the seed's blocks are candidates.
    [[ "$seed" == only ]] && count_vms=("${training_vms[@]:0:2}")
    /usr/bin/time -v -o "$OUT/time/build-$cfg.txt" \
      "$V" cds build -r "$REPO" --fraction "$b" "${seed_args[@]}" "${count_vms[@]}" --json \
      > "$OUT/build/$cfg.json" 2> "$OUT/log/build-$cfg.err"
    log "cds build $cfg: $(cat "$OUT/build/$cfg.json")"
    back_up_fleet "$cfg"
    "$V" stats -r "$REPO" --json > "$OUT/stats-$cfg.json"
    for vm in $VMS; do rm -rf "$REPO/vms/$cfg-$vm"; done
  done
done
"$V" cds status -r "$REPO" --json > "$OUT/cds-status.json"
"$V" stats -r "$REPO" --json > "$OUT/stats-final.json"

imgs=()
for vm in $VMS; do
  for ((k = 0; k < NSNAPS; k++)); do imgs+=("$FLEET/$vm/snap-$k.raw"); done
done
log "global_dedup_bench --chunker cdc"
"$OUT/bin/global_dedup_bench" --chunker cdc --json "$OUT/global.json" "${imgs[@]}" \
  > /dev/null 2> "$OUT/log/global.err"
echo "loadavg at end: $(cat /proc/loadavg)" >> "$OUT/env.txt"
log "done: $OUT"
