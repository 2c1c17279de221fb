#!/usr/bin/env bash
# Installs what vmdedup needs on Debian 12 (the packages that are missing)
# and builds it. Usage: scripts/setup.sh [release|test]   (default: release)
#   release  build/      optimized build of the vmdedup command
#   test     build-test/ ASan+UBSan build with the tests
#
# Every package the build, the demo and the tests use is named below: a
# header, a library or a command that some other package happens to bring
# on this machine is never relied on. Needs root, or a user who may use
# sudo (only when a package is missing), and access to Debian's archive.
# Every failure says in one line what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-release}
case "$mode" in
  release | test) ;;
  *) echo "usage: $0 [release|test]" >&2; exit 2 ;;
esac
die() { echo "setup: $*" >&2; exit 1; }

# The build: compiler, CMake, pkg-config; git lists the sources for
# scripts/check-format.sh.
packages=(build-essential cmake pkg-config git)
# Libraries, with their headers and pkg-config files: OpenSSL (SHA-256),
# zstd, LevelDB, nlohmann-json, libnbd (the NBD client), nbdkit's plugin
# header (the export).
packages+=(libssl-dev libzstd-dev libleveldb-dev nlohmann-json3-dev libnbd-dev nbdkit-plugin-dev)
# What vmdedup runs: qemu-img, qemu-io and qemu-nbd; QEMU itself (the
# live guest); nbdkit (vmdedup serve); nbdinfo and nbdcopy.
packages+=(qemu-utils qemu-system-x86 nbdkit libnbd-bin)
# The tests: GoogleTest; a real Linux guest (the Debian kernel, its
# modules found with kmod's modprobe, and a busybox initramfs the test
# builds itself, so the kernel's own initramfs is not generated: INITRD=No
# below); losetup (a block device to restore into); clang-format for the
# formatting check.
if [ "$mode" = test ]; then
  packages+=(libgtest-dev googletest linux-image-amd64 kmod busybox-static mount clang-format)
fi

command -v dpkg-query > /dev/null && command -v apt-get > /dev/null ||
  die "this is not a Debian system (no dpkg-query or apt-get): vmdedup's scripts need Debian 12"
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=
  if [ "$(id -u)" != 0 ]; then
    command -v sudo > /dev/null ||
      die "not root and no sudo: run this script as root to install ${missing[*]}"
    SUDO=sudo
  fi
  $SUDO apt-get update -qq ||
    die "'apt-get update' failed (see above): the packages ${missing[*]} come from Debian's archive, which must be reachable"
  $SUDO env DEBIAN_FRONTEND=noninteractive INITRD=No apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" > /dev/null ||
    die "'apt-get install ${missing[*]}' failed (see above)"
fi

# What the packages above must have brought; one line names what is not
# there and the package it comes from.
need_command() {  # need_command COMMAND PACKAGE
  command -v "$1" > /dev/null || die "command $1 is missing: it comes from the package $2"
}
need_file() {  # need_file PATH PACKAGE
  [ -e "$1" ] || die "$1 is missing: it comes from the package $2"
}
need_command g++ build-essential
need_command cmake cmake
need_command pkg-config pkg-config
need_command git git
need_file /usr/include/openssl/evp.h libssl-dev
need_file /usr/include/zstd.h libzstd-dev
need_file /usr/include/leveldb/db.h libleveldb-dev
need_file /usr/include/nlohmann/json.hpp nlohmann-json3-dev
need_file /usr/include/libnbd.h libnbd-dev
need_file /usr/include/nbdkit-plugin.h nbdkit-plugin-dev
need_command qemu-img qemu-utils
need_command qemu-io qemu-utils
need_command qemu-nbd qemu-utils
need_command qemu-system-x86_64 qemu-system-x86
need_command nbdkit nbdkit
need_command nbdinfo libnbd-bin
need_command nbdcopy libnbd-bin
if [ "$mode" = test ]; then
  need_file /usr/include/gtest/gtest.h libgtest-dev
  need_command modprobe kmod
  need_file /bin/busybox busybox-static
  need_command losetup mount
  need_command clang-format clang-format
  ls /boot/vmlinuz-* > /dev/null 2>&1 || die "no kernel in /boot: it comes from the package linux-image-amd64"
fi

jobs=$(nproc)
case "$mode" in
  release)
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DVMDEDUP_TESTS=OFF > /dev/null
    cmake --build build -j"$jobs" --target vmdedup
    ;;
  test)
    cmake -S . -B build-test -DCMAKE_BUILD_TYPE=Debug -DVMDEDUP_SANITIZE=ON -DVMDEDUP_TESTS=ON > /dev/null
    cmake --build build-test -j"$jobs"
    ;;
esac
