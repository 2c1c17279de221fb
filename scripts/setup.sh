#!/usr/bin/env bash
# Installs what vmdedup needs on Debian 12 (only what is missing) and builds
# it. Usage: scripts/setup.sh [release|test]   (default: release)
#   release  build/      optimized build of the vmdedup command
#   test     build-test/ ASan+UBSan build with the tests
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-release}

packages=(build-essential cmake pkg-config git
          libssl-dev libzstd-dev libleveldb-dev nlohmann-json3-dev
          libnbd-dev libnbd-bin nbdkit qemu-utils qemu-system-x86
          libgtest-dev googletest)
# The tests also boot a real Linux guest: the Debian kernel and a busybox
# initramfs that the test builds itself (so the kernel's own initramfs is
# not generated: INITRD=No below).
if [ "$mode" = test ]; then packages+=(linux-image-amd64 busybox-static); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive INITRD=No apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi

jobs=$(nproc)
case "$mode" in
  release)
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DVMDEDUP_TESTS=OFF >/dev/null
    cmake --build build -j"$jobs" --target vmdedup
    ;;
  test)
    cmake -S . -B build-test -DCMAKE_BUILD_TYPE=Debug -DVMDEDUP_SANITIZE=ON -DVMDEDUP_TESTS=ON >/dev/null
    cmake --build build-test -j"$jobs"
    ;;
  *) echo "usage: $0 [release|test]" >&2; exit 2 ;;
esac
