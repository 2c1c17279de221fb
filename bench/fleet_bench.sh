#!/bin/bash
# fleet_bench.sh: back up a datagen fleet (DIR/vmNN-ROLE/snap-K.raw) the way
# production does, once per chunker, and collect everything docs/benchmarks.md
# and docs/chunking.md report.
#
# For every VM, snap-0.raw becomes a qcow2 working image; `vmdedup backup
# qcow2:WORK.qcow2` takes the first (full) snapshot and leaves its enabled
# persistent dirty bitmap in the image. For K = 1, 2, ...: apply_diff_bench
# writes the difference snap-(K-1) -> snap-K into the image through a
# writable qemu-nbd (so QEMU's bitmap records the writes, 64 KiB pieces, zero
# pieces as NBD write-zeroes), then `vmdedup backup` runs again (incremental
# through the bitmap). One working image serves every chunker's repository:
# each repository keeps its own bitmap in it (names carry the repo id), so
# both chunkers back up exactly the same images, side by side, under the
# same machine load. Every backup runs under /usr/bin/time -v.
#
# Then: stats --json and snapshots --json of each repository; a restore of
# the last snapshot of VERIFY VMs compared (sha256) with the last raw image;
# global_dedup_bench (exact global dedup with each chunker) unless GLOBAL=0.
# bench/fleet_report.py OUT prints the tables.
#
# Usage: bench/fleet_bench.sh [OUT]      (run as a user that may write the fleet's
#        parent directories' siblings; needs qemu-img, qemu-nbd, python3)
# Environment:
#   FLEET=/var/tmp/vmdata/fleet   the datagen output
#   VMS="vm00-web vm01-db ..."    the VMs (default: every vm* directory)
#   NSNAPS=3                      snapshots per VM (snap-0 .. snap-(NSNAPS-1))
#   CHUNKERS="fixed cdc"          one repository each
#   LEVEL=                        --compression-level for init (default: vmdedup's)
#   VERIFY=all|one|none           restore-and-compare the last snapshot (default one)
#   GLOBAL=1                      run global_dedup_bench for each chunker
#   BUILD=/work/main/build        where vmdedup and the bench tools are built
set -euo pipefail

FLEET=${FLEET:-/var/tmp/vmdata/fleet}
BUILD=${BUILD:-/work/main/build}
NSNAPS=${NSNAPS:-3}
CHUNKERS=${CHUNKERS:-"fixed cdc"}
VERIFY=${VERIFY:-one}
GLOBAL=${GLOBAL:-1}
LEVEL=${LEVEL:-}
OUT=${1:-/var/tmp/vmbench/fleet-$(date +%Y%m%d-%H%M%S)}
if [[ -z "${VMS:-}" ]]; then
  VMS=$(cd "$FLEET" && ls -d vm*/ | tr -d / | tr '\n' ' ')
fi
SRC=$(cd "$(dirname "$0")/.." && pwd)

mkdir -p "$OUT"/{bin,work,time,snap,log,apply}
# Private copies: other engineers may rebuild the tree during the run.
cp "$BUILD/cli/vmdedup" "$BUILD/bench/apply_diff_bench" "$BUILD/bench/global_dedup_bench" "$OUT/bin/"
V="$OUT/bin/vmdedup"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)  nproc: $(nproc)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "mem: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel: $(uname -r)  qemu-nbd: $(qemu-nbd --version | head -1)"
  echo "git: $(git -C "$SRC" rev-parse --short HEAD) dirty: $(git -C "$SRC" status --short | grep -v '^??' | awk '{print $2}' | tr '\n' ' ')"
  echo "vmdedup sha256: $(sha256sum "$V" | cut -c1-16)"
  echo "fleet: $FLEET  vms: $VMS  snaps: $NSNAPS  chunkers: $CHUNKERS  level: ${LEVEL:-default}"
  echo "loadavg at start: $(cat /proc/loadavg)"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

log() { echo "[$(date +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $*" | tee -a "$OUT/progress.log"; }

