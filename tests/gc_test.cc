// `vmdedup gc` after `forget`: what only forgotten snapshots used is freed
// (dead containers removed, partly live ones rewritten), every kept
// snapshot restores bit-exactly and check --read-data is clean, the VM
// store ends within 10 % of a fresh repository holding only the kept
// snapshots; a reader (a real serve read by nbdcopy) defers gc; a VM whose
// liveness is unknown is left untouched; a crash at every write of gc
// (fault injection) and SIGKILL at random points leave only what the next
// gc removes.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/gc.h"
#include "store/object_store.h"
#include "store/records.h"
#include "store/repository.h"
#include "tests/fault_injection.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;

uint64_t DirBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec))
    if (e.is_regular_file()) total += e.file_size();
  return total;
}

class GcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_ = dir_.Sub("repo");
    image_ = dir_.Sub("disk.raw");
    ASSERT_EQ(Vmdedup({"init", repo_}).exit_code, 0);
  }
  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }
  // Six backups of an 8 MiB image, each rewriting 1 MiB somewhere; the
  // images are kept by snapshot id.
  void MakeSeries(const std::string& repo, const std::string& vm, uint64_t seed) {
    std::string data = RandomBytes(8 * kMiB, seed);
    for (int i = 0; i < 6; i++) {
      if (i > 0)
        data.replace(static_cast<size_t>((i * 3) % 8) * kMiB, kMiB,
                     RandomBytes(kMiB, seed * 100 + static_cast<uint64_t>(i)));
      ASSERT_TRUE(WriteFileBytes(image_, data));
      auto r =
          Vmdedup({"backup", "-r", repo, "--vm", vm, "--disk", "vda", "--json", "raw:" + image_});
      ASSERT_EQ(r.exit_code, 0) << r.err;
      images_[nlohmann::json::parse(r.out)["id"].get<std::string>()] = data;
    }
  }
  // The kept snapshots restore bit-exactly; check finds no damage.
  void ExpectKeptWhole(const std::string& repo, const std::vector<std::string>& kept) {
    for (const std::string& id : kept) {
      const std::string out = dir_.Sub("restored.raw");
      fs::remove(out);
      auto r = Vmdedup({"restore", "-r", repo, id, "--to", out});
      ASSERT_EQ(r.exit_code, 0) << id << ": " << r.err;
      EXPECT_TRUE(ReadFileBytes(out) == images_[id]) << id;
    }
    auto c = Vmdedup({"check", "-r", repo, "--read-data", "--json"});
    EXPECT_EQ(c.exit_code, 0) << c.out;
  }
  nlohmann::json Gc(const std::string& repo, std::vector<std::string> extra = {}, int want = 0) {
    std::vector<std::string> args = {"gc", "-r", repo, "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = Vmdedup(args);
    EXPECT_EQ(r.exit_code, want) << r.out << r.err;
    return nlohmann::json::parse(r.out, nullptr, false);
  }

  ScratchDir dir_;
  std::string repo_, image_;
  std::map<std::string, std::string> images_;  // snapshot id → image bytes
};

TEST_F(GcTest, ForgetThenGcFreesWhatOnlyForgottenSnapshotsUsed) {
  MakeSeries(repo_, "vm1", 7);
  MakeSeries(repo_, "vm2", 8);
  const uint64_t before = DirBytes(repo_ + "/vms/vm1/data");
  const uint64_t vm2_before = DirBytes(repo_ + "/vms/vm2/data");
  ASSERT_EQ(Vmdedup({"forget", "-r", repo_, "--vm", "vm1", "--keep-last", "2"}).exit_code, 0);
  // A dry run frees nothing and says about what a real run frees.
  auto dry = Gc(repo_, {"--dry-run"});
  EXPECT_GT(dry["bytes_freed"].get<uint64_t>(), 0u) << dry.dump();
  EXPECT_EQ(DirBytes(repo_ + "/vms/vm1/data"), before);
  auto j = Gc(repo_);
  ASSERT_TRUE(j.is_object());
  EXPECT_TRUE(j["complete"].get<bool>());
  const uint64_t after = DirBytes(repo_ + "/vms/vm1/data");
  EXPECT_LT(after, before);
  EXPECT_EQ(j["bytes_freed"].get<uint64_t>(), before - after) << j.dump();
  EXPECT_EQ(DirBytes(repo_ + "/vms/vm2/data"), vm2_before);  // nothing forgotten there
  ExpectKeptWhole(repo_, {"vm1/vda/5", "vm1/vda/6", "vm2/vda/1", "vm2/vda/6"});
  // Within 10 % of a fresh repository that holds only the kept snapshots.
  const std::string fresh = dir_.Sub("fresh");
  ASSERT_EQ(Vmdedup({"init", fresh}).exit_code, 0);
  for (const std::string id : {"vm1/vda/5", "vm1/vda/6"}) {
    ASSERT_TRUE(WriteFileBytes(image_, images_[id]));
    ASSERT_EQ(
        Vmdedup({"backup", "-r", fresh, "--vm", "vm1", "--disk", "vda", "raw:" + image_}).exit_code,
        0);
  }
  const uint64_t fresh_bytes = DirBytes(fresh + "/vms/vm1/data");
  EXPECT_LE(after, fresh_bytes + fresh_bytes / 10)
      << "after gc " << after << ", fresh " << fresh_bytes;
  // A second gc finds nothing; backups go on.
  EXPECT_EQ(Gc(repo_)["bytes_freed"], 0);
  ASSERT_TRUE(WriteFileBytes(image_, images_["vm1/vda/6"]));
  ASSERT_EQ(
      Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "raw:" + image_}).exit_code,
      0);
  images_["vm1/vda/7"] = images_["vm1/vda/6"];
  ExpectKeptWhole(repo_, {"vm1/vda/5", "vm1/vda/7"});
}

