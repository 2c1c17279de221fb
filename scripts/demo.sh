#!/usr/bin/env bash
# Sets everything up and runs the demo: a live backup of a running QEMU guest.
# Starts a small guest (no OS needed: its "writes" go through the virtio
# disk's block backend with the monitor's qemu-io, as a guest's would),
# backs it up while it runs, lets it write, backs it up again (incremental:
# vmdedup's dirty bitmap in QEMU says what changed), restores both snapshots,
# verifies them bit for bit and prints the per-level deduplication report.
# Then level 3: a second VM cloned from the same disk finds its blocks in the
# common data set, seeded from the disk it was cloned from.
# The guest runs no OS, so it needs no working KVM: it uses KVM where
# /dev/kvm can be opened (a nested KVM that hangs 64-bit guests does not
# hang it: its firmware finds nothing to boot) and TCG otherwise.
# Usage: scripts/demo.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh release
VMDEDUP=$PWD/build/cli/vmdedup
work=${1:-$(mktemp -d /tmp/vmdedup-demo.XXXXXX)}
mkdir -p "$work"
repo=$work/repo
img=$work/disk.qcow2
qmp=$work/qmp.sock
rm -rf "$repo" "$img" "$qmp" "$work"/restored-*.raw

say() { printf '\n== %s\n' "$*"; }
img_sha() {  # SHA-256 of the guest-visible content of the qcow2 image
  qemu-img convert -f qcow2 -O raw "$img" "$work/current.raw"
  sha256sum < "$work/current.raw" | cut -d' ' -f1
  rm -f "$work/current.raw"
}

say "making a 1 GiB qcow2 disk with 300 MiB of data (random, text-like and repeated)"
qemu-img create -q -f qcow2 "$img" 1G
raw=$work/seed.raw
truncate -s 1G "$raw"
dd if=/dev/urandom of="$raw" bs=1M count=160 seek=0 conv=notrunc status=none
for i in $(seq 1 40); do  # the same 2 MiB "file" copied 40 times
  dd if="$raw" of="$raw" bs=1M skip=8 count=2 seek=$((200 + i * 2)) conv=notrunc status=none
done
{ yes "vmdedup demo log line: the quick brown fox jumps over the lazy dog" || true; } | head -c 60M |
  dd of="$raw" bs=1M seek=600 conv=notrunc status=none
qemu-img convert -q -f raw -O qcow2 "$raw" "$img"
rm -f "$raw"
sha1=$(img_sha)  # the guest writes nothing before the first backup

say "starting the guest (QEMU, $([ -w /dev/kvm ] && echo KVM || echo TCG)); QMP socket $qmp"
port=$((20000 + RANDOM % 20000))  # the demo's own monitor, on loopback
qemu-system-x86_64 -nodefaults -display none -machine pc \
  -accel "$([ -w /dev/kvm ] && echo kvm || echo tcg)" -m 64 \
  -qmp "unix:$qmp,server=on,wait=off" -monitor "tcp:127.0.0.1:$port,server=on,wait=off" \
  -blockdev "driver=qcow2,node-name=disk0,file.driver=file,file.filename=$img" \
  -device virtio-blk-pci,drive=disk0,id=vda > "$work/qemu.log" 2>&1 &
qemu_pid=$!
trap 'kill "$qemu_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$qmp" ] && break; sleep 0.1; done
[ -S "$qmp" ] || { echo "QEMU did not start; see $work/qemu.log"; exit 1; }

monitor() {  # runs HMP commands (one a line on stdin) and waits until all are done
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  { cat; echo "info status"; } >&3
  timeout 60 grep -q -m1 "VM status" <&3
  exec 3>&-
}

say "vmdedup init"
"$VMDEDUP" init "$repo"
export VMDEDUP_REPO=$repo

say "first backup of the running guest (full read: there is no bitmap yet)"
"$VMDEDUP" backup --vm demo "qemu:$qmp"

say "the guest writes: 24 MiB of new data in scattered 64 KiB pieces"
for i in $(seq 0 383); do
  echo "qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P $((i % 250 + 1)) $((i * 2 + 1))M 64k\""
done | monitor

say "vmdedup status: the guest's disk and vmdedup's bitmap on it"
"$VMDEDUP" status --vm demo "qemu:$qmp"

say "second backup (incremental: reads only what the bitmap marks dirty)"
"$VMDEDUP" backup --vm demo "qemu:$qmp"

say "stopping the guest"
echo "quit" | { exec 3<>"/dev/tcp/127.0.0.1/$port"; cat >&3; sleep 1; exec 3>&-; } || true
wait "$qemu_pid" 2>/dev/null || true
trap - EXIT
sha2=$(img_sha)

say "restore both snapshots and compare with the disk as it was at each backup"
"$VMDEDUP" restore demo/vda/1 --to "$work/restored-1.raw"
"$VMDEDUP" restore demo/vda/2 --to "$work/restored-2.raw"
r1=$(sha256sum < "$work/restored-1.raw" | cut -d' ' -f1)
r2=$(sha256sum < "$work/restored-2.raw" | cut -d' ' -f1)
[ "$r1" = "$sha1" ] && echo "demo/vda/1 restores bit-exactly ($r1)" || { echo "MISMATCH in snapshot 1"; exit 1; }
[ "$r2" = "$sha2" ] && echo "demo/vda/2 restores bit-exactly ($r2)" || { echo "MISMATCH in snapshot 2"; exit 1; }

say "a second VM cloned from the same disk: build the common data set from the template, back the clone up"
cp "$img" "$work/clone.qcow2"
"$VMDEDUP" cds build --seed "qcow2:$img" --fraction 100
"$VMDEDUP" backup --vm clone "qcow2:$work/clone.qcow2"
"$VMDEDUP" cds status

say "vmdedup snapshots"
"$VMDEDUP" snapshots
say "vmdedup stats"
"$VMDEDUP" stats
say "vmdedup check --read-data"
"$VMDEDUP" check --read-data
echo
echo "demo files are in $work"
