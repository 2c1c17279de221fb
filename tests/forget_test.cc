// `vmdedup forget` end to end with the binary: a policy per series, tags
// from `backup --tag`, snapshots named, --dry-run, an interrupted forget
// finished by the next one, bad usage. Whatever is forgotten, every
// snapshot left restores bit-exactly, check finds no damage, and the next
// backup (also after the newest snapshot was forgotten) is whole.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "store/object_store.h"
#include "store/repository.h"
#include "store/snapshot_ledger.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class ForgetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_ = dir_.Sub("repo");
    ASSERT_EQ(Vmdedup({"init", repo_}).exit_code, 0);
  }
  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }
  std::string Image(const std::string& vm) { return dir_.Sub(vm + ".raw"); }
  // Changes the VM's image and backs it up; returns the snapshot id.
  std::string Backup(const std::string& vm, const std::vector<std::string>& extra = {}) {
    std::string data = ReadFileBytes(Image(vm));
    if (data.empty()) data = RandomBytes(4 * kMiB, vm[0]);
    counter_++;
    data.replace((counter_ % 4) * kMiB, 65536, RandomBytes(65536, 1000 + counter_));
    EXPECT_TRUE(WriteFileBytes(Image(vm), data));
    std::vector<std::string> args = {"backup", "-r", repo_, "--vm", vm, "--disk", "vda", "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    args.push_back("raw:" + Image(vm));
    auto r = Vmdedup(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    if (r.exit_code != 0) return "";
    const std::string id = nlohmann::json::parse(r.out)["id"];
    expected_[id] = data;
    last_err_ = r.err;
    return id;
  }
  std::set<std::string> Listed() {
    auto r = Vmdedup({"snapshots", "-r", repo_, "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::set<std::string> out;
    std::string line;
    for (size_t pos = 0; pos < r.out.size();) {
      size_t end = r.out.find('\n', pos);
      line = r.out.substr(pos, end - pos);
      pos = end == std::string::npos ? r.out.size() : end + 1;
      if (!line.empty()) out.insert(nlohmann::json::parse(line)["id"].get<std::string>());
    }
    return out;
  }
  // Every snapshot still listed restores bit-exactly; check is clean.
  void ExpectWhole() {
    for (const std::string& id : Listed()) {
      const std::string out = dir_.Sub("restored.raw");
      std::filesystem::remove(out);
      auto r = Vmdedup({"restore", "-r", repo_, id, "--to", out});
      EXPECT_EQ(r.exit_code, 0) << id << r.err;
      EXPECT_TRUE(ReadFileBytes(out) == expected_[id]) << id;
    }
    auto c = Vmdedup({"check", "-r", repo_, "--read-data"});
    EXPECT_EQ(c.exit_code, 0) << c.out;
  }

  ScratchDir dir_;
  std::string repo_, last_err_;
  int counter_ = 0;
  std::map<std::string, std::string> expected_;
};

TEST_F(ForgetTest, APolicyKeepsWhatItsRulesNameInEverySeries) {
  const std::string a1 = Backup("a", {"--tag", "pre-upgrade", "--tag", "x"});
  const std::string a2 = Backup("a"), a3 = Backup("a");
  const std::string b1 = Backup("b"), b2 = Backup("b");
  // A dry run says it all and removes nothing.
  auto dry = Vmdedup({"forget", "-r", repo_, "--keep-last", "1", "--keep-tag", "pre-upgrade",
                      "--dry-run", "--json"});
  ASSERT_EQ(dry.exit_code, 0) << dry.err;
  auto dj = nlohmann::json::parse(dry.out);
  EXPECT_TRUE(dj["dry_run"].get<bool>());
  EXPECT_EQ(dj["removed"], 0);
  std::set<std::string> removed, kept;
  for (const auto& series : dj["series"]) {
    for (const auto& s : series["remove"]) removed.insert(s["id"].get<std::string>());
    for (const auto& s : series["keep"]) kept.insert(s["id"].get<std::string>());
  }
  EXPECT_EQ(removed, (std::set<std::string>{a2, b1}));
  EXPECT_EQ(kept, (std::set<std::string>{a1, a3, b2}));
  EXPECT_EQ(Listed().size(), 5u);

  auto r = Vmdedup({"forget", "-r", repo_, "--keep-last", "1", "--keep-tag", "pre-upgrade"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("tag pre-upgrade"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("removed 2 snapshot(s)"), std::string::npos) << r.out;
  EXPECT_EQ(Listed(), (std::set<std::string>{a1, a3, b2}));
  ExpectWhole();
  // The series goes on from what is left.
  Backup("a");
  Backup("b");
  ExpectWhole();
  // --vm and --disk narrow the scope.
  auto narrow = Vmdedup({"forget", "-r", repo_, "--vm", "b", "--disk", "vda", "--keep-last", "1"});
  ASSERT_EQ(narrow.exit_code, 0) << narrow.err;
  EXPECT_EQ(Listed().size(), 4u);  // a: 3, b: 1
  ExpectWhole();
}

TEST_F(ForgetTest, NamedSnapshotsAndTheNewestOneToo) {
  const std::string a1 = Backup("a"), a2 = Backup("a"), a3 = Backup("a");
  auto r = Vmdedup({"forget", "-r", repo_, a1, "a/vda/latest"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(Listed(), (std::set<std::string>{a2}));
  ExpectWhole();
  // The newest snapshot is gone: the next backup continues a/vda/2 and is
  // whole (its sequence number is never handed out again).
  const std::string a4 = Backup("a");
  EXPECT_EQ(a4, "a/vda/4");
  ExpectWhole();
}

TEST_F(ForgetTest, AnInterruptedForgetIsFinishedByTheNextOne) {
  const std::string a1 = Backup("a"), a2 = Backup("a");
  // A forget that marked a/vda/1 in the ledger and died before deleting
  // its records.
  {
    auto repo = Repository::Open(repo_);
    ASSERT_TRUE(repo.ok());
    auto ledger = ReadLedger(*(*repo)->objects(), "a");
    ASSERT_TRUE(ledger.ok() && ledger->has_value());
    (**ledger)[{"vda", 1}] = LedgerState::kForgotten;
    ASSERT_TRUE(WriteLedger(*(*repo)->objects(), "a", **ledger).ok());
  }
  auto c = Vmdedup({"check", "-r", repo_});
  EXPECT_EQ(c.exit_code, 0) << c.out;
  EXPECT_NE(c.out.find("interrupted forget"), std::string::npos) << c.out;
  // A backup does not bring it back.
  Backup("a");
  auto r = Vmdedup({"forget", "-r", repo_, "--keep-last", "10"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("an interrupted forget"), std::string::npos) << r.out;
  EXPECT_EQ(Listed(), (std::set<std::string>{a2, "a/vda/3"}));
  ExpectWhole();
}

TEST_F(ForgetTest, BadUsageIsRefusedBeforeAnythingIsRemoved) {
  Backup("a");
  Backup("a");
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"forget", "-r", repo_},                                 // no policy: everything
           {"forget", "-r", repo_, "--keep-last", "1", "a/vda/1"},  // both
           {"forget", "-r", repo_, "--keep-last", "0"},             // zero
           {"forget", "-r", repo_, "--keep-daily", "x"},            // not a count
           {"forget", "-r", repo_, "--keep-within", "7w"},          // no weeks
           {"forget", "-r", repo_, "--vm", "a", "a/vda/1"},         // --vm with names
           {"backup", "-r", repo_, "--vm", "a", "--tag", "no spaces", "raw:" + Image("a")},
       }) {
    auto r = Vmdedup(args);
    EXPECT_NE(r.exit_code, 0) << args.back();
  }
  // A VM that does not exist is not created by naming it.
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"forget", "-r", repo_, "--vm", "nosuch", "--keep-last", "1"},
           {"gc", "-r", repo_, "--vm", "nosuch"}}) {
    auto r = Vmdedup(args);
    EXPECT_EQ(r.exit_code, 1) << args[0];
    EXPECT_NE(r.err.find("has no backups"), std::string::npos) << r.err;
  }
  EXPECT_FALSE(std::filesystem::exists(repo_ + "/vms/nosuch"));
  auto missing = Vmdedup({"forget", "-r", repo_, "a/vda/9"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.err.find("does not exist"), std::string::npos) << missing.err;
  EXPECT_EQ(Listed().size(), 2u);
}

}  // namespace
}  // namespace vmdedup::testing
