// End-to-end tests of what `vmdedup restore --to PATH` writes to: new images
// get mode 0600 (or --mode) whatever the umask, and a raw image of odd length
// its exact length; an existing block device is
// written in place (as root, on a loop device); directories, FIFOs,
// character devices, symbolic links to files and an empty path are refused
// and left as they were.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class RestoreTargetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_ = dir_.Sub("repo");
    image_ = dir_.Sub("disk.raw");
    ASSERT_EQ(Vmdedup({"init", repo_}).exit_code, 0);
    // 9 MiB + 12 KiB: not a whole number of segments. Data at the start and
    // near the end, zeros between (a restore into a device must write them).
    image_bytes_ = RandomBytes(3 * kMiB, 11) + std::string(5 * kMiB, '\0') +
                   RandomBytes(1 * kMiB + 12 * 1024, 12);
    ASSERT_TRUE(WriteFileBytes(image_, image_bytes_));
    auto r = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "raw:" + image_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    old_umask_ = ::umask(022);
  }

  void TearDown() override {
    ::umask(old_umask_);
    for (const auto& dev : loop_devices_) RunCommand({"losetup", "-d", dev});
  }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }

  CommandResult Restore(const std::string& to, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"restore", "-r", repo_, "vm1/vda/1", "--to", to};
    args.insert(args.end(), extra.begin(), extra.end());
    return Vmdedup(args);
  }

  static unsigned ModeOf(const std::string& path) {
    struct stat sb;
    if (::stat(path.c_str(), &sb) != 0) return ~0u;
    return sb.st_mode & 07777;
  }

  // A loop device over a new file of `size` bytes of 0xAB; "" (and the
  // reason in *why) when this machine cannot make one.
  std::string MakeLoopDevice(uint64_t size, std::string* why) {
    const std::string backing = dir_.Sub("loop" + std::to_string(loop_devices_.size()) + ".img");
    if (!WriteFileBytes(backing, std::string(size, '\xAB'))) {
      *why = "cannot write " + backing;
      return "";
    }
    auto r = RunCommand({"losetup", "--find", "--show", backing});
    if (r.exit_code != 0) {
      *why = "losetup --find --show failed: " + r.err;
      return "";
    }
    std::string dev = r.out.substr(0, r.out.find('\n'));
    loop_devices_.push_back(dev);
    return dev;
  }

  ScratchDir dir_;
  std::string repo_, image_, image_bytes_;
  mode_t old_umask_ = 022;
  std::vector<std::string> loop_devices_;
};

