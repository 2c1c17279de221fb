#!/bin/bash
# throughput_bench.sh: the throughput and memory targets of docs/benchmarks.md.
#
#   first  a first (full) backup of one VM image from a warm page cache, raw
#          and qcow2, for each CONFIGS entry CHUNKER:ZSTDLEVEL (a fresh
#          repository each run), REPEAT times, runs interleaved; the floor: nbdcopy of the same image from qemu-nbd
#          to null: (reads the same allocated extents, stores nothing).
#   incr   an incremental of that image after a seeded random churn of
#          CHURN % of its allocated data in 64 KiB pieces, written through
#          qemu-nbd so that vmdedup's persistent bitmap records it; REPEAT
#          times from the same saved state. The floor: the same churn written
#          into a qcow2 overlay of the pristine image, the overlay exported
#          alone (backing: null, so only the churned clusters are data) and
#          read by nbdcopy to null:. Also the fixed cost of the qemu-img calls
#          an image-file backup makes.
#   big    peak RSS on a BIG (default 64 GiB) sparse qcow2 holding every VM's
#          snap-0 at offsets 0, BIG/4, BIG/2, 3*BIG/4: full backup, then an
#          incremental after a CHURN % churn of the first image's range
#          (CHURN % of the first VM's allocated bytes, inside its range).
#   bigctl controls for "big" (run after it): VM's data alone in a BIG image
#          (only the disk size differs from "first"), and "big" plus more
#          random data than the in-run index of new blocks holds.
#
# Usage: bench/throughput_bench.sh [OUT]
# Environment: FLEET, VM (default vm02-dev: the most data), PARTS="first incr big" (or bigctl),
#   CONFIGS="fixed:1 fixed:3 fixed:-1 cdc:1", REPEAT=3, CHURN=5, SEED=7, BIG=64G,
#   BUILD=/work/main/build, VMDEDUP=$BUILD/cli/vmdedup (another vmdedup binary to measure),
#   MIN_FREE (GiB that must be free under OUT; by default the sum for PARTS: see below).
# Every timed command runs under /usr/bin/time -v; the load average is logged
# before each. bench/throughput_report.py OUT prints the tables.
set -euo pipefail

FLEET=${FLEET:-/var/tmp/vmdata/fleet}
BUILD=${BUILD:-/work/main/build}
VM=${VM:-vm02-dev}
PARTS=${PARTS:-"first incr big"}
CONFIGS=${CONFIGS:-"fixed:1 fixed:3 fixed:-1 cdc:1"}
REPEAT=${REPEAT:-3}
CHURN=${CHURN:-5}
SEED=${SEED:-7}
BIG=${BIG:-64G}
OUT=${1:-/var/tmp/vmbench/tput-$(date +%Y%m%d-%H%M%S)}
SRC=$(cd "$(dirname "$0")/.." && pwd)
RAW="$FLEET/$VM/snap-0.raw"

mkdir -p "$OUT"/{bin,time,json,log}
# A full disk turns every backup into a NoSpace failure and the figures into
# nonsense; refuse to start without room. MIN_FREE (GiB) defaults to the
# sum of what the parts leave or need at once (estimates from earlier runs):
# first and incr 6 (OUT/work holds about 5.5 GiB after them), big 12 (a 64
# GiB sparse image with 4.6 GiB of data, its repositories, a restore),
# bigctl 10.
if [[ -z ${MIN_FREE:-} ]]; then
  MIN_FREE=0
  [[ " $PARTS " == *" first "* || " $PARTS " == *" incr "* ]] && MIN_FREE=$((MIN_FREE + 6))
  [[ " $PARTS " == *" big "* ]] && MIN_FREE=$((MIN_FREE + 12))
  [[ " $PARTS " == *" bigctl "* ]] && MIN_FREE=$((MIN_FREE + 10))
fi
if [[ ! $MIN_FREE =~ ^[0-9]+$ ]]; then
  echo "throughput_bench: MIN_FREE must be a whole number of GiB, not '$MIN_FREE'" >&2
  exit 2
fi
free_gib=$(( $(df --output=avail -B1 "$OUT" | tail -1) >> 30 ))
if (( free_gib < MIN_FREE )); then
  echo "throughput_bench: only $free_gib GiB free under $OUT; need $MIN_FREE (MIN_FREE=...)" >&2
  exit 1
