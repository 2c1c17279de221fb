#!/usr/bin/env bash
# serve_bench: the NBD export (`vmdedup serve`) against qemu-nbd serving the
# original raw image, in one run:
#   1. sequential read throughput: nbdcopy URI null: (with extents, as a
#      client copying a disk does, and with --no-extents: every byte)
#   2. random 4 KiB read latency, p50/p99 (bench/nbd_latency_bench), over
#      the data extents, on a freshly started server
#   3. full `vmdedup restore` time against `cp --sparse=always` (+ sync of
#      the copy: restore fsyncs its output)
#
# Usage: bench/serve_bench.sh [IMAGE] [BUILD_DIR] [ROUNDS]
#   IMAGE      raw disk image (default /var/tmp/vmdata/fleet/vm00-web/snap-0.raw)
#   BUILD_DIR  a Release build with vmdedup, the plugin and nbd_latency_bench
#              (default build-serve-rel:
#               cmake -S . -B build-serve-rel -DCMAKE_BUILD_TYPE=Release -DVMDEDUP_TESTS=OFF
#               cmake --build build-serve-rel --target vmdedup nbd_latency_bench)
#   ROUNDS     repetitions of each timed step, the median is reported (default 3)
# Environment: INIT_ARGS, options for `vmdedup init` of the benchmark repository
#   (e.g. "--frame-size 0" for one zstd frame a block).
# Scratch space: a directory under ${TMPDIR:-/var/tmp}, removed at the end.
# Every server is started here and stopped by its pid.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-/var/tmp/vmdata/fleet/vm00-web/snap-0.raw}  # FORMAT=qcow2 for a qcow2 image
build=${2:-build-serve-rel}
rounds=${3:-3}
vmdedup=$build/cli/vmdedup
latency=$build/bench/nbd_latency_bench
for f in "$vmdedup" "$latency" "$image"; do
  [ -e "$f" ] || { echo "serve_bench: $f not found" >&2; exit 2; }