for ch in $CHUNKERS; do
  rm -rf "$OUT/repo-$ch"
  "$V" init --chunker "$ch" ${LEVEL:+--compression-level "$LEVEL"} --json "$OUT/repo-$ch" > "$OUT/init-$ch.json"
done

backup() {  # CHUNKER VM K
  local ch=$1 vm=$2 k=$3 tag="$1-$2-$3"
  echo "$(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/time/$tag.load"
  /usr/bin/time -v -o "$OUT/time/$tag.txt" \
    "$V" backup -r "$OUT/repo-$ch" --vm "$vm" --disk vda --json "qcow2:$OUT/work/$vm.qcow2" \
    > "$OUT/snap/$tag.json" 2> "$OUT/log/$tag.err"
  log "backup $tag: $(head -1 "$OUT/log/$tag.err") wall $(awk -F': ' '/Elapsed/ {print $2}' "$OUT/time/$tag.txt")"
}

for ((k = 0; k < NSNAPS; k++)); do
  for vm in $VMS; do
    img="$OUT/work/$vm.qcow2"
    if ((k == 0)); then
      rm -f "$img"
      /usr/bin/time -f "%e s" -o "$OUT/apply/$vm-0.time" qemu-img convert -f raw -O qcow2 "$FLEET/$vm/snap-0.raw" "$img"
      log "converted $vm/snap-0.raw to qcow2 in $(cat "$OUT/apply/$vm-0.time")"
    else
      "$OUT/bin/apply_diff_bench" "$FLEET/$vm/snap-$((k - 1)).raw" "$FLEET/$vm/snap-$k.raw" "$img" \
        > "$OUT/apply/$vm-$k.json"
      log "applied snap-$((k - 1)) -> snap-$k to $vm: $(cat "$OUT/apply/$vm-$k.json")"
    fi
    for ch in $CHUNKERS; do backup "$ch" "$vm" "$k"; done
  done
done

for ch in $CHUNKERS; do
  "$V" stats -r "$OUT/repo-$ch" --json > "$OUT/stats-$ch.json"
  "$V" snapshots -r "$OUT/repo-$ch" --json > "$OUT/snapshots-$ch.jsonl"
  du -sb "$OUT/repo-$ch" "$OUT/repo-$ch"/vms/*/meta > "$OUT/du-$ch.txt"
done

last=$((NSNAPS - 1))
case "$VERIFY" in
  all) verify_vms=$VMS ;;
  one) verify_vms=$(echo $VMS | awk '{print $NF}') ;;
  *) verify_vms= ;;
esac
: > "$OUT/verify.txt"
for vm in $verify_vms; do
  want=$(sha256sum < "$FLEET/$vm/snap-$last.raw" | cut -d' ' -f1)
  for ch in $CHUNKERS; do
    r="$OUT/restore-$ch-$vm.raw"
    /usr/bin/time -v -o "$OUT/time/restore-$ch-$vm.txt" \
      "$V" restore -r "$OUT/repo-$ch" "$vm/vda/latest" --to "$r" --force -q
    got=$(sha256sum < "$r" | cut -d' ' -f1)
    verdict=$([[ "$got" == "$want" ]] && echo OK || echo MISMATCH)
    echo "$ch $vm/vda/latest vs snap-$last.raw: $verdict $got" | tee -a "$OUT/verify.txt"
    rm -f "$r"
  done
done

if [[ "$GLOBAL" == 1 ]]; then
  for ch in $CHUNKERS; do
    imgs=()
    for vm in $VMS; do
      for ((k = 0; k < NSNAPS; k++)); do imgs+=("$FLEET/$vm/snap-$k.raw"); done
    done
    log "global_dedup_bench --chunker $ch"
    /usr/bin/time -v -o "$OUT/time/global-$ch.txt" \
      "$OUT/bin/global_dedup_bench" --chunker "$ch" --json "$OUT/global-$ch.json" "${imgs[@]}" \
      > /dev/null 2> "$OUT/log/global-$ch.err"
  done
fi
echo "loadavg at end: $(cat /proc/loadavg)" >> "$OUT/env.txt"
log "done: $OUT"