fi
cp "${VMDEDUP:-$BUILD/cli/vmdedup}" "$OUT/bin/vmdedup"
cp "$BUILD/bench/apply_diff_bench" "$OUT/bin/"
V="$OUT/bin/vmdedup"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nproc: $(nproc)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "mem: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "git: $(git -C "$SRC" rev-parse --short HEAD) dirty: $(git -C "$SRC" status --short | grep -v '^??' | awk '{print $2}' | tr '\n' ' ')"
  echo "vmdedup sha256: $(sha256sum "$V" | cut -c1-16)  nbdcopy: $(nbdcopy --version | head -1)"
  echo "vm: $VM  parts: $PARTS  configs: $CONFIGS  repeat: $REPEAT  churn: $CHURN%  seed: $SEED  big: $BIG"
  echo "loadavg at start: $(cat /proc/loadavg)"
} >> "$OUT/env.txt"  # appended: several PARTS runs may share one OUT
cat "$OUT/env.txt"

log() { echo "[$(date +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $*" | tee -a "$OUT/progress.log"; }
# timed TAG CMD...: runs CMD under /usr/bin/time -v, stdout to json/TAG, stderr to log/TAG.
timed() {
  local tag=$1
  shift
  cut -d' ' -f1-3 /proc/loadavg > "$OUT/time/$tag.load"
  /usr/bin/time -v -o "$OUT/time/$tag.txt" "$@" > "$OUT/json/$tag" 2> "$OUT/log/$tag"
  log "$tag: wall $(awk -F': ' '/Elapsed/ {print $2}' "$OUT/time/$tag.txt")" \
      "rss $(awk -F': ' '/Maximum resident/ {print $2}' "$OUT/time/$tag.txt") KiB"
}
warm() { cat "$@" > /dev/null; }

W="$OUT/work"
mkdir -p "$W"
qcow="$W/$VM-0.qcow2"
if [[ ! -f "$qcow" ]]; then
  qemu-img convert -f raw -O qcow2 "$RAW" "$qcow"
  cp --sparse=always "$qcow" "$W/pristine.qcow2"
fi