done
work=$(mktemp -d "${TMPDIR:-/var/tmp}/serve-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
# median of the arguments
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN {printf "%.0f", b / 1048576 / s}'; }

size=$(stat -c %s "$image")
allocated=$(( $(stat -c %b "$image") * $(stat -c %B "$image") ))
echo "machine: $(nproc) cores, $(awk '/model name/ {sub(/.*: /, ""); print; exit}' /proc/cpuinfo)," \
     "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "tools: $(nbdkit --version), $(qemu-nbd --version | head -1), $(nbdcopy --version | head -1)"
echo "image: $image, $(mib "$size") MiB virtual, $(mib "$allocated") MiB allocated"

# The snapshot.
repo=$work/repo
"$vmdedup" init ${INIT_ARGS:-} "$repo" >/dev/null
t0=$(now)
"$vmdedup" backup -r "$repo" --vm bench --disk vda -q "${FORMAT:-raw}:$image" >/dev/null
t1=$(now)
stored=$(du -sb "$repo" | cut -f1)
echo "backup: $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s, repository $(mib "$stored") MiB"

# Servers: qemu-nbd on the raw image (4 connections allowed, so that nbdcopy
# can use multi-conn as it does with vmdedup), vmdedup serve.
qsock=$work/qemu.sock
qemu-nbd --read-only --format=raw --persistent --shared=4 --socket="$qsock" "$image" &
qemu_pid=$!
pids+=("$qemu_pid")
start_serve() {  # threads -> sets serve_pid, serve_uri
  "$vmdedup" serve -r "$repo" bench/vda/1 --json --quiet --threads "$1" >"$work/serve.json" &
  serve_pid=$!
  pids+=("$serve_pid")
  for _ in $(seq 1 600); do [ -s "$work/serve.json" ] && break; sleep 0.1; done
  serve_uri=$(sed -n 's/.*"uri":"\([^"]*\)".*/\1/p' "$work/serve.json")
  nbdkit_pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$work/serve.json")
  [ -n "$serve_uri" ] || { echo "serve_bench: vmdedup serve did not start" >&2; exit 1; }
}
stop_serve() { kill -TERM "$serve_pid"; wait "$serve_pid" || true; : >"$work/serve.json"; }
for _ in $(seq 1 100); do [ -S "$qsock" ] && break; sleep 0.1; done
quri="nbd+unix:///?socket=$qsock"

# CPU seconds (user + system) a process has used so far.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$1/stat"; }
copy_time() {  # server_pid uri [nbdcopy options] -> "wall_seconds server_cpu_seconds"
  local pid=$1 uri=$2; shift 2
  local a b ca cb
  ca=$(cpu_of "$pid"); a=$(now); nbdcopy "$@" "$uri" null:; b=$(now); cb=$(cpu_of "$pid")
  awk -v a="$a" -v b="$b" -v ca="$ca" -v cb="$cb" 'BEGIN {printf "%.3f %.3f\n", b - a, cb - ca}'
}

echo
echo "## sequential read, nbdcopy URI null: (median of $rounds; MiB/s of the virtual size;"
echo "##   server CPU seconds per pass in brackets)"
printf '%-36s %-22s %-22s\n' "server" "with extents" "--no-extents"
declare -A seq cpu
for threads in 1 16; do
  start_serve "$threads"
  for mode in first extents no-extents; do
    q=(); qc=(); v=(); vc=()
    opt=(); [ "$mode" = no-extents ] && opt=(--no-extents)
    n=$rounds; [ "$mode" = first ] && n=1
    for _ in $(seq 1 "$n"); do
      read -r w c < <(copy_time "$qemu_pid" "$quri" "${opt[@]}"); q+=("$w"); qc+=("$c")
      read -r w c < <(copy_time "$nbdkit_pid" "$serve_uri" "${opt[@]}"); v+=("$w"); vc+=("$c")
    done
    seq[qemu,$mode]=$(median "${q[@]}"); cpu[qemu,$mode]=$(median "${qc[@]}")
    seq[vmdedup$threads,$mode]=$(median "${v[@]}"); cpu[vmdedup$threads,$mode]=$(median "${vc[@]}")
  done
  stop_serve
done
for s in qemu vmdedup1 vmdedup16; do
  case $s in
    qemu) name="qemu-nbd (raw image)";;
    vmdedup1) name="vmdedup serve --threads 1 (default)";;
    vmdedup16) name="vmdedup serve --threads 16";;
  esac
  printf '%-36s %5s MiB/s [%5ss]    %5s MiB/s [%5ss]\n' "$name" \
    "$(rate "$size" "${seq[$s,extents]}")" "${cpu[$s,extents]}" \
    "$(rate "$size" "${seq[$s,no-extents]}")" "${cpu[$s,no-extents]}"
done
echo "first pass after the server started (cold cache), with extents:" \
  "vmdedup --threads 1 $(rate "$size" "${seq[vmdedup1,first]}") MiB/s," \
  "--threads 16 $(rate "$size" "${seq[vmdedup16,first]}") MiB/s"
for threads in 1 16; do
  for mode in extents no-extents; do
    echo "vmdedup --threads $threads / qemu-nbd, $mode: $(awk -v q="${seq[qemu,$mode]}" \
      -v v="${seq[vmdedup$threads,$mode]}" 'BEGIN {printf "%.0f%%", 100 * q / v}')"
  done
done

echo
echo "## random 4 KiB reads over the data extents, one at a time (2000 reads, fresh server)"
echo "qemu-nbd:        $("$latency" "$quri" --count 2000)"
start_serve 1
echo "vmdedup (cold):  $("$latency" "$serve_uri" --count 2000)"
echo "vmdedup (again): $("$latency" "$serve_uri" --count 2000)"
stop_serve

echo
echo "## full restore (median of $rounds)"
r=(); c=()
for _ in $(seq 1 "$rounds"); do
  rm -f "$work/restored.raw" "$work/copy.raw"
  a=$(now); "$vmdedup" restore -r "$repo" bench/vda/1 --to "$work/restored.raw" -q; b=$(now)
  r+=("$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", b - a}')")
  a=$(now); cp --sparse=always "$image" "$work/copy.raw"; sync "$work/copy.raw"; b=$(now)
  c+=("$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", b - a}')")
done
cmp "$work/restored.raw" "$image" && echo "restored image identical to the original"
echo "vmdedup restore:                 $(median "${r[@]}") s   (runs: ${r[*]})"
echo "cp --sparse=always + sync:       $(median "${c[@]}") s   (runs: ${c[*]})"
