// A VM's metadata store damaged below its records (LevelDB table blocks
// that fail their checksums, a lost CURRENT, a lost recipe), end to end
// with the vmdedup binary: check names every snapshot a restore cannot
// read, `repair` salvages all the rest, counters never go back, and the
// next backup, also a bitmap-driven incremental, is whole again.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "store/metadata_repair.h"
#include "store/metadata_store.h"
#include "store/records.h"
#include "store/repository.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;

class MetadataRepairTest : public ::testing::Test {
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
  // Backs up the raw image as vm1/vda; returns the snapshot id ("" when it
  // failed) and remembers the image's content under it.
  std::string BackupRaw() {
    auto r =
        Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "--json", "raw:" + image_});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    if (r.exit_code != 0) return "";
    last_note_ = r.err;
    const std::string id = nlohmann::json::parse(r.out)["id"];
    expected_[id] = ReadFileBytes(image_);
    return id;
  }
  // Four snapshots of an 8 MiB image, each changing a few blocks.
  void MakeSeries() {
    std::string data = RandomBytes(8 * kMiB, 41);
    for (int i = 0; i < 4; i++) {
      std::string change = RandomBytes(256 << 10, 100 + static_cast<uint64_t>(i));
      data.replace(static_cast<size_t>(i + 1) * kMiB + 4096, change.size(), change);
      ASSERT_TRUE(WriteFileBytes(image_, data));
      ASSERT_NE(BackupRaw(), "");
    }
  }
  // Restores `id`: "" when it failed, else its bytes.
  std::optional<std::string> Restore(const std::string& id) {
    const std::string out = dir_.Sub("restored.raw");
    fs::remove(out);
    auto r = Vmdedup({"restore", "-r", repo_, id, "--to", out});
    if (r.exit_code != 0) return std::nullopt;
    return ReadFileBytes(out);
  }
  std::set<std::string> Damaged(const nlohmann::json& j) {
    std::set<std::string> out;
    for (const auto& s : j["damaged_snapshots"]) out.insert(s.get<std::string>());
    return out;
  }
  // Every snapshot made restores exactly or fails, and fails only when
  // `damaged` names it; returns the snapshots that failed.
  std::set<std::string> ExpectRestoresMatch(const std::set<std::string>& damaged) {
    std::set<std::string> failed;
    for (const auto& [id, bytes] : expected_) {
      auto got = Restore(id);
      if (!got) {
        failed.insert(id);
        EXPECT_TRUE(damaged.count(id)) << id << " does not restore and is not named damaged";
        continue;
      }
      EXPECT_TRUE(*got == bytes) << id << " restored with exit 0 but different bytes";
    }
    return failed;
  }
  std::vector<std::string> Tables() {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(repo_ + "/vms/vm1/meta"))
      if (e.path().extension() == ".ldb") out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

  ScratchDir dir_;
  std::string repo_, image_;
  std::string last_note_;
  std::map<std::string, std::string> expected_;  // snapshot id → image bytes
};

// One flipped byte in any LevelDB table: check names every snapshot that
// cannot be restored (a damaged block hides its whole key range, also the
// records of older tables); repair brings back everything outside the
// damaged block; the next backup is whole.
TEST_F(MetadataRepairTest, ADamagedTableNamesEverySnapshotItHidesAndRepairSalvagesTheRest) {
  MakeSeries();
  const std::string pristine = dir_.Sub("pristine");
  fs::copy(repo_, pristine, fs::copy_options::recursive);
  const auto expected_before = expected_;
  const std::vector<std::string> tables = Tables();
  ASSERT_GE(tables.size(), 2u);
  int damaging_flips = 0;
  for (const std::string& table : tables) {
    for (double where : {0.1, 0.5, 0.9}) {
      SCOPED_TRACE(table + " at " + std::to_string(where));
      fs::remove_all(repo_);
      fs::copy(pristine, repo_, fs::copy_options::recursive);
      expected_ = expected_before;
      const std::string path = repo_ + "/vms/vm1/meta/" + table;
      std::string bytes = ReadFileBytes(path);
      bytes[static_cast<size_t>(static_cast<double>(bytes.size()) * where)] ^= 0x5a;
      ASSERT_TRUE(WriteFileBytes(path, bytes));

      auto c = Vmdedup({"check", "-r", repo_, "--json"});
      ASSERT_FALSE(c.out.empty()) << c.err;
      auto cj = nlohmann::json::parse(c.out);
      const std::set<std::string> named = Damaged(cj);
      const std::set<std::string> failed = ExpectRestoresMatch(named);
      if (failed.empty() && c.exit_code == 0) continue;  // the flip hit nothing LevelDB reads
      EXPECT_EQ(c.exit_code, 3) << c.out;
      damaging_flips++;

      auto r = Vmdedup({"repair", "-r", repo_, "--vm", "vm1", "--json"});
      ASSERT_TRUE(r.exit_code == 0 || r.exit_code == 3) << r.out << r.err;
      auto rj = nlohmann::json::parse(r.out);
      EXPECT_TRUE(rj["repaired"].get<bool>()) << r.out;
      EXPECT_TRUE(fs::is_directory(repo_ + "/vms/vm1/" + rj["kept_as"].get<std::string>()));
      const std::set<std::string> still = Damaged(rj);
      for (const auto& id : still) EXPECT_TRUE(named.count(id)) << id << " damaged by the repair";
      const std::set<std::string> failed_after = ExpectRestoresMatch(still);
      EXPECT_EQ(failed_after.size(), still.size()) << r.out;

      // The next backup is whole, and takes nothing from what was lost.
      std::string data = ReadFileBytes(image_);
      data.replace(6 * kMiB, 4096, RandomBytes(4096, 77));
      ASSERT_TRUE(WriteFileBytes(image_, data));
      const std::string next = BackupRaw();
      ASSERT_NE(next, "");
      auto after = Vmdedup({"check", "-r", repo_, "--read-data", "--json"});
      auto aj = nlohmann::json::parse(after.out);
      EXPECT_EQ(Damaged(aj), still) << after.out;
      EXPECT_EQ(Restore(next), data);
    }
  }
  EXPECT_GE(damaging_flips, 2);  // the flips reached data LevelDB reads
}