if [[ " $PARTS " == *" first "* ]]; then
  warm "$RAW" "$qcow"
  for r in $(seq 1 "$REPEAT"); do
    timed "nbdcopy-raw-$r" nbdcopy -- [ qemu-nbd -r -f raw "$RAW" ] null:
    timed "nbdcopy-qcow2-$r" nbdcopy -- [ qemu-nbd -r -f qcow2 "$qcow" ] null:
    for cfg in $CONFIGS; do
      ch=${cfg%%:*} lvl=${cfg#*:}
      for fmt in raw qcow2; do
        repo="$W/repo-first"
        rm -rf "$repo"
        "$V" init --chunker "$ch" --compression-level "$lvl" "$repo" > /dev/null
        img=$([[ $fmt == raw ]] && echo "$RAW" || echo "$qcow")
        tag="first-$fmt-$ch-L$lvl-$r"
        timed "$tag" "$V" backup -r "$repo" --vm "$VM" --disk vda --json "$fmt:$img"
        # A qcow2 backup leaves a bitmap of this repository in the image.
        if [[ $fmt == qcow2 ]]; then qemu-img bitmap --remove "$qcow" "$(jq -r .bitmap "$OUT/json/$tag")"; fi
      done
    done
  done
  rm -rf "$W/repo-first"
fi

if [[ " $PARTS " == *" incr "* ]]; then
  # State before the incremental: a repository with the full backup of the
  # pristine image, and the image churned through qemu-nbd.
  rm -rf "$W/incr-repo.saved" "$W/incr.saved.qcow2"
  cp --sparse=always "$W/pristine.qcow2" "$W/incr.qcow2"
  "$V" init "$W/incr-repo.saved" > /dev/null
  "$V" backup -r "$W/incr-repo.saved" --vm "$VM" --disk vda -q "qcow2:$W/incr.qcow2"
  "$OUT/bin/apply_diff_bench" --churn "$CHURN" --seed "$SEED" --alloc-from "$RAW" "$W/incr.qcow2" \
    > "$OUT/json/churn-apply" 2> "$OUT/log/churn-apply"
  mv "$W/incr.qcow2" "$W/incr.saved.qcow2"
  qemu-img info "$W/incr.saved.qcow2" > "$OUT/log/incr-image-info"
  # The floor: the same churn in an overlay exported without its backing file.
  rm -f "$W/ov.qcow2"
  qemu-img create -q -f qcow2 -b "$W/pristine.qcow2" -F qcow2 "$W/ov.qcow2"
  "$OUT/bin/apply_diff_bench" --churn "$CHURN" --seed "$SEED" --alloc-from "$RAW" "$W/ov.qcow2" \
    > "$OUT/json/churn-apply-overlay" 2> /dev/null
  ovjson='json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"'"$W/ov.qcow2"'"}}'
  qemu-img map --output=json "$ovjson" > "$OUT/json/overlay-map"
  for r in $(seq 1 "$REPEAT"); do
    rm -rf "$W/incr-repo"
    cp -a "$W/incr-repo.saved" "$W/incr-repo"
    cp --sparse=always "$W/incr.saved.qcow2" "$W/incr.qcow2"
    # Write the copies back now: otherwise the first flush or fsync of the
    # timed run (qemu-img bitmap --add flushes the image) pays for them.
    sync
    warm "$W/incr.qcow2" "$W/ov.qcow2"
    timed "nbdcopy-overlay-$r" nbdcopy -- [ qemu-nbd -r "$ovjson" ] null:
    timed "incr-$r" "$V" backup -r "$W/incr-repo" --vm "$VM" --disk vda --json "qcow2:$W/incr.qcow2"
    # The fixed cost of an image-file backup: qemu-img info and bitmap edits.
    timed "qemu-img-info-$r" qemu-img info --output=json "$W/incr.qcow2"
    timed "qemu-img-bitmap-add-$r" qemu-img bitmap --add "$W/incr.qcow2" bench.tmp
    timed "qemu-img-bitmap-remove-$r" qemu-img bitmap --remove "$W/incr.qcow2" bench.tmp
  done
fi

if [[ " $PARTS " == *" big "* ]]; then
  big="$W/big.qcow2"
  rm -f "$big"
  qemu-img create -q -f qcow2 "$big" "$BIG"
  bytes=$(qemu-img info --output=json "$big" | jq .\"virtual-size\")
  i=0
  first_raw=
  for d in "$FLEET"/vm*/; do
    first_raw=${first_raw:-$d/snap-0.raw}
    "$OUT/bin/apply_diff_bench" --offset $((i * bytes / 4)) none "$d/snap-0.raw" "$big" \
      >> "$OUT/json/big-fill" 2> /dev/null
    i=$((i + 1))
    ((i < 4)) || break
  done
  qemu-img map --output=json "$big" | jq '[.[] | select(.data) | .length] | add' > "$OUT/json/big-allocated"
  rm -rf "$W/big-repo"
  "$V" init "$W/big-repo" > /dev/null
  warm "$big"
  timed "big-full" "$V" backup -r "$W/big-repo" --vm big --disk vda --json "qcow2:$big"
  "$OUT/bin/apply_diff_bench" --churn "$CHURN" --seed "$SEED" --alloc-from "$first_raw" "$big" \
    > "$OUT/json/big-churn" 2> /dev/null
  timed "big-incr" "$V" backup -r "$W/big-repo" --vm big --disk vda --json "qcow2:$big"
  timed "big-restore" "$V" restore -r "$W/big-repo" big/vda/latest --to "$W/big-restore.raw" --force -q
  rm -f "$W/big-restore.raw"
  du -sb "$W/big-repo" > "$OUT/json/big-du"
fi
if [[ " $PARTS " == *" bigctl "* ]]; then
  # Controls for "big": (a) the same data as the 2 GiB image of VM, placed at
  # BIG/2 in a BIG image: only the disk size differs from first-qcow2-*;
  # (b) a BIG image with every VM's snap-0 as in "big" plus 100 % of VM's
  # allocated size as random data at 5*BIG/8: more new blocks than the
  # in-run index holds, to show where memory stops growing.
  ctl="$W/bigctl.qcow2"
  rm -f "$ctl"
  qemu-img create -q -f qcow2 "$ctl" "$BIG"
  bytes=$(qemu-img info --output=json "$ctl" | jq .\"virtual-size\")
  "$OUT/bin/apply_diff_bench" --offset $((bytes / 2)) none "$RAW" "$ctl" > "$OUT/json/bigctl-fill" 2> /dev/null
  rm -rf "$W/bigctl-repo"
  "$V" init "$W/bigctl-repo" > /dev/null
  warm "$ctl"
  timed "bigctl-samedata-full" "$V" backup -r "$W/bigctl-repo" --vm ctl --disk vda --json "qcow2:$ctl"
  rm -f "$ctl"
  [[ -f "$W/big.qcow2" ]] || { echo "bigctl needs the big part first" >&2; exit 1; }
  cp --sparse=always "$W/big.qcow2" "$ctl"
  for b in $(qemu-img info --output=json "$ctl" | jq -r '.["format-specific"].data.bitmaps[]?.name'); do
    qemu-img bitmap --remove "$ctl" "$b"
  done
  "$OUT/bin/apply_diff_bench" --churn 100 --seed "$SEED" --alloc-from "$RAW" --offset $((bytes / 8 * 5)) "$ctl" \
    > "$OUT/json/bigctl-random" 2> /dev/null
  rm -rf "$W/bigctl-repo"
  "$V" init "$W/bigctl-repo" > /dev/null
  sync
  warm "$ctl"
  timed "bigctl-moredata-full" "$V" backup -r "$W/bigctl-repo" --vm ctl --disk vda --json "qcow2:$ctl"
  rm -rf "$ctl" "$W/bigctl-repo"
fi
echo "loadavg at end: $(cat /proc/loadavg)" >> "$OUT/env.txt"
log "done: $OUT"
