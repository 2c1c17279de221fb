#!/usr/bin/env bash
# serve_configs: sequential read passes (nbdcopy URI null:) of qemu-nbd
# serving a raw image and of the vmdedup nbdkit plugin under several plugin
# configurations, interleaved in one run, with each server's CPU per pass.
# For tuning the export (readahead=, decoders=, cache=); bench/serve_bench.sh
# is the full benchmark.
#
# Usage: bench/serve_configs.sh IMAGE BUILD_DIR ROUNDS CONFIG...
#   CONFIG  plugin keys in one argument, e.g. "readahead=2 decoders=1"
#   env THREADS: nbdkit --threads (default 1, as `vmdedup serve` uses with
#   nbdkit 1.32)
# Each configuration gets its own copy of the repository (a VM's metadata is
# open in one process at a time). Scratch space under ${TMPDIR:-/var/tmp},
# removed at the end; every server is stopped by its pid.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 4 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
image=$1 build=$2 rounds=$3
shift 3
vmdedup=$build/cli/vmdedup
plugin=$build/nbd-export/nbdkit-vmdedup-plugin.so
for f in "$vmdedup" "$plugin" "$image"; do
  [ -e "$f" ] || { echo "serve_configs: $f not found" >&2; exit 2; }
done
work=$(mktemp -d "${TMPDIR:-/var/tmp}/serve-configs.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$vmdedup" init "$work/repo" >/dev/null
"$vmdedup" backup -r "$work/repo" --vm bench --disk vda -q "${FORMAT:-raw}:$image" >/dev/null
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); image $image"

qemu-nbd --read-only --format=raw --persistent --shared=4 --socket="$work/q.sock" "$image" &
pids+=($!)
i=0
servers=()
for cfg in "$@"; do
  cp -a "$work/repo" "$work/repo$i"
  # shellcheck disable=SC2086 # the configuration is split into keys on purpose
  nbdkit -f --exit-with-parent -U "$work/n$i.sock" --readonly --threads "${THREADS:-1}" \
    "$plugin" repo="$work/repo$i" bench/vda/1 $cfg &
  pids+=($!)
  servers+=($!)
  i=$((i + 1))
done
for s in "$work"/q.sock $(seq -f "$work/n%g.sock" 0 $((i - 1))); do
  for _ in $(seq 1 100); do [ -S "$s" ] && break; sleep 0.1; done
  [ -S "$s" ] || { echo "serve_configs: no server on $s" >&2; exit 1; }
done
for j in $(seq 0 $((i - 1))); do nbdcopy "nbd+unix:///?socket=$work/n$j.sock" null:; done  # warm

cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
pass() {  # uri -> wall seconds
  local a b
  a=$(date +%s.%N); nbdcopy "$1" null:; b=$(date +%s.%N)
  awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", b - a}'
}
for _ in $(seq 1 "$rounds"); do
  c0=$(cpu "${pids[0]}"); w=$(pass "nbd+unix:///?socket=$work/q.sock"); c1=$(cpu "${pids[0]}")
  line="qemu-nbd $w s (cpu $(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}'))"
  j=0
  for cfg in "$@"; do
    c0=$(cpu "${servers[$j]}"); w=$(pass "nbd+unix:///?socket=$work/n$j.sock"); c1=$(cpu "${servers[$j]}")
    line="$line | [$cfg] $w s (cpu $(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}'))"
    j=$((j + 1))
  done
  echo "$line  load $(cut -d' ' -f1 /proc/loadavg)"
done