// Whatever counter value survived a repair, none is below an id or a
// sequence number that the salvaged records use.
TEST_F(MetadataRepairTest, ARepairRaisesEveryCounterAboveTheIdsInUse) {
  const std::string vm_dir = dir_.Sub("vm");
  ASSERT_TRUE(fs::create_directories(vm_dir + "/meta"));
  {
    auto meta = OpenLevelDbMetadataStore(vm_dir + "/meta", true, nullptr);
    ASSERT_TRUE(meta.ok()) << meta.status().ToString();
    WriteBatch b;
    SegmentRecipe recipe;
    recipe.id = 0x10;
    recipe.length = 4096;
    recipe.blocks.push_back({});
    recipe.blocks.back().kind = BlockKind::kZero;
    recipe.blocks.back().length = 4096;
    b.Put(SegmentRecipeKey(0x10), EncodeSegmentRecipe(SegmentRecipeKey(0x10), recipe));
    const std::string list = SnapshotSegmentsKey("vda", 7);
    b.Put(list, EncodeSegmentList(list, {0x10, 0x12}));
    ContainerRecord ctr;
    ctr.id = 0x30;
    ctr.object = "vms/vm/data/0000000000000030.ctr";
    b.Put(ContainerKey(0x30), EncodeContainerRecord(ContainerKey(0x30), ctr));
    for (const auto& [name, value] :
         std::vector<std::pair<std::string, uint64_t>>{{"segment", 4}, {"seq/vda", 2}}) {
      b.Put(CounterKey(name), EncodeCounter(CounterKey(name), value));
    }
    ASSERT_TRUE((*meta)->Write(b, true).ok());
  }
  ASSERT_TRUE(fs::remove(vm_dir + "/meta/CURRENT"));  // the store no longer opens
  auto report = RepairMetadataStore(vm_dir, nullptr);
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  EXPECT_TRUE(report->repaired);
  auto meta = OpenLevelDbMetadataStore(vm_dir + "/meta", false, nullptr);
  ASSERT_TRUE(meta.ok()) << meta.status().ToString();
  auto counter = [&](const std::string& name) {
    std::string v;
    uint64_t n = 0;
    EXPECT_TRUE((*meta)->Get(CounterKey(name), &v).ok()) << name;
    EXPECT_TRUE(DecodeCounter(CounterKey(name), v, &n).ok()) << name;
    return n;
  };
  EXPECT_EQ(counter("segment"), 0x13u);    // above the 0x12 the list references
  EXPECT_EQ(counter("seq/vda"), 8u);       // above snapshot 7
  EXPECT_EQ(counter("container"), 0x31u);  // above the catalogued 0x30
  EXPECT_EQ(report->counters_raised.size(), 3u);
  EXPECT_TRUE(fs::is_directory(vm_dir + "/" + report->kept_as));
  EXPECT_FALSE(fs::exists(vm_dir + "/meta.repair"));
  for (const auto& e : fs::directory_iterator(vm_dir + "/meta"))
    EXPECT_TRUE(e.is_regular_file()) << e.path();  // no lost/ left behind
}

