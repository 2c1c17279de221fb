// Level 3 end to end, through the vmdedup binary: backups look up their
// level-2 survivors in the CDS version in force, restores and check cover
// CDS blocks, a rebuild while a backup runs leaves that backup on the version
// it started with, and a damaged CDS never fails a backup.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <thread>

#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class CdsBackupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_ = dir_.Sub("repo");
    auto r = Vmdedup({"init", repo_, "--chunker", "fixed"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    template_ = RandomBytes(8 * kMiB, 100);
  }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }

  // A raw image of 16 MiB: the shared 8 MiB template, 4 MiB of its own
  // data, then 4 MiB of zeros.
  std::string MakeVmImage(const std::string& vm) {
    std::string path = dir_.Sub(vm + ".raw");
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    std::string own = RandomBytes(4 * kMiB, std::hash<std::string>{}(vm));
    out.write(template_.data(), static_cast<std::streamsize>(template_.size()));
    out.write(own.data(), static_cast<std::streamsize>(own.size()));
    out.close();
    EXPECT_EQ(truncate(path.c_str(), 16 * kMiB), 0);
    return path;
  }

  nlohmann::json Backup(const std::string& vm, const std::string& source) {
    auto r = Vmdedup({"backup", "-r", repo_, "--vm", vm, "--disk", "vda", "--json", source});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    last_err_ = r.err;
    if (r.exit_code != 0) return {};
    return nlohmann::json::parse(r.out);
  }

  nlohmann::json BuildCds(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = {"cds", "build", "-r", repo_, "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = Vmdedup(args);
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    last_err_ = r.err;
    if (r.exit_code != 0) return {};
    return nlohmann::json::parse(r.out);
  }

  std::string RestoreSha(const std::string& snapshot) {
    std::string out = dir_.Sub("restored.raw");
    auto r = Vmdedup({"restore", "-r", repo_, snapshot, "--to", out, "--force"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string sha = FileSha256(out);
    unlink(out.c_str());
    return sha;
  }

  nlohmann::json Check() {
    auto r = Vmdedup({"check", "-r", repo_, "--read-data", "--json"});
    last_check_exit_ = r.exit_code;
    return nlohmann::json::parse(r.out);
  }

  std::vector<std::string> CdsContainers() {
    std::vector<std::string> out;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(repo_ + "/cds/data", ec))
      if (e.path().extension() == ".ctr") out.push_back(e.path().string());
    std::sort(out.begin(), out.end());
    return out;
  }

  void BackUpThreeVms() {
    for (const char* vm : {"vm1", "vm2", "vm3"}) {
      auto s = Backup(vm, "raw:" + MakeVmImage(vm));
      ASSERT_FALSE(s.is_null());
      EXPECT_EQ(s["cds"].get<uint64_t>(), 0u);
      EXPECT_EQ(s["cds_version"].get<uint64_t>(), 0u);
    }
  }

  ScratchDir dir_;
  std::string repo_;
  std::string template_;
  std::string last_err_;
  int last_check_exit_ = -1;
};

TEST_F(CdsBackupTest, BackupsReferenceCdsBlocksThatRestoreAndCheck) {
  ASSERT_NO_FATAL_FAILURE(BackUpThreeVms());
  auto built = BuildCds({"--fraction", "100"});
  ASSERT_FALSE(built.is_null());

  // A new VM cloned from the same template finds the template's blocks in
  // the CDS at its first backup; only its own data is new.
  std::string image = MakeVmImage("vm4");
  auto s = Backup("vm4", "raw:" + image);
  ASSERT_FALSE(s.is_null());
  EXPECT_EQ(s["cds_version"].get<uint64_t>(), 1u) << s.dump();
  EXPECT_EQ(s["cds"].get<uint64_t>(), 8 * kMiB) << s.dump();
  EXPECT_EQ(s["new"].get<uint64_t>(), 4 * kMiB) << s.dump();
  EXPECT_EQ(s["zero"].get<uint64_t>(), 4 * kMiB) << s.dump();
  EXPECT_LT(s["stored"].get<uint64_t>(), 5 * kMiB) << s.dump();
  EXPECT_EQ(RestoreSha("vm4/vda/1"), FileSha256(image));

  // An incremental of that VM keeps its CDS references (level 1/2).
  auto s2 = Backup("vm4", "raw:" + image);
  EXPECT_EQ(s2["new"].get<uint64_t>(), 0u) << s2.dump();
  EXPECT_EQ(RestoreSha("vm4/vda/2"), FileSha256(image));

  auto stats = Vmdedup({"stats", "-r", repo_, "--json"});
  ASSERT_EQ(stats.exit_code, 0) << stats.err;
  auto j = nlohmann::json::parse(stats.out);
  EXPECT_EQ(j["cds_bytes"].get<uint64_t>(), 8 * kMiB) << stats.out;
  EXPECT_EQ(j["cds"]["current_version"].get<uint64_t>(), 1u) << stats.out;
  EXPECT_EQ(j["cds"]["blocks"].get<uint64_t>(), 8 * kMiB / 4096) << stats.out;
  EXPECT_GT(j["cds"]["index_memory"].get<uint64_t>(), 0u) << stats.out;
  EXPECT_LE(j["cds"]["index_memory"].get<uint64_t>(), 2048u * 24 + 4096) << stats.out;
  // vm4/vda/1: 8 MiB found, 4 MiB new; vm4/vda/2: nothing left after level 2.
  EXPECT_NEAR(j["cds"]["hit_rate"].get<double>(), 100.0 * 8 / 12, 0.01) << stats.out;

  auto c = Check();
  EXPECT_EQ(last_check_exit_, 0) << c.dump();
  EXPECT_TRUE(c["ok"].get<bool>()) << c.dump();
  EXPECT_EQ(c["cds_versions"].get<uint64_t>(), 1u) << c.dump();
  EXPECT_GE(c["cds_containers"].get<uint64_t>(), 1u) << c.dump();

  // One flipped byte in a CDS container: check names the object and the
  // snapshots that reference it; restore refuses rather than return wrong
  // data; a VM that never used the CDS is untouched.
  // (8 MiB of CDS blocks fill two containers of the default 8 MiB; both
  // snapshots use blocks of each.)
  auto containers = CdsContainers();
  ASSERT_GE(containers.size(), 1u);
  {
    int fd = open(containers[0].c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    char b;
    ASSERT_EQ(pread(fd, &b, 1, 4096), 1);
    b ^= 0x40;
    ASSERT_EQ(pwrite(fd, &b, 1, 4096), 1);
    close(fd);
  }
  c = Check();
  EXPECT_EQ(last_check_exit_, 3) << c.dump();
  EXPECT_FALSE(c["ok"].get<bool>());
  std::string name = std::filesystem::path(containers[0]).filename().string();
  EXPECT_NE(c.dump().find("cds/data/" + name), std::string::npos) << c.dump();
  auto damaged = c["damaged_snapshots"].get<std::vector<std::string>>();
  EXPECT_EQ(damaged, (std::vector<std::string>{"vm4/vda/1", "vm4/vda/2"})) << c.dump();
  auto r = Vmdedup({"restore", "-r", repo_, "vm4/vda/1", "--to", dir_.Sub("x.raw")});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("Corruption"), std::string::npos) << r.err;
  EXPECT_EQ(RestoreSha("vm1/vda/1"), FileSha256(dir_.Sub("vm1.raw")));
}

TEST_F(CdsBackupTest, RebuildWhileABackupRunsKeepsTheVersionItStartedWith) {
  ASSERT_NO_FATAL_FAILURE(BackUpThreeVms());
  ASSERT_FALSE(BuildCds({"--fraction", "100"}).is_null());

  // vm4 is read from a slow NBD server that marks every read it starts.
  std::string image = MakeVmImage("vm4");
  SlowNbdServer server(image, 16 * kMiB, "0.1", dir_.Sub("slow.sock"), dir_.Sub("reads"));
  ASSERT_TRUE(server.Listening());

  CommandResult backup;
  std::thread runner([&] {
    backup = Vmdedup({"backup", "-r", repo_, "--vm", "vm4", "--disk", "vda", "--json", "--threads",
                      "1", server.Uri()});
  });
  EXPECT_TRUE(server.WaitForReads(2, 30000));

  // The rebuild runs while vm4's first backup holds its VM: the VMs are
  // read through read views, so neither waits for the other (vm4, with no
  // snapshot yet, has nothing to count); version 2 is published.
  auto built = BuildCds({"--fraction", "100"});
  std::string build_err = last_err_;
  EXPECT_FALSE(built.is_null());
  EXPECT_LT(server.ReadsStarted(), 64)
      << "the backup finished before the rebuild; the test proves nothing";
  runner.join();
  server.Kill(SIGTERM);
  EXPECT_EQ(built.value("vms_counted", 0), 3) << built.dump() << build_err;

  ASSERT_EQ(backup.exit_code, 0) << backup.err;
  auto s = nlohmann::json::parse(backup.out);
  EXPECT_EQ(s["cds_version"].get<uint64_t>(), 1u) << s.dump();
  EXPECT_EQ(s["cds"].get<uint64_t>(), 8 * kMiB) << s.dump();
  EXPECT_EQ(RestoreSha("vm4/vda/1"), FileSha256(image));

  // The next backup uses version 2.
  auto s5 = Backup("vm5", "raw:" + MakeVmImage("vm5"));
  EXPECT_EQ(s5["cds_version"].get<uint64_t>(), 2u) << s5.dump();
  EXPECT_EQ(s5["cds"].get<uint64_t>(), 8 * kMiB) << s5.dump();
  EXPECT_EQ(RestoreSha("vm5/vda/1"), FileSha256(dir_.Sub("vm5.raw")));

  auto c = Check();
  EXPECT_EQ(last_check_exit_, 0) << c.dump();
  EXPECT_EQ(c["cds_versions"].get<uint64_t>(), 2u) << c.dump();
}

TEST_F(CdsBackupTest, DamagedCdsPointerNeverFailsABackup) {
  ASSERT_NO_FATAL_FAILURE(BackUpThreeVms());
  ASSERT_FALSE(BuildCds({"--fraction", "100"}).is_null());
  {
    std::ofstream out(repo_ + "/cds/current", std::ios::binary | std::ios::trunc);
    out << "not a pointer";
  }
  std::string image = MakeVmImage("vm4");
  auto s = Backup("vm4", "raw:" + image);
  ASSERT_FALSE(s.is_null());
  EXPECT_NE(last_err_.find("common data set cannot be used"), std::string::npos) << last_err_;
  EXPECT_NE(last_err_.find("cds/current"), std::string::npos) << last_err_;
  EXPECT_EQ(s["cds_version"].get<uint64_t>(), 0u);
  EXPECT_EQ(s["cds"].get<uint64_t>(), 0u);
  EXPECT_EQ(s["new"].get<uint64_t>(), 12 * kMiB);
  EXPECT_EQ(RestoreSha("vm4/vda/1"), FileSha256(image));
  auto c = Check();
  EXPECT_EQ(last_check_exit_, 3) << c.dump();
  EXPECT_NE(c.dump().find("cds/current"), std::string::npos) << c.dump();
}

TEST_F(CdsBackupTest, DamagedManifestIsReportedAndOtherVmsStillCheck) {
  ASSERT_NO_FATAL_FAILURE(BackUpThreeVms());
  ASSERT_FALSE(BuildCds({"--fraction", "100"}).is_null());
  std::string manifest = repo_ + "/cds/versions/0000000000000001/manifest";
  {
    std::fstream f(manifest, std::ios::in | std::ios::out | std::ios::binary);
    ASSERT_TRUE(f.good()) << manifest;
    f.seekp(20);
    f.put('#');
  }
  auto c = Check();
  EXPECT_EQ(last_check_exit_, 3) << c.dump();
  EXPECT_NE(c.dump().find("cds/versions/0000000000000001/manifest"), std::string::npos) << c.dump();
  EXPECT_EQ(c["vms"].get<uint64_t>(), 3u) << c.dump();
  EXPECT_EQ(c["snapshots"].get<uint64_t>(), 3u) << c.dump();
}

TEST_F(CdsBackupTest, CountingOnlyChosenVms) {
  ASSERT_NO_FATAL_FAILURE(BackUpThreeVms());
  // vm3 alone holds no block twice: nothing to choose.
  auto only3 = Vmdedup({"cds", "build", "-r", repo_, "--vm", "vm3", "--json"});
  EXPECT_EQ(only3.exit_code, 0) << only3.err;
  auto j = nlohmann::json::parse(only3.out);
  EXPECT_EQ(j["vms_counted"].get<uint64_t>(), 1u) << only3.out;
  EXPECT_EQ(j["blocks"].get<uint64_t>(), 0u) << only3.out;
  // vm1 and vm2 share the template.
  auto two = BuildCds({"--vm", "vm1", "--vm", "vm2", "--fraction", "100"});
  EXPECT_EQ(two["vms_counted"].get<uint64_t>(), 2u) << two.dump();
  EXPECT_EQ(two["blocks"].get<uint64_t>(), 2048u) << two.dump();
  auto bad = Vmdedup({"cds", "build", "-r", repo_, "--vm", "nosuch"});
  EXPECT_EQ(bad.exit_code, 1) << bad.err;
  EXPECT_NE(bad.err.find("VM 'nosuch' is not in the repository"), std::string::npos) << bad.err;
}

// A missing or quarantined CDS container is never referenced: a new VM's
// backup takes nothing from it (level 3 misses there and stores the blocks
// itself), an old VM's incremental reads again the segments that used it,
// and both restore; a rebuild leaves its blocks out or copies them afresh.
TEST_F(CdsBackupTest, AMissingOrQuarantinedCdsContainerIsNeverReferenced) {
  ASSERT_NO_FATAL_FAILURE(BackUpThreeVms());
  ASSERT_FALSE(BuildCds({"--fraction", "100"}).is_null());
  std::string image4 = MakeVmImage("vm4");
  ASSERT_FALSE(Backup("vm4", "raw:" + image4).is_null());
  auto containers = CdsContainers();
  ASSERT_FALSE(containers.empty());
  const std::string gone = containers.front();
  ASSERT_EQ(unlink(gone.c_str()), 0);

  // A brand-new VM: no level-3 hit goes to the missing container.
  std::string image5 = MakeVmImage("vm5");
  auto s5 = Backup("vm5", "raw:" + image5);
  ASSERT_FALSE(s5.is_null());
  EXPECT_NE(last_err_.find("missing or quarantined"), std::string::npos) << last_err_;
  EXPECT_EQ(RestoreSha("vm5/vda/1"), FileSha256(image5));
  // An incremental of vm4, whose snapshot references it: those segments are
  // read again, and the new snapshot restores.
  auto s4 = Backup("vm4", "raw:" + image4);
  ASSERT_FALSE(s4.is_null());
  EXPECT_GT(s4["new"].get<uint64_t>(), 0u) << s4.dump();
  EXPECT_EQ(RestoreSha("vm4/vda/2"), FileSha256(image4));
  auto c = Check();
  EXPECT_NE(last_check_exit_, 0);  // vm4/vda/1 is damaged, and says so
  for (const auto& snap : c["damaged_snapshots"]) {
    EXPECT_NE(snap.get<std::string>(), "vm4/vda/2") << c.dump();
    EXPECT_NE(snap.get<std::string>(), "vm5/vda/1") << c.dump();
  }
  // One finding per VM names the recipes that refer to the missing
  // container, however many blocks they have there.
  const std::string gone_name = std::filesystem::path(gone).filename().string();
  int naming = 0;
  for (const auto& f : c["findings"])
    if (f["message"].get<std::string>().find("recipe") == 0 &&
        f["message"].get<std::string>().find(gone_name) != std::string::npos)
      naming++;
  EXPECT_GE(naming, 1) << c.dump();
  EXPECT_LE(naming, 4) << c.dump();  // a VM's recipes: vm1..vm4 at most
  // A rebuild takes nothing from the missing container either.
  ASSERT_FALSE(BuildCds({"--fraction", "100"}).is_null());
  std::string image6 = MakeVmImage("vm6");
  ASSERT_FALSE(Backup("vm6", "raw:" + image6).is_null());
  EXPECT_EQ(RestoreSha("vm6/vda/1"), FileSha256(image6));
}

// check quarantines a CDS container whose bytes are damaged (same size:
// only re-reading finds it); later backups take nothing from it.
TEST_F(CdsBackupTest, ACdsContainerCheckFoundDamagedIsQuarantined) {
  ASSERT_NO_FATAL_FAILURE(BackUpThreeVms());
  ASSERT_FALSE(BuildCds({"--fraction", "100"}).is_null());
  auto containers = CdsContainers();
  ASSERT_FALSE(containers.empty());
  {
    std::fstream f(containers.front(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096);
    f.write("\xff\xfe\xfd\xfc", 4);
  }
  auto c = Check();
  EXPECT_NE(last_check_exit_, 0);
  EXPECT_GE(c["quarantined"].get<uint64_t>(), 1u) << c.dump();
  std::string image = MakeVmImage("vm7");
  auto s = Backup("vm7", "raw:" + image);
  ASSERT_FALSE(s.is_null());
  EXPECT_NE(last_err_.find("missing or quarantined"), std::string::npos) << last_err_;
  EXPECT_EQ(RestoreSha("vm7/vda/1"), FileSha256(image));
  // A second check quarantines nothing new.
  c = Check();
  EXPECT_EQ(c["quarantined"].get<uint64_t>(), 0u) << c.dump();
}

}  // namespace
}  // namespace vmdedup::testing
