#!/usr/bin/env bash
# Sets everything up and runs the demo: back up a qcow2 disk image, let a
# writer change it, back it up again (incremental through vmdedup's dirty
# bitmap), restore both snapshots, verify them bit for bit, and print the
# per-level deduplication report. Usage: scripts/demo.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh release
VMDEDUP=$PWD/build/cli/vmdedup
work=${1:-$(mktemp -d /tmp/vmdedup-demo.XXXXXX)}
mkdir -p "$work"
repo=$work/repo
img=$work/disk.qcow2
rm -rf "$repo" "$img" "$work"/restored-*.raw

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

say "vmdedup init"
"$VMDEDUP" init "$repo"
export VMDEDUP_REPO=$repo

say "first backup (full read)"
"$VMDEDUP" backup --vm demo --disk vda "file:$img"
sha1=$(img_sha)

say "the 'guest' writes: 24 MiB of new data in scattered 64 KiB pieces, a trim of 16 MiB"
cmds=()
for i in $(seq 0 383); do cmds+=(-c "write -P $((i % 250 + 1)) $((i * 2 + 1))M 64k"); done
qemu-io -f qcow2 "${cmds[@]}" -c "discard 100M 16M" "$img" >/dev/null
sha2=$(img_sha)

say "second backup (incremental: reads only the dirty extents)"
"$VMDEDUP" backup --vm demo --disk vda "file:$img"

say "restore both snapshots and compare with the disk as it was"
"$VMDEDUP" restore demo/vda/1 --to "$work/restored-1.raw"
"$VMDEDUP" restore demo/vda/2 --to "$work/restored-2.raw"
r1=$(sha256sum < "$work/restored-1.raw" | cut -d' ' -f1)
r2=$(sha256sum < "$work/restored-2.raw" | cut -d' ' -f1)
[ "$r1" = "$sha1" ] && echo "demo/vda/1 restores bit-exactly ($r1)" || { echo "MISMATCH in snapshot 1"; exit 1; }
[ "$r2" = "$sha2" ] && echo "demo/vda/2 restores bit-exactly ($r2)" || { echo "MISMATCH in snapshot 2"; exit 1; }

say "vmdedup snapshots"
"$VMDEDUP" snapshots
say "vmdedup stats"
"$VMDEDUP" stats
say "vmdedup check --read-data"
"$VMDEDUP" check --read-data
echo
echo "demo files are in $work"