// A lost CURRENT makes the store unopenable and every writer refuses the
// VM; repair rebuilds it from its tables and logs, whole.
TEST_F(MetadataRepairTest, ALostCurrentIsSalvagedWhole) {
  MakeSeries();
  ASSERT_TRUE(fs::remove(repo_ + "/vms/vm1/meta/CURRENT"));
  auto refused = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "raw:" + image_});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_NE(refused.err.find("vmdedup repair"), std::string::npos) << refused.err;
  auto r = Vmdedup({"repair", "-r", repo_, "--vm", "vm1"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("every snapshot of VM vm1 reads whole"), std::string::npos) << r.out;
  EXPECT_TRUE(ExpectRestoresMatch({}).empty());
  ASSERT_NE(BackupRaw(), "");
  EXPECT_EQ(Vmdedup({"check", "-r", repo_, "--read-data"}).exit_code, 0);
}

TEST_F(MetadataRepairTest, AStoreThatReadsWholeIsLeftAsItIsAndABusyVmIsRefused) {
  MakeSeries();
  auto r = Vmdedup({"repair", "-r", repo_, "--vm", "vm1"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("nothing to salvage"), std::string::npos) << r.out;
  for (const auto& e : fs::directory_iterator(repo_ + "/vms/vm1"))
    EXPECT_EQ(e.path().filename().string().find("meta."), std::string::npos) << e.path();
  // A backup holds the VM's lock.
  int fd = ::open((repo_ + "/vms/vm1/lock").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  auto busy = Vmdedup({"repair", "-r", repo_, "--vm", "vm1"});
  EXPECT_EQ(busy.exit_code, 4) << busy.err;
  ::close(fd);
  EXPECT_EQ(Vmdedup({"repair", "-r", repo_, "--vm", "nosuchvm"}).exit_code, 1);
  EXPECT_EQ(Vmdedup({"repair", "-r", repo_}).exit_code, 2);
}

// A recipe that snapshots use and that is gone: check records it lost, and
// the next incremental reads its segment again although no bit of it is
// dirty (level 1 would otherwise reuse the lost recipe unread).
TEST_F(MetadataRepairTest, ALostRecipeIsReadAgainEvenWhereNoBitIsDirty) {
  const std::string qcow2 = dir_.Sub("disk.qcow2");
  ASSERT_TRUE(WriteFileBytes(image_, RandomBytes(8 * kMiB, 42)));
  ASSERT_EQ(
      RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", image_, qcow2}).exit_code, 0);
  auto backup = [&] {
    auto r = Vmdedup(
        {"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "--json", "qcow2:" + qcow2});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    last_note_ = r.err;
    return r.exit_code == 0 ? nlohmann::json::parse(r.out) : nlohmann::json();
  };
  auto content = [&] {
    const std::string raw = dir_.Sub("now.raw");
    fs::remove(raw);
    EXPECT_EQ(RunCommand({"qemu-img", "convert", "-O", "raw", qcow2, raw}).exit_code, 0);
    return ReadFileBytes(raw);
  };
  ASSERT_FALSE(backup().is_null());
  // The recipe of segment 0 (the first 2 MiB) disappears.
  {
    auto repo = Repository::Open(repo_);
    ASSERT_TRUE(repo.ok());
    auto vm = (*repo)->OpenVm("vm1", Repository::Access::kWrite);
    ASSERT_TRUE(vm.ok());
    auto segs = (*vm)->GetSnapshotSegments("vda", 1);
    ASSERT_TRUE(segs.ok());
    WriteBatch b;
    b.Delete(SegmentRecipeKey((*segs)[0]));
    ASSERT_TRUE((*vm)->meta()->Write(b, true).ok());
  }
  auto c = Vmdedup({"check", "-r", repo_, "--json"});
  EXPECT_EQ(c.exit_code, 3) << c.out;
  auto cj = nlohmann::json::parse(c.out);
  EXPECT_EQ(cj["lost_recipes"], 1) << c.out;
  EXPECT_EQ(Damaged(cj), std::set<std::string>{"vm1/vda/1"});
  // Written elsewhere: segment 0 is clean.
  ASSERT_EQ(RunCommand({"qemu-io", "-f", "qcow2", "-c", "write -P 0x44 6M 64k", qcow2}).exit_code,
            0);
  const std::string now = content();
  auto s2 = backup();
  ASSERT_FALSE(s2.is_null());
  EXPECT_NE(last_note_.find("check found missing or unreadable"), std::string::npos) << last_note_;
  EXPECT_EQ(Restore("vm1/vda/2"), now);
  auto again = nlohmann::json::parse(Vmdedup({"check", "-r", repo_, "--read-data", "--json"}).out);
  EXPECT_EQ(Damaged(again), std::set<std::string>{"vm1/vda/1"});
  EXPECT_EQ(again["lost_recipes"], 0);  // recorded once
}

// Snapshots committed once and gone from the metadata store (a lost log,
// metadata put back from an older copy) are damage, never a shorter
// history: check names them and reports nothing of theirs reclaimable,
// backups refuse the VM (they would hand the lost numbers out again), and
// repair records the loss, after which the series goes on above them.
TEST_F(MetadataRepairTest, CommittedSnapshotsTheStoreLostAreDamageUntilRepairRecordsThem) {
  struct Loss {
    const char* what;
    std::function<void()> before_last_backups;  // runs after two backups
    std::function<void()> apply;
  };
  const std::string old_meta = dir_.Sub("old-meta");
  const std::vector<Loss> losses = {
      {"lost log", [] {},
       [&] {
         for (const auto& e : fs::directory_iterator(repo_ + "/vms/vm1/meta"))
           if (e.path().extension() == ".log") fs::remove(e.path());
       }},
      {"metadata put back from an older copy",
       [&] { fs::copy(repo_ + "/vms/vm1/meta", old_meta, fs::copy_options::recursive); },
       [&] {
         fs::remove_all(repo_ + "/vms/vm1/meta");
         fs::rename(old_meta, repo_ + "/vms/vm1/meta");
       }},
  };
  for (const Loss& loss : losses) {
    SCOPED_TRACE(loss.what);
    fs::remove_all(repo_);
    fs::remove_all(old_meta);
    expected_.clear();
    ASSERT_EQ(Vmdedup({"init", repo_}).exit_code, 0);
    std::string data = RandomBytes(4 * kMiB, 43);
    for (int i = 0; i < 4; i++) {
      if (i == 2) loss.before_last_backups();
      data.replace(static_cast<size_t>(i) * kMiB, 65536, RandomBytes(65536, 200 + i));
      ASSERT_TRUE(WriteFileBytes(image_, data));
      ASSERT_NE(BackupRaw(), "");
    }
    loss.apply();

    auto c = Vmdedup({"check", "-r", repo_, "--json"});
    EXPECT_EQ(c.exit_code, 3) << c.out;
    auto cj = nlohmann::json::parse(c.out);
    const std::set<std::string> gone = Damaged(cj);
    EXPECT_FALSE(gone.empty()) << c.out;
    EXPECT_EQ(cj["reclaimable_bytes"], 0) << c.out;  // the lost snapshots' containers are kept
    auto refused =
        Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "raw:" + image_});
    EXPECT_EQ(refused.exit_code, 1);
    EXPECT_NE(refused.err.find("lost"), std::string::npos) << refused.err;
    EXPECT_NE(refused.err.find("vmdedup repair"), std::string::npos) << refused.err;

    auto r = Vmdedup({"repair", "-r", repo_, "--vm", "vm1", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    auto rj = nlohmann::json::parse(r.out);
    std::set<std::string> recorded;
    for (const auto& id : rj["lost_snapshots"]) recorded.insert(id.get<std::string>());
    EXPECT_EQ(recorded, gone) << r.out;
    for (const auto& id : gone) expected_.erase(id);
    EXPECT_TRUE(ExpectRestoresMatch({}).empty());
    // The series goes on above the lost numbers.
    const std::string next = BackupRaw();
    EXPECT_EQ(next, "vm1/vda/5");
    EXPECT_EQ(Vmdedup({"check", "-r", repo_, "--read-data"}).exit_code, 0);
  }
}

// A ledger that does not decode: backups refuse the VM (whether snapshots
// were lost cannot be told), repair writes it again from the store. A VM
// without a ledger (backed up by an older vmdedup) gets one at its next
// backup.
TEST_F(MetadataRepairTest, ADamagedLedgerIsWrittenAgainByRepairAndAMissingOneByTheNextBackup) {
  MakeSeries();
  const std::string ledger = repo_ + "/vms/vm1/ledger";
  std::string bytes = ReadFileBytes(ledger);
  ASSERT_FALSE(bytes.empty());
  bytes[bytes.size() / 2] ^= 0x10;
  ASSERT_TRUE(WriteFileBytes(ledger, bytes));
  EXPECT_EQ(Vmdedup({"check", "-r", repo_}).exit_code, 3);
  auto refused = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "raw:" + image_});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_NE(refused.err.find("snapshot ledger"), std::string::npos) << refused.err;
  auto r = Vmdedup({"repair", "-r", repo_, "--vm", "vm1", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_TRUE(nlohmann::json::parse(r.out)["ledger_rewritten"].get<bool>()) << r.out;
  EXPECT_EQ(Vmdedup({"check", "-r", repo_}).exit_code, 0);
  ASSERT_TRUE(fs::remove(ledger));
  EXPECT_EQ(Vmdedup({"check", "-r", repo_}).exit_code, 0);
  ASSERT_NE(BackupRaw(), "");
  EXPECT_TRUE(fs::exists(ledger));
  EXPECT_TRUE(ExpectRestoresMatch({}).empty());
}

}  // namespace
}  // namespace vmdedup::testing