// forget --prune runs gc on the VMs it removed snapshots from, only those.
TEST_F(GcTest, ForgetPruneCollectsTheVmsItTouched) {
  MakeSeries(repo_, "vm1", 13);
  MakeSeries(repo_, "vm2", 14);
  const std::string stray = repo_ + "/vms/vm2/data/00000000000fffff.ctr";
  ASSERT_TRUE(WriteFileBytes(stray, "a leftover gc of vm2 would remove"));
  const uint64_t before = DirBytes(repo_ + "/vms/vm1/data");
  auto r = Vmdedup({"forget", "-r", repo_, "--vm", "vm1", "--keep-last", "1", "--prune", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["pruned"].size(), 1u) << r.out;
  EXPECT_EQ(j["bytes_freed"].get<uint64_t>(), before - DirBytes(repo_ + "/vms/vm1/data"));
  EXPECT_GT(j["bytes_freed"].get<uint64_t>(), 0u);
  EXPECT_TRUE(fs::exists(stray));  // vm2 was not touched
  fs::remove(stray);
  ExpectKeptWhole(repo_, {"vm1/vda/6", "vm2/vda/1", "vm2/vda/6"});
}

// A serve of a snapshot that is then forgotten: gc leaves the VM alone
// while the server reads, nbdcopy reads it bit-exactly, and once the
// server is gone gc frees it.
TEST_F(GcTest, AReaderDefersGcOfItsVmUntilItEnds) {
  MakeSeries(repo_, "vm1", 9);
  const std::string socket = dir_.Sub("nbd.sock");
  int pid = SpawnLogged({VmdedupBinary(), "serve", "-r", repo_, "vm1/vda/2", "--socket", socket},
                        dir_.Sub("serve.log"));
  ASSERT_GT(pid, 0);
  struct stat sb;
  for (int i = 0; i < 600 && ::stat(socket.c_str(), &sb) != 0; i++)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_EQ(::stat(socket.c_str(), &sb), 0) << ReadFileBytes(dir_.Sub("serve.log"));
  ASSERT_EQ(Vmdedup({"forget", "-r", repo_, "--keep-last", "1"}).exit_code, 0);
  const uint64_t before = DirBytes(repo_ + "/vms/vm1/data");
  auto j = Gc(repo_, {}, 5);
  EXPECT_FALSE(j["complete"].get<bool>());
  EXPECT_EQ(j["vms"][0]["readers"].size(), 1u) << j.dump();
  EXPECT_NE(j["vms"][0]["skipped"].get<std::string>().find("being read"), std::string::npos);
  EXPECT_EQ(DirBytes(repo_ + "/vms/vm1/data"), before);
  const std::string out = dir_.Sub("served.raw");
  auto copy = RunCommand({"nbdcopy", "nbd+unix:///?socket=" + socket, out});
  EXPECT_EQ(copy.exit_code, 0) << copy.err;
  EXPECT_TRUE(ReadFileBytes(out) == images_["vm1/vda/2"]);
  ::kill(pid, SIGTERM);
  int status = 0;
  ::waitpid(pid, &status, 0);
  auto done = Gc(repo_);
  EXPECT_TRUE(done["complete"].get<bool>()) << done.dump();
  EXPECT_LT(DirBytes(repo_ + "/vms/vm1/data"), before);
  ExpectKeptWhole(repo_, {"vm1/vda/6"});
}

// Leftovers of interrupted backups go; a VM whose liveness is not known
// whole keeps everything.
TEST_F(GcTest, LeftoversGoButAVmOfUnknownLivenessKeepsEverything) {
  MakeSeries(repo_, "vm1", 10);
  const std::string stray = repo_ + "/vms/vm1/data/00000000000fffff.ctr";
  ASSERT_TRUE(WriteFileBytes(stray, "left by a backup that died"));
  auto j = Gc(repo_);
  EXPECT_EQ(j["vms"][0]["leftovers_removed"], 1) << j.dump();
  EXPECT_FALSE(fs::exists(stray));
  ExpectKeptWhole(repo_, {"vm1/vda/1", "vm1/vda/6"});

  ASSERT_EQ(Vmdedup({"forget", "-r", repo_, "--keep-last", "1"}).exit_code, 0);
  {
    auto repo = Repository::Open(repo_);
    ASSERT_TRUE(repo.ok());
    auto vm = (*repo)->OpenVm("vm1", Repository::Access::kWrite);
    ASSERT_TRUE(vm.ok());
    auto segs = (*vm)->GetSnapshotSegments("vda", 6);
    ASSERT_TRUE(segs.ok());
    WriteBatch b;
    b.Delete(SegmentRecipeKey((*segs)[0]));
    ASSERT_TRUE((*vm)->meta()->Write(b, true).ok());
  }
  const uint64_t before = DirBytes(repo_ + "/vms/vm1/data");
  auto k = Gc(repo_, {}, 5);
  EXPECT_NE(k["vms"][0]["skipped"].get<std::string>().find("missing recipe"), std::string::npos)
      << k.dump();
  EXPECT_EQ(DirBytes(repo_ + "/vms/vm1/data"), before);
}

// A crash at every write gc makes (the fault injection's kCrash: that
// write and everything after it fail): the kept snapshots restore, check
// finds no damage, and the next gc finishes the job to the same result.
TEST_F(GcTest, ACrashAtEveryWriteOfGcLeavesOnlyWhatTheNextGcRemoves) {
  MakeSeries(repo_, "vm1", 11);
  ASSERT_EQ(Vmdedup({"forget", "-r", repo_, "--keep-last", "2"}).exit_code, 0);
  const std::string pristine = dir_.Sub("pristine");
  fs::copy(repo_, pristine, fs::copy_options::recursive);
  // The writes of a gc without faults, and what it leaves.
  auto count = [&](uint64_t fail_at, uint64_t* writes) -> Status {
    auto plan = std::make_shared<FaultPlan>();
    plan->kind = FaultPlan::Kind::kCrash;
    plan->fail_at = fail_at;
    auto base = NewLocalObjectStore(repo_);
    auto objects = NewFaultInjectingObjectStore(base.get(), plan);
    RepositoryOptions options;
    options.objects = objects.get();
    std::vector<std::unique_ptr<MetadataStore>> keep;
    options.wrap_metadata = [plan, &keep](std::unique_ptr<MetadataStore> inner) {
      MetadataStore* raw = inner.get();
      keep.push_back(std::move(inner));
      return NewFaultInjectingMetadataStore(raw, plan);
    };
    auto repo = Repository::Open(repo_, std::move(options));
    if (!repo.ok()) return repo.status();
    auto r = CollectGarbage(**repo, GcOptions{});
    *writes = plan->write_ops.load();
    return r.status();
  };
  uint64_t writes = 0;
  ASSERT_TRUE(count(0, &writes).ok());
  const uint64_t clean_bytes = DirBytes(repo_ + "/vms/vm1/data");
  ASSERT_GE(writes, 3u);  // the first batch, a new container, the re-pointing batch
  for (uint64_t n = 1; n <= writes; n++) {
    SCOPED_TRACE("crash at write " + std::to_string(n) + " of " + std::to_string(writes));
    fs::remove_all(repo_);
    fs::copy(pristine, repo_, fs::copy_options::recursive);
    uint64_t w = 0;
    EXPECT_FALSE(count(n, &w).ok());
    ExpectKeptWhole(repo_, {"vm1/vda/5", "vm1/vda/6"});
    auto j = Gc(repo_);
    EXPECT_TRUE(j["complete"].get<bool>()) << j.dump();
    EXPECT_EQ(DirBytes(repo_ + "/vms/vm1/data"), clean_bytes);
    ExpectKeptWhole(repo_, {"vm1/vda/5", "vm1/vda/6"});
  }
}

// SIGKILL at random instants of a gc run by the binary.
TEST_F(GcTest, SigkillAtRandomPointsNeverLosesAKeptSnapshot) {
  MakeSeries(repo_, "vm1", 12);
  ASSERT_EQ(Vmdedup({"forget", "-r", repo_, "--keep-last", "2"}).exit_code, 0);
  const std::string pristine = dir_.Sub("pristine");
  fs::copy(repo_, pristine, fs::copy_options::recursive);
  std::mt19937_64 rng(12);
  int killed_midway = 0;
  for (int i = 0; i < 24; i++) {
    fs::remove_all(repo_);
    fs::copy(pristine, repo_, fs::copy_options::recursive);
    const int delay_ms = static_cast<int>(rng() % 400);
    SCOPED_TRACE("SIGKILL after " + std::to_string(delay_ms) + " ms");
    int pid = SpawnLogged({VmdedupBinary(), "gc", "-r", repo_}, dir_.Sub("gc.log"));
    ASSERT_GT(pid, 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) killed_midway++;
    ExpectKeptWhole(repo_, {"vm1/vda/5", "vm1/vda/6"});
    auto j = Gc(repo_);
    EXPECT_TRUE(j["complete"].get<bool>()) << j.dump();
    ExpectKeptWhole(repo_, {"vm1/vda/5", "vm1/vda/6"});
    if (HasFailure()) break;
  }
  EXPECT_GT(killed_midway, 0);
}

}  // namespace
}  // namespace vmdedup::testing
