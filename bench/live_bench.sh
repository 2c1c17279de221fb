#!/bin/bash
# live_bench.sh: the live-backup benchmark of docs/benchmarks.md (issue 3).
#
# A running guest (Debian kernel + busybox initramfs, KVM when it works, TCG
# otherwise) whose 2 GiB virtio disk is a qcow2 copy of a datagen image (VM's
# snap-0). Side by side, REPEAT times, interleaved:
#   vmdedup        QEMU started directly; `vmdedup backup qemu:QMP` full, then
#                  CHURN_MIB of churn, then the incremental.
#   virtnbdbackup  the same guest as a libvirt domain; `virtnbdbackup -l full`
#                  then `-l inc` (-z: lz4, its compression) after the same churn.
# The churn: CHURN_MIB of random data in 64 KiB pieces at seeded places inside
# the image's allocated extents, written through the guest's virtio disk with
# the monitor's qemu-io (bench/live_churn.py), identical for both tools.
# The floor: nbdcopy to null: of the same churn's clusters (written into a
# qcow2 overlay of the image, the overlay exported alone by qemu-nbd), and of
# the whole image (for the full backup).
# Every backup runs under /usr/bin/time -v; QEMU's CPU seconds during it are
# read from /proc. The first repetition restores vmdedup's incremental and
# compares it with the guest's disk.
# Then the guest's writer: the guest boots with writer=1 and writes 16 MiB at
# a time (random data, O_DIRECT) over the last 256 MiB of its disk forever;
# its throughput is counted over WINDOW seconds without a backup, during the
# full backup, again without, and during the incremental, for each tool
# (vmdedup at its default --priority low, at normal and at idle), WREPEAT
# times, interleaved.
#
# Usage: bench/live_bench.sh [OUT]
# Environment: FLEET (default /var/tmp/vmdata/fleet), VM (default vm02-dev),
#   CHURN_MIB=102 (5 % of 2 GiB), REPEAT=3, WINDOW=15, PARTS="speed writer",
#   WREPEAT=2, WRITER_TOOLS="vmdedup vmdedup-normal vmdedup-idle virtnbdbackup",
#   KEEP_WORK=1 (keep OUT/work: images, repositories; about 4 GB),
#   BUILD=/work/main/build. Needs (apt-get install) virtnbdbackup
#   libvirt-daemon-system qemu-system-x86 qemu-utils libnbd-bin
#   linux-image-amd64 busybox-static; run as root (libvirt's system
#   instance: virtlogd and libvirtd are started when not running).
# bench/live_report.py OUT prints the tables.
set -euo pipefail

FLEET=${FLEET:-/var/tmp/vmdata/fleet}
VM=${VM:-vm02-dev}
CHURN_MIB=${CHURN_MIB:-102}
REPEAT=${REPEAT:-3}
WINDOW=${WINDOW:-15}
PARTS=${PARTS:-"speed writer"}
WREPEAT=${WREPEAT:-2}
WRITER_TOOLS=${WRITER_TOOLS:-"vmdedup vmdedup-normal vmdedup-idle virtnbdbackup"}
BUILD=${BUILD:-/work/main/build}
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/var/tmp/vmbench/live-$(date +%Y%m%d-%H%M%S)}
RAW=$FLEET/$VM/snap-0.raw
DOM=vmdedup-bench

for tool in virtnbdbackup virsh libvirtd qemu-system-x86_64 nbdcopy busybox; do
  command -v "$tool" > /dev/null || {
    echo "live_bench: $tool is missing: apt-get install virtnbdbackup libvirt-daemon-system" \
      "qemu-system-x86 qemu-utils libnbd-bin busybox-static linux-image-amd64" >&2
    exit 2
  }
done
[ -r "$RAW" ] || { echo "live_bench: no image $RAW (make one with ../shared/datagen)" >&2; exit 2; }
kernel=$(ls /boot/vmlinuz-* 2> /dev/null | sort -V | tail -1)
[ -n "$kernel" ] || { echo "live_bench: no kernel in /boot: apt-get install linux-image-amd64" >&2; exit 2; }
accel=tcg domtype=qemu
[ -w /dev/kvm ] && accel=kvm domtype=kvm

