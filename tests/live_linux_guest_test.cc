// A live backup of a real Linux guest while it writes to its disk: the
// Debian kernel (package linux-image-amd64) boots a busybox initramfs (package
// busybox-static) under QEMU (KVM where it works, TCG otherwise) whose /init
// loads the virtio modules and then writes numbered records to /dev/vda, one
// 4 KiB block at a time, each write fsynced before the next starts:
// write i goes to block i mod kRing. Because the writes are sequential, a
// point-in-time copy of the disk holds, for some K, exactly the records of
// writes 0..K (each block the last of them that hit it); a copy mixed from
// two instants does not. The test checks that of two live backups (full,
// then incremental), that the guest's writer kept going during each, and
// that the incremental read only the dirty extents.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kBlock = 4096;
constexpr uint64_t kRing = 2048;  // blocks the writer cycles through: 8 MiB
constexpr const char kRecord[] = "vmdedup-guest-write ";

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The newest installed kernel image and its version ("" when none).
std::pair<std::string, std::string> FindKernel() {
  std::string best, version;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/boot", ec)) {
    std::string name = e.path().filename().string();
    if (name.rfind("vmlinuz-", 0) != 0) continue;
    std::string v = name.substr(8);
    if (!std::filesystem::exists("/lib/modules/" + v + "/kernel")) continue;
    if (best.empty() || name > std::filesystem::path(best).filename().string()) {
      best = e.path().string();
      version = v;
    }
  }
  return {best, version};
}

// The writer's records found in the first kRing blocks of an image: the
// write number per block (nullopt: never written). An empty optional result
// means a block held something else (test failure reported).
std::optional<std::vector<std::optional<uint64_t>>> ParseRecords(const std::string& image,
                                                                 std::string* why) {
  if (image.size() < kRing * kBlock) {
    *why = "image too small";
    return std::nullopt;
  }
  std::vector<std::optional<uint64_t>> out(kRing);
  const std::string zero(kBlock, '\0');
  for (uint64_t b = 0; b < kRing; b++) {
    std::string_view block(image.data() + b * kBlock, kBlock);
    if (block == zero) continue;
    if (block.substr(0, sizeof(kRecord) - 1) != kRecord) {
      *why = "block " + std::to_string(b) + " holds no record";
      return std::nullopt;
    }
    out[b] = std::strtoull(block.data() + sizeof(kRecord) - 1, nullptr, 10);
  }
  return out;
}

// True when the blocks are exactly the result of writes 0..K for one K.
// Returns K through `last` (-1: no write at all).
bool IsPointInTime(const std::vector<std::optional<uint64_t>>& blocks, int64_t* last,
                   std::string* why) {
  int64_t k = -1;
  for (const auto& v : blocks)
    if (v) k = std::max<int64_t>(k, static_cast<int64_t>(*v));
  *last = k;
  for (uint64_t b = 0; b < kRing; b++) {
    std::optional<uint64_t> want;
    if (k >= 0 && static_cast<int64_t>(b) <= k)
      want = static_cast<uint64_t>(k) - (static_cast<uint64_t>(k) - b) % kRing;
    if (blocks[b] != want) {
      *why = "block " + std::to_string(b) + " holds write " +
             (blocks[b] ? std::to_string(*blocks[b]) : "none") + ", a copy of the instant of " +
             "write " + std::to_string(k) + " holds " + (want ? std::to_string(*want) : "none");
      return false;
    }
  }
  return true;
}

class LiveLinuxGuestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto [kernel, version] = FindKernel();
    ASSERT_FALSE(kernel.empty())
        << "no kernel in /boot with modules in /lib/modules: install linux-image-amd64 "
           "(scripts/setup.sh test does)";
    kernel_ = kernel;
    ASSERT_EQ(access("/bin/busybox", X_OK), 0) << "install busybox-static";
    MakeInitramfs(version);
    repo_ = dir_.Sub("repo");
    auto r = RunCommand({VmdedupBinary(), "init", repo_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    // A 64 MiB disk whose last 48 MiB hold random data (the writer uses the
    // first 8 MiB), so that a backup takes a while.
    std::string raw = dir_.Sub("seed.raw");
    {
      std::string content(16 * kMiB, '\0');
      content += RandomBytes(48 * kMiB, 7);
      std::ofstream out(raw, std::ios::binary | std::ios::trunc);
      out.write(content.data(), static_cast<std::streamsize>(content.size()));
    }
    image_ = dir_.Sub("vda.qcow2");
    r = RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    unlink(raw.c_str());
  }

  void TearDown() override {
    if (qemu_ > 0) {
      kill(qemu_, SIGKILL);
      waitpid(qemu_, nullptr, 0);
    }
  }

  void MakeInitramfs(const std::string& version) {
    std::string root = dir_.Sub("initramfs");
    std::string script =
        "set -e; r='" + root + "'; mkdir -p \"$r/bin\" \"$r/dev\" \"$r/proc\" \"$r/sys\" " +
        "\"$r/mods\"; cp /bin/busybox \"$r/bin/busybox\"; : > \"$r/mods/order\"; " +
        "for m in $(modprobe -S '" + version +
        "' -a --show-depends virtio_pci virtio_blk | awk '$1 == \"insmod\" {print $2}'); do " +
        "cp \"$m\" \"$r/mods/\"; echo \"/mods/$(basename \"$m\")\" >> \"$r/mods/order\"; done";
    auto r = RunShell(script);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::string init =
        "#!/bin/busybox sh\n"
        "/bin/busybox --install -s /bin\n"
        "export PATH=/bin\n"
        "mount -t devtmpfs dev /dev\n"
        "mount -t proc proc /proc\n"
        "for m in $(cat /mods/order); do insmod $m; done\n"
        "i=0\n"
        "while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
        "echo GUEST READY\n"
        "i=0\n"
        "while true; do\n"
        "  printf '" +
        std::string(kRecord) + "%d\\n' $i | dd of=/dev/vda bs=4096 count=1 seek=$((i % " +
        std::to_string(kRing) +
        ")) conv=notrunc,sync,fsync 2>/dev/null || { echo WRITE FAILED; break; }\n"
        "  i=$((i+1))\n"
        "  [ $((i % 8)) -eq 0 ] && echo WROTE $i\n"
        "done\n"
        "sleep 100000\n";
    {
      std::ofstream out(root + "/init");
      out << init;
    }
    ASSERT_EQ(chmod((root + "/init").c_str(), 0755), 0);
    initrd_ = dir_.Sub("initrd.cpio");
    r = RunShell("cd '" + root + "' && find . | busybox cpio -o -H newc > '" + initrd_ +
                 "' 2>/dev/null");
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  // Starts the guest under the first accelerator of `accels` whose guest
  // prints on its serial console within `grace`; one that stays silent (or
  // whose QEMU exits) is killed and the next is tried, with a line in the
  // test output. KVM comes first where /dev/kvm is usable, but nested KVM
  // on some hosts hangs a 64-bit Linux guest before it prints anything
  // (../shared/QEMU-NOTES.md), so TCG always follows it. "frozen" starts a
  // guest that never runs (TCG with -S): the fallback's own test.
  void StartGuest(std::vector<std::string> accels = {}, std::chrono::seconds grace = 60s) {
    if (accels.empty()) {
      if (access("/dev/kvm", R_OK | W_OK) == 0) accels.push_back("kvm");
      accels.push_back("tcg");
    }
    for (size_t i = 0; i < accels.size(); i++) {
      const bool last = i + 1 == accels.size();
      SpawnGuest(accels[i]);
      if (last) break;  // the last one gets the caller's own wait
      auto end = std::chrono::steady_clock::now() + grace;
      int status;
      bool exited = false;
      while (ReadAll(serial_).empty() && std::chrono::steady_clock::now() < end) {
        if (waitpid(qemu_, &status, WNOHANG) != 0) {
          exited = true;
          break;
        }
        std::this_thread::sleep_for(100ms);
      }
      if (!exited && !ReadAll(serial_).empty()) break;
      std::cout << "[   NOTE   ] the guest under " << accels[i]
                << (exited ? " exited (" + ReadAll(dir_.Sub("qemu.log")).substr(0, 300) + ")"
                           : " printed nothing on its serial console in " +
                                 std::to_string(grace.count()) + " s")
                << "; starting it again under " << accels[i + 1] << std::endl;
      if (!exited) {
        kill(qemu_, SIGKILL);
        waitpid(qemu_, nullptr, 0);
      }
      qemu_ = -1;
    }
  }

  void SpawnGuest(const std::string& accel) {
    qmp_ = dir_.Sub("qmp.sock");
    serial_ = dir_.Sub("serial.log");
    unlink(qmp_.c_str());
    unlink(serial_.c_str());
    accel_ = accel;
    std::vector<std::string> argv = {"qemu-system-x86_64",
                                     "-nodefaults",
                                     "-display",
                                     "none",
                                     "-no-reboot",
                                     "-machine",
                                     "pc",
                                     "-accel",
                                     accel == "frozen" ? "tcg" : accel,
                                     "-m",
                                     "256",
                                     "-kernel",
                                     kernel_,
                                     "-initrd",
                                     initrd_,
                                     "-append",
                                     "console=ttyS0 panic=-1 quiet",
                                     "-serial",
                                     "file:" + serial_,
                                     "-qmp",
                                     "unix:" + qmp_ + ",server=on,wait=off",
                                     "-blockdev",
                                     "driver=qcow2,node-name=fmt-vda,file.driver=file,"
                                     "file.filename=" +
                                         image_,
                                     "-device",
                                     "virtio-blk-pci,drive=fmt-vda,id=vda"};
    if (accel == "frozen") argv.push_back("-S");
    qemu_ = SpawnLogged(argv, dir_.Sub("qemu.log"));
  }

  // The writer's progress: the last "WROTE n" on the serial console.
  uint64_t Written() {
    std::string log = ReadAll(serial_);
    size_t at = log.rfind("WROTE ");
    return at == std::string::npos ? 0 : std::strtoull(log.c_str() + at + 6, nullptr, 10);
  }

  // Waits until the guest has booted and written at least `n` records.
  void WaitForWrites(uint64_t n, std::chrono::seconds timeout) {
    auto end = std::chrono::steady_clock::now() + timeout;
    while (Written() < n && std::chrono::steady_clock::now() < end) {
      int status;
      ASSERT_EQ(waitpid(qemu_, &status, WNOHANG), 0)
          << "QEMU exited; " << ReadAll(dir_.Sub("qemu.log")) << ReadAll(serial_);
      std::this_thread::sleep_for(100ms);
    }
    ASSERT_GE(Written(), n) << "the guest (" << accel_
                            << ") did not write in time; serial console:\n"
                            << ReadAll(serial_).substr(0, 4000);
    ASSERT_EQ(ReadAll(serial_).find("WRITE FAILED"), std::string::npos) << ReadAll(serial_);
  }

  nlohmann::json Backup(uint64_t* writes_during) {
    uint64_t before = Written();
    auto r = RunCommand({VmdedupBinary(), "backup", "-r", repo_, "--vm", "guest", "--json",
                         "--threads", "1", "qemu:" + qmp_});
    // The guest is still writing afterwards (never paused for long).
    uint64_t after = Written();
    WaitForWrites(after + 8, 60s);
    *writes_during = after - before;
    EXPECT_EQ(r.exit_code, 0) << r.err;
    if (r.exit_code != 0) return {};
    auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j.size(), 1u) << r.out;
    return j.empty() ? nlohmann::json{} : j[0];
  }

  // Restores a snapshot and checks that it is one instant of the writer.
  int64_t ExpectPointInTime(const std::string& snapshot) {
    std::string out = dir_.Sub("restored.raw");
    auto r =
        RunCommand({VmdedupBinary(), "restore", "-r", repo_, snapshot, "--to", out, "--force"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string image = ReadAll(out);
    unlink(out.c_str());
    std::string why;
    auto blocks = ParseRecords(image, &why);
    EXPECT_TRUE(blocks.has_value()) << snapshot << ": " << why;
    if (!blocks) return -1;
    int64_t last = -1;
    EXPECT_TRUE(IsPointInTime(*blocks, &last, &why)) << snapshot << ": " << why;
    // Negative control: the same check rejects a copy in which one block is
    // from an earlier instant than newer writes to other blocks.
    if (last >= static_cast<int64_t>(kRing)) {
      auto mixed = *blocks;
      uint64_t b = static_cast<uint64_t>(last - 5) % kRing;
      *mixed[b] -= kRing;
      int64_t ignored;
      EXPECT_FALSE(IsPointInTime(mixed, &ignored, &why)) << "the check cannot see a mix";
    }
    // And the rest of the disk is the data it started with.
    EXPECT_EQ(image.substr(16 * kMiB), RandomBytes(48 * kMiB, 7)) << snapshot;
    return last;
  }

  ScratchDir dir_;
  std::string kernel_, initrd_, repo_, image_, qmp_, serial_;
  std::string accel_;  // what the running guest uses
  pid_t qemu_ = -1;
};

TEST_F(LiveLinuxGuestTest, BackupsOfAWritingGuestArePointInTimeAndIncremental) {
  ASSERT_NO_FATAL_FAILURE(StartGuest());
  // Boot (TCG can take a minute on a loaded machine), then enough writes
  // that the ring has wrapped: every block was written at least once.
  ASSERT_NO_FATAL_FAILURE(WaitForWrites(kRing + 64, 600s));

  uint64_t during1 = 0;
  auto s1 = Backup(&during1);
  ASSERT_FALSE(s1.is_null());
  EXPECT_NE(s1["read_mode"].get<std::string>().find("full"), std::string::npos) << s1.dump();
  int64_t k1 = ExpectPointInTime("guest/vda/1");
  EXPECT_GE(k1, static_cast<int64_t>(kRing));
  EXPECT_GT(during1, 0u) << "the guest wrote nothing while the backup ran";

  // More writes (less than the ring), then an incremental: it reads only
  // what the guest wrote in between, and is again one instant.
  uint64_t now = Written();
  ASSERT_NO_FATAL_FAILURE(WaitForWrites(now + 200, 300s));
  uint64_t during2 = 0;
  auto s2 = Backup(&during2);
  ASSERT_FALSE(s2.is_null());
  EXPECT_NE(s2["read_mode"].get<std::string>().find("incremental"), std::string::npos) << s2.dump();
  EXPECT_LE(s2["read_bytes"].get<uint64_t>(), kRing * kBlock) << s2.dump();
  EXPECT_GT(s2["read_bytes"].get<uint64_t>(), 0u) << s2.dump();
  int64_t k2 = ExpectPointInTime("guest/vda/2");
  EXPECT_GT(k2, k1);
  EXPECT_GT(during2, 0u) << "the guest wrote nothing while the backup ran";

  auto c = RunCommand({VmdedupBinary(), "check", "-r", repo_, "--read-data"});
  EXPECT_EQ(c.exit_code, 0) << c.out << c.err;
}

// A guest that stays silent under its first accelerator (here one that never
// runs at all, as a hung nested-KVM guest does) is started again under TCG,
// and that guest boots and writes.
TEST_F(LiveLinuxGuestTest, AGuestSilentUnderItsFirstAcceleratorIsStartedAgainUnderTcg) {
  ASSERT_NO_FATAL_FAILURE(StartGuest({"frozen", "tcg"}, 5s));
  EXPECT_EQ(accel_, "tcg");
  ASSERT_NO_FATAL_FAILURE(WaitForWrites(8, 600s));
}

}  // namespace
}  // namespace vmdedup::testing