TEST_F(RestoreTargetTest, ANewImageIsPrivateWhateverTheUmask) {
  const std::string raw = dir_.Sub("restored.raw");
  auto r = Restore(raw);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ModeOf(raw), 0600u);
  EXPECT_EQ(ReadFileBytes(raw), image_bytes_);

  const std::string qcow2 = dir_.Sub("restored.qcow2");
  r = Restore(qcow2, {"--format", "qcow2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ModeOf(qcow2), 0600u);

  // --mode is the mode exactly: the umask (022) takes nothing away.
  const std::string shared = dir_.Sub("shared.raw");
  r = Restore(shared, {"--mode", "0666"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ModeOf(shared), 0666u);

  // --force over an existing world-readable file: the new image is 0600.
  r = Restore(shared, {"--force"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ModeOf(shared), 0600u);

  for (const std::string bad : {"9", "-1", "01000", "rw", ""}) {
    r = Restore(dir_.Sub("bad.raw"), {"--mode", bad});
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.err;
    EXPECT_NE(r.err.find("--mode"), std::string::npos) << r.err;
    EXPECT_EQ(ModeOf(dir_.Sub("bad.raw")), ~0u) << bad;
  }
}

// QEMU (and vmdedup) round a raw file's size up to a sector; the restore
// is the file, to its last byte.
TEST_F(RestoreTargetTest, ARawImageOfOddLengthRestoresToItsExactLength) {
  const std::string odd = dir_.Sub("odd.raw");
  const std::string bytes = RandomBytes(1000001, 31);
  ASSERT_TRUE(WriteFileBytes(odd, bytes));
  auto r = Vmdedup({"backup", "-r", repo_, "--vm", "vm2", "--disk", "vda", "raw:" + odd});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Vmdedup({"snapshots", "-r", repo_, "--vm", "vm2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"image_bytes\":1000001"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"size\":1000448"), std::string::npos) << r.out;
  const std::string out = dir_.Sub("odd-restored.raw");
  r = Vmdedup({"restore", "-r", repo_, "vm2/vda/1", "--to", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileBytes(out), bytes);
  // A qcow2 restore has whole sectors (the padding reads as zeros).
  const std::string qcow2 = dir_.Sub("odd-restored.qcow2");
  r = Vmdedup({"restore", "-r", repo_, "vm2/vda/1", "--to", qcow2, "--format", "qcow2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto cmp = RunCommand({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", odd, qcow2});
  EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;
}

TEST_F(RestoreTargetTest, WhatIsNeitherAFileNorABlockDeviceIsRefusedAndLeftAlone) {
  // An empty path.
  auto r = Restore("");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--to"), std::string::npos) << r.err;

  // A directory, with its content.
  const std::string directory = dir_.Sub("a-directory");
  ASSERT_EQ(::mkdir(directory.c_str(), 0755), 0);
  ASSERT_TRUE(WriteFileBytes(directory + "/inside", "keep"));
  r = Restore(directory, {"--force"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find(directory + " is not a regular file or a block device"), std::string::npos)
      << r.err;
  EXPECT_EQ(ReadFileBytes(directory + "/inside"), "keep");

  // A FIFO: a restore would block on it or replace it.
  const std::string fifo = dir_.Sub("a-fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  r = Restore(fifo, {"--force"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find(fifo), std::string::npos) << r.err;
  struct stat sb;
  ASSERT_EQ(::lstat(fifo.c_str(), &sb), 0);
  EXPECT_TRUE(S_ISFIFO(sb.st_mode));

  // A character device. As root, a node of our own (the null device's
  // numbers), so that a regression replaces it and never the system's
  // /dev/null; otherwise /dev/null, which a non-root restore cannot replace.
  std::string chardev = "/dev/null";
  if (::geteuid() == 0) {
    chardev = dir_.Sub("a-char-device");
    ASSERT_EQ(::mknod(chardev.c_str(), S_IFCHR | 0666, makedev(1, 3)), 0) << strerror(errno);
  }
  r = Restore(chardev, {"--force"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find(chardev + " is not a regular file"), std::string::npos) << r.err;
  ASSERT_EQ(::lstat(chardev.c_str(), &sb), 0);
  EXPECT_TRUE(S_ISCHR(sb.st_mode));

  // A symbolic link to a file: the file it names is not replaced, nor is the
  // link.
  const std::string victim = dir_.Sub("victim");
  ASSERT_TRUE(WriteFileBytes(victim, "precious"));
  const std::string link = dir_.Sub("link.raw");
  ASSERT_EQ(::symlink(victim.c_str(), link.c_str()), 0);
  r = Restore(link, {"--force"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find(link + " is a symbolic link"), std::string::npos) << r.err;
  EXPECT_EQ(ReadFileBytes(victim), "precious");
  ASSERT_EQ(::lstat(link.c_str(), &sb), 0);
  EXPECT_TRUE(S_ISLNK(sb.st_mode));

  // Nothing was left next to any of them.
  for (const auto& p : {directory, fifo, link})
    EXPECT_NE(::access((p + ".partial").c_str(), F_OK), 0) << p;
}

TEST_F(RestoreTargetTest, ABlockDeviceIsWrittenInPlaceZerosIncluded) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root for a loop device";
  std::string why;
  const uint64_t device_size = 12 * kMiB;
  const std::string dev = MakeLoopDevice(device_size, &why);
  if (dev.empty()) GTEST_SKIP() << "no loop device on this machine: " << why;

  // Without --force the device is not touched.
  auto r = Restore(dev);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(ReadFileBytes(dev), std::string(device_size, '\xAB'));

  // A device is never replaced by a qcow2 file.
  r = Restore(dev, {"--force", "--format", "qcow2"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--format raw"), std::string::npos) << r.err;

  // Held open exclusively by someone else (as a mount would): refused.
  {
    int held = ::open(dev.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC);
    ASSERT_GE(held, 0);
    r = Restore(dev, {"--force"});
    ::close(held);
    EXPECT_EQ(r.exit_code, 4) << r.err;  // busy, as a locked VM
    EXPECT_NE(r.err.find("in use"), std::string::npos) << r.err;
    EXPECT_EQ(ReadFileBytes(dev), std::string(device_size, '\xAB'));
  }

  // Written in place, through a symbolic link to it: the snapshot's bytes,
  // its zero range written as zeros, the device's tail left as it was.
  const std::string link = dir_.Sub("disk-link");
  ASSERT_EQ(::symlink(dev.c_str(), link.c_str()), 0);
  r = Restore(link, {"--force"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  struct stat sb;
  ASSERT_EQ(::stat(dev.c_str(), &sb), 0);
  EXPECT_TRUE(S_ISBLK(sb.st_mode)) << dev << " was replaced";
  const std::string content = ReadFileBytes(dev);
  ASSERT_EQ(content.size(), device_size);
  EXPECT_TRUE(content.compare(0, image_bytes_.size(), image_bytes_) == 0);
  EXPECT_EQ(content.substr(image_bytes_.size()),
            std::string(device_size - image_bytes_.size(), '\xAB'));

  // A device smaller than the snapshot: refused, named, untouched.
  const std::string small = MakeLoopDevice(4 * kMiB, &why);
  ASSERT_FALSE(small.empty()) << why;
  r = Restore(small, {"--force"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("block device " + small + " holds 4194304 bytes"), std::string::npos)
      << r.err;
  EXPECT_EQ(ReadFileBytes(small), std::string(4 * kMiB, '\xAB'));
}

}  // namespace
}  // namespace vmdedup::testing