mkdir -p "$OUT"/{bin,time,json,log,work}
chmod 755 "$OUT" "$OUT/work"  # libvirt's QEMU (user libvirt-qemu) reads kernel, initrd, churn
W=$OUT/work
cp "$BUILD/cli/vmdedup" "$OUT/bin/vmdedup"
V=$OUT/bin/vmdedup
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nproc: $(nproc)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "mem: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)  accel: $accel"
  echo "git: $(git -C "$SRC" rev-parse --short HEAD) dirty: $(git -C "$SRC" status --short | grep -v '^??' | awk '{print $2}' | tr '\n' ' ')"
  echo "vmdedup sha256: $(sha256sum "$V" | cut -c1-16)  virtnbdbackup: $(virtnbdbackup --version 2>&1)" \
    " qemu: $(qemu-system-x86_64 --version | head -1)  nbdcopy: $(nbdcopy --version | head -1)"
  echo "vm: $VM  churn: $CHURN_MIB MiB  repeat: $REPEAT  window: $WINDOW s  parts: $PARTS" \
    " writer repeat: $WREPEAT  writer tools: $WRITER_TOOLS"
  echo "loadavg at start: $(cat /proc/loadavg)"
} >> "$OUT/env.txt"
cat "$OUT/env.txt"
log() { echo "[$(date +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $*" | tee -a "$OUT/progress.log"; }

# --- the guest -------------------------------------------------------------

make_initrd() {  # busybox initramfs; /init runs the writer when writer=1
  local r=$W/initramfs version=${kernel#/boot/vmlinuz-}
  rm -rf "$r"
  mkdir -p "$r"/{bin,dev,proc,sys,tmp,mods}
  cp /bin/busybox "$r/bin/busybox"
  : > "$r/mods/order"
  for m in $(modprobe -S "$version" -a --show-depends virtio_pci virtio_blk |
    awk '$1 == "insmod" {print $2}'); do
    cp "$m" "$r/mods/"
    echo "/mods/$(basename "$m")" >> "$r/mods/order"
  done
  cat > "$r/init" << 'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
for m in $(cat /mods/order); do insmod $m 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if grep -q writer=1 /proc/cmdline; then
  dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 2>/dev/null
  base=$(($(cat /sys/block/vda/size) / 2048 - 256))
  echo GUEST READY
  i=0
  while true; do
    dd if=/tmp/pattern of=/dev/vda bs=1M count=16 seek=$((base + (i % 16) * 16)) \
      oflag=direct conv=notrunc 2>/dev/null || { echo WRITE FAILED; break; }
    i=$((i+1))
    echo WROTE $i
  done
else
  echo GUEST READY
fi
sleep 1000000
INIT
  chmod 755 "$r/init"
  (cd "$r" && find . | busybox cpio -o -H newc 2> /dev/null) > "$W/initrd.cpio"
  chmod 644 "$W/initrd.cpio"
}

qemu_pid=""
start_qemu() {  # start_qemu DISK WRITER: the guest for vmdedup, QMP at $W/qmp.sock
  rm -f "$W/qmp.sock" "$W/serial.log"
  qemu-system-x86_64 -nodefaults -display none -no-reboot -machine pc -accel "$accel" -m 256 \
    -kernel "$kernel" -initrd "$W/initrd.cpio" -append "console=ttyS0 panic=-1 quiet writer=$2" \
    -serial "file:$W/serial.log" -qmp "unix:$W/qmp.sock,server=on,wait=off" \
    -blockdev "driver=qcow2,node-name=fmt-vda,file.driver=file,file.filename=$1" \
    -device virtio-blk-pci,drive=fmt-vda,id=vda >> "$OUT/log/qemu.log" 2>&1 &
  qemu_pid=$!
  wait_ready
}

start_libvirt() {  # start_libvirt DISK WRITER: the same guest as libvirt domain $DOM
  pgrep -x virtlogd > /dev/null || virtlogd -d
  pgrep -x libvirtd > /dev/null || { libvirtd -d && sleep 2; }
  virsh -q destroy "$DOM" > /dev/null 2>&1 || true
  rm -f "$W/serial.log"
  cat > "$W/dom.xml" << EOF
<domain type='$domtype'>
  <name>$DOM</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$kernel</kernel>
    <initrd>$W/initrd.cpio</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet writer=$2</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$1'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$W/serial.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
  virsh -q create "$W/dom.xml" > /dev/null
  qemu_pid=$(pgrep -f "guest=$DOM" | head -1)
  wait_ready
}

wait_ready() {
  for _ in $(seq 300); do
    grep -q "GUEST READY" "$W/serial.log" 2> /dev/null && return 0
    sleep 0.5
  done
  echo "live_bench: the guest did not boot; see $W/serial.log and $OUT/log/qemu.log" >&2
  exit 1
}

stop_guest() {
  if [ "$1" = virtnbdbackup ]; then
    virsh -q destroy "$DOM" > /dev/null 2>&1 || true
  else
    kill "$qemu_pid" 2> /dev/null || true
    wait "$qemu_pid" 2> /dev/null || true
  fi
  qemu_pid=""
}
trap 'stop_guest vmdedup; stop_guest virtnbdbackup' EXIT

qemu_cpu() {  # CPU seconds QEMU has used so far (0 without a guest)
  [ -n "$qemu_pid" ] || { echo 0; return; }
  awk '{printf "%.2f\n", ($14 + $15) / 100}' "/proc/$qemu_pid/stat"
}
writes() { grep -c WROTE "$W/serial.log" || true; }  # 16 MiB pieces the writer finished

# timed NAME CMD...: runs CMD under time -v; records QEMU's CPU and the
# writer's pieces before and after in json/NAME.guest.
timed() {
  local name=$1 c0 w0 c1 w1 t0 t1
  shift
  log "$name"
  c0=$(qemu_cpu)
  w0=$(writes)
  t0=$(date +%s.%N)
  /usr/bin/time -v -o "$OUT/time/$name" "$@" > "$OUT/json/$name" 2> "$OUT/log/$name"
  t1=$(date +%s.%N)
  c1=$(qemu_cpu)
  w1=$(writes)
  awk -v w=$(((w1 - w0) * 16)) -v t0="$t0" -v t1="$t1" -v c0="$c0" -v c1="$c1" \
    'BEGIN {printf "{\"qemu_cpu\": %.2f, \"writes_mib\": %d, \"seconds\": %.3f}\n", c1 - c0, w, t1 - t0}' \
    > "$OUT/json/$name.guest"
}

window() {  # window NAME: the writer's pieces over WINDOW seconds without a backup
  local w0 w1
  w0=$(writes)
  sleep "$WINDOW"
  w1=$(writes)
  echo "{\"writes_mib\": $(((w1 - w0) * 16)), \"seconds\": $WINDOW}" > "$OUT/json/$1.guest"
  log "$1: $(((w1 - w0) * 16 / WINDOW)) MiB/s"
}

# --- preparation -------------------------------------------------------------

log "preparing: initramfs, $VM as qcow2, churn plan"
make_initrd
qemu-img convert -f raw -O qcow2 "$RAW" "$W/base.qcow2"
bench/live_churn.py plan "$W/base.qcow2" "$W/churn" --bytes $((CHURN_MIB * 1048576)) \
  > "$OUT/json/churn-plan"
chmod -R a+rX "$W/churn"

backup() {  # backup TOOL DISK KIND NAME
  if [ "$1" = vmdedup ]; then
    timed "$4" "$V" backup -r "$W/repo" --vm bench --json "qemu:$W/qmp.sock"
  elif [ "${1#vmdedup-}" != "$1" ]; then  # vmdedup-normal, vmdedup-idle: --priority
    timed "$4" "$V" backup -r "$W/repo" --vm bench --json --priority "${1#vmdedup-}" "qemu:$W/qmp.sock"
  else
    timed "$4" virtnbdbackup -d "$DOM" -l "$3" -z -o "$W/vnb"
  fi
}

stored() {  # stored TOOL NAME: bytes the tool keeps after a backup
  if [ "$1" != virtnbdbackup ]; then
    du -sb "$W/repo" | cut -f1 > "$OUT/json/$2.stored"
  else  # the disk's data files and checkpoint metadata, not the copies of kernel/initrd
    du -cb "$W/vnb"/vda.* "$W/vnb"/checkpoints "$W/vnb"/*.cpt | tail -1 | cut -f1 > "$OUT/json/$2.stored"
  fi
}

start_guest() {  # start_guest TOOL WRITER: a fresh disk, the guest booted
  cp "$W/base.qcow2" "$W/disk.qcow2"
  chmod 666 "$W/disk.qcow2"
  rm -rf "$W/repo" "$W/vnb"
  mkdir -p "$W/vnb"
  "$V" init "$W/repo" > /dev/null
  if [ "$1" != virtnbdbackup ]; then start_qemu "$W/disk.qcow2" "$2"; else start_libvirt "$W/disk.qcow2" "$2"; fi
}

churn() {  # churn TOOL NAME
  if [ "$1" != virtnbdbackup ]; then
    bench/live_churn.py apply "$W/churn" --qmp "$W/qmp.sock" --qdev vda > "$OUT/json/$2"
  else
    bench/live_churn.py apply "$W/churn" --libvirt "$DOM" --qdev virtio-disk0 > "$OUT/json/$2"
  fi
}

cd "$SRC"

# --- speed: full and incremental, both tools, the floor ------------------------

if [[ " $PARTS " == *" speed "* ]]; then
  for r in $(seq "$REPEAT"); do
    for tool in vmdedup virtnbdbackup; do
      start_guest "$tool" 0
      backup "$tool" "$W/disk.qcow2" full "$tool-full-$r"
      stored "$tool" "$tool-full-$r"
      churn "$tool" "churn-$tool-$r"
      backup "$tool" "$W/disk.qcow2" inc "$tool-incr-$r"
      stored "$tool" "$tool-incr-$r"
      stop_guest "$tool"
      if [ "$tool" = vmdedup ] && [ "$r" = 1 ]; then
        "$V" restore -r "$W/repo" bench/vda/2 --to "$W/restored.raw" --force > /dev/null
        qemu-img convert -f qcow2 -O raw "$W/disk.qcow2" "$W/disk.raw"
        if cmp -s "$W/restored.raw" "$W/disk.raw"; then
          echo ok > "$OUT/json/restore-check"
        else
          echo DIFFERENT > "$OUT/json/restore-check"
          log "vmdedup's restore of the incremental differs from the guest's disk"
        fi
        rm -f "$W/restored.raw" "$W/disk.raw"
      fi
    done
  done

  # The floor: the churn in an overlay exported alone, and the whole image.
  qemu-img create -q -f qcow2 -b "$W/base.qcow2" -F qcow2 "$W/ov.qcow2"
  args=()
  while IFS=$'\t' read -r off file; do args+=(-c "write -q -s $file $off 64k"); done < "$W/churn/plan.tsv"
  qemu-io -f qcow2 "${args[@]}" "$W/ov.qcow2"
  ovjson='json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"'"$W/ov.qcow2"'"}}'
  for r in $(seq "$REPEAT"); do
    timed "nbdcopy-churn-$r" nbdcopy -- [ qemu-nbd -r "$ovjson" ] null:
    timed "nbdcopy-full-$r" nbdcopy -- [ qemu-nbd -r -f qcow2 "$W/base.qcow2" ] null:
  done
fi

# --- the guest's writer with and without a backup ------------------------------

if [[ " $PARTS " == *" writer "* ]]; then
  for r in $(seq "$WREPEAT"); do
    for tool in $WRITER_TOOLS; do
      start_guest "$tool" 1
      sleep 5  # let the writer settle
      window "writer-$tool-idle1-$r"
      backup "$tool" "$W/disk.qcow2" full "writer-$tool-full-$r"
      window "writer-$tool-idle2-$r"
      backup "$tool" "$W/disk.qcow2" inc "writer-$tool-incr-$r"
      window "writer-$tool-idle3-$r"
      if grep -q "WRITE FAILED" "$W/serial.log"; then log "the guest's writer failed ($tool)"; fi
      stop_guest "$tool"
    done
  done
fi
# The images, repositories and virtnbdbackup's output take about 4 GB.
if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$W"; fi
log "done: bench/live_report.py $OUT"
