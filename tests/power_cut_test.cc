// Power cuts (tests/power_cut.h) at many points of real work: backups that
// create VMs and their first snapshots, incrementals, CDS builds and the
// backups that use them. Each scenario runs once without a cut to count its
// write operations (files and directories of the object store and the
// repository, LevelDB's files); then, from the same starting repository,
// once for each of many cut points: the N-th operation fails and every
// later one with it, the run ends, and the disk is made what a power cut
// there could leave (unsynced data dropped or torn, directory entries not
// synced undone). Then, reopened without faults:
//   - `check --read-data` finds no damage (leftovers only as reclaimable);
//   - every snapshot committed before the cut is there and restores
//     bit-exactly; a snapshot of the step the cut interrupted may be there
//     too (its commit reached the disk before the process learned so), and
//     then restores bit-exactly as well; no other snapshot exists;
//   - the CDS pointer reads, and names a version that loads;
//   - the next backup succeeds (with the CDS in force) and restores.
// The cut "after the last operation" (no cut, then a power failure) is one
// of the points: everything committed must survive it.
//
// Cut points and the tearing are drawn from one seed, printed at the start
// and in every failure: VMDEDUP_TEST_SEED=N reruns a failure exactly.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <set>

#include "base/fingerprint.h"
#include "engine/backup_job.h"
#include "engine/cds_builder.h"
#include "engine/cds_index.h"
#include "engine/restore.h"
#include "store/cds_area.h"
#include "store/check.h"
#include "store/repository.h"
#include "tests/power_cut.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kImageSize = 4 * kMiB;

uint64_t SuiteSeed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("VMDEDUP_TEST_SEED");
    uint64_t s = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::cout << "power cut seed: " << s << " (rerun with VMDEDUP_TEST_SEED=" << s << ")"
              << std::endl;
    return s;
  }();
  return seed;
}

std::string Sha(const std::string& data) {
  return Sha256({reinterpret_cast<const uint8_t*>(data.data()), data.size()}).Hex();
}

// One step of a scenario: a backup of `vm` whose disk holds `content`, or a
// CDS build (`vm` empty).
struct Step {
  std::string vm;
  std::string content;
  bool cds_build() const { return vm.empty(); }
};

// vm → seq → SHA-256 of what the snapshot must restore to.
using Expected = std::map<std::string, std::map<uint64_t, std::string>>;

class PowerCutTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = SuiteSeed();
    repo_ = dir_.Sub("repo");
    start_ = dir_.Sub("start");
    config_.segment_size = 64 << 10;       // many recipes and batches
    config_.container_capacity = 1 << 20;  // several containers a backup
  }

  // A template disk: random data, text, a file copied several times, zeros.
  std::string Template(uint64_t seed) {
    std::string d = RandomBytes(2 * kMiB, seed);
    std::string text;
    while (text.size() < kMiB) text += "power cut line " + std::to_string(text.size()) + "\n";
    d += text.substr(0, kMiB);
    d.resize(kImageSize, '\0');
    for (int i = 0; i < 3; i++)
      d.replace(3 * kMiB + i * 128 * 1024, 128 * 1024, d, 64 * 1024, 128 * 1024);
    return d;
  }
  // A guest's change: a new file, an overwrite, a discard (zeros).
  std::string Changed(std::string d, uint64_t seed) {
    std::mt19937_64 rng(seed);
    auto at = [&](uint64_t len) {
      return std::uniform_int_distribution<uint64_t>(0, (kImageSize - len) / 4096)(rng) * 4096;
    };
    const std::string fresh = RandomBytes(256 * 1024, seed + 1);
    d.replace(at(fresh.size()), fresh.size(), fresh);
    d.replace(at(64 * 1024), 64 * 1024, std::string(64 * 1024, static_cast<char>(rng())));
    d.replace(at(128 * 1024), 128 * 1024, std::string(128 * 1024, '\0'));
    return d;
  }

  std::string ImagePath(const std::string& vm) { return dir_.Sub("disk-" + vm + ".raw"); }

  // Runs one step on `repo`; returns the new snapshot's seq for a backup.
  Result<uint64_t> RunStep(Repository& repo, const Step& step) {
    if (step.cds_build()) {
      CdsBuildOptions o;
      o.fraction_percent = 100;
      ASSIGN_OR_RETURN(CdsBuildResult r, BuildCds(repo, o));
      return r.version;
    }
    if (!WriteFileBytes(ImagePath(step.vm), step.content))
      return Status::IOError("cannot write " + ImagePath(step.vm));
    std::unique_ptr<CdsIndex> cds;
    CdsArea area(repo.objects());
    ASSIGN_OR_RETURN(CdsPointer pointer, area.ReadPointer());
    if (pointer.current != 0) {
      ASSIGN_OR_RETURN(cds, CdsIndex::Load(repo.objects(), pointer.current));
    }
    BackupJobOptions o;
    o.vm = step.vm;
    o.disk = "vda";
    o.source = "raw:" + ImagePath(step.vm);
    o.threads = 2;
    o.cds = cds.get();
    ASSIGN_OR_RETURN(SnapshotRecord snap, RunBackupJob(repo, o));
    return snap.seq;
  }

  // Makes the starting repository by running `steps` without faults, and
  // keeps a copy of it.
  void Prepare(const std::vector<Step>& steps) {
    auto repo = Repository::Create(repo_, config_);
    ASSERT_TRUE(repo.ok()) << repo.status().ToString();
    for (const Step& s : steps) {
      auto seq = RunStep(**repo, s);
      ASSERT_TRUE(seq.ok()) << seq.status().ToString();
      if (!s.cds_build()) start_expected_[s.vm][*seq] = Sha(s.content);
    }
    repo->reset();
    ASSERT_EQ(RunCommand({"cp", "-a", repo_, start_}).exit_code, 0);
  }

  void ResetToStart() {
    std::error_code ec;
    std::filesystem::remove_all(repo_, ec);
    ASSERT_EQ(RunCommand({"cp", "-a", start_, repo_}).exit_code, 0);
  }

  struct Run {
    Expected committed;
    std::optional<Step> interrupted;  // the step the cut ended
    uint64_t operations = 0;
    PowerCut::Outcome outcome;
  };

  // From the starting repository: `steps` under a power cut at operation
  // `cut` (0: none), then the power fails.
  Run RunWithCut(const std::vector<Step>& steps, uint64_t cut, uint64_t seed) {
    Run run;
    run.committed = start_expected_;
    ResetToStart();
    PowerCut pc(repo_, seed);
    pc.ArmAt(cut);
    {
      RepositoryOptions o;
      o.file_system = pc.file_system();
      o.leveldb_env = pc.leveldb_env();
      auto repo = Repository::Open(repo_, o);
      if (!repo.ok()) {
        EXPECT_TRUE(pc.cut()) << repo.status().ToString();
        run.interrupted = steps.front();
      } else {
        for (const Step& s : steps) {
          auto seq = RunStep(**repo, s);
          if (!seq.ok()) {
            EXPECT_TRUE(pc.cut()) << "failed without a cut: " << seq.status().ToString();
            run.interrupted = s;
            break;
          }
          if (!s.cds_build()) run.committed[s.vm][*seq] = Sha(s.content);
        }
      }
    }  // every store closed: nothing writes any more
    run.operations = pc.operations();
    run.outcome = pc.Apply();
    return run;
  }

  std::string RestoreSha(Repository& repo, VmStore& vm, const SnapshotRecord& snap) {
    RestoreRequest req;
    req.path = dir_.Sub("restored.raw");
    req.force = true;
    auto r = RestoreToFile(repo, vm, snap, req);
    if (!r.ok()) return "restore failed: " + r.status().ToString();
    std::string sha = FileSha256(req.path);
    unlink(req.path.c_str());
    return sha;
  }

  // The checks after a cut (see the top of the file).
  void Verify(const Run& run, const std::string& when) {
    auto repo = Repository::Open(repo_);
    ASSERT_TRUE(repo.ok()) << when << ": " << repo.status().ToString();
    CheckOptions co;
    co.read_data = true;
    auto report = CheckRepository(**repo, co);
    ASSERT_TRUE(report.ok()) << when << ": " << report.status().ToString();
    for (const auto& f : report->findings)
      EXPECT_EQ(f.kind, CheckFinding::Kind::kReclaimable) << when << ": " << f.message;

    std::set<std::string> vms;
    for (const auto& [vm, snaps] : run.committed) vms.insert(vm);
    auto listed = (*repo)->ListVms();
    ASSERT_TRUE(listed.ok()) << when << ": " << listed.status().ToString();
    for (const std::string& vm : *listed) vms.insert(vm);
    for (const std::string& vm : vms) {
      auto want =
          run.committed.count(vm) ? run.committed.at(vm) : std::map<uint64_t, std::string>{};
      const bool in_flight = run.interrupted && run.interrupted->vm == vm;
      auto store = (*repo)->OpenVm(vm, Repository::Access::kRead);
      if (!store.ok()) {
        EXPECT_TRUE(want.empty()) << when << ": VM " << vm << ": " << store.status().ToString();
        continue;
      }
      auto snaps = (*store)->ListSnapshots("vda");
      ASSERT_TRUE(snaps.ok()) << when << ": " << snaps.status().ToString();
      std::map<uint64_t, SnapshotRecord> have;
      for (const auto& s : *snaps) have[s.seq] = s;
      for (const auto& [seq, sha] : want)
        EXPECT_TRUE(have.count(seq))
            << when << ": committed snapshot " << vm << "/vda/" << seq << " is gone";
      for (const auto& [seq, snap] : have) {
        std::string sha;
        if (want.count(seq)) {
          sha = want.at(seq);
        } else if (in_flight && seq == (want.empty() ? 1 : want.rbegin()->first + 1)) {
          sha = Sha(run.interrupted->content);  // its commit made it to the disk
        } else {
          ADD_FAILURE() << when << ": snapshot " << vm << "/vda/" << seq
                        << " exists but was never committed";
          continue;
        }
        EXPECT_EQ(RestoreSha(**repo, **store, snap), sha) << when << ": " << vm << "/vda/" << seq;
      }
    }

    // The CDS in force loads; the next backup (with it) succeeds and
    // restores.
    CdsArea area((*repo)->objects());
    auto pointer = area.ReadPointer();
    ASSERT_TRUE(pointer.ok()) << when << ": " << pointer.status().ToString();
    if (pointer->current != 0) {
      auto index = CdsIndex::Load((*repo)->objects(), pointer->current);
      EXPECT_TRUE(index.ok()) << when << ": " << index.status().ToString();
    }
    const Step next{run.interrupted && !run.interrupted->cds_build() ? run.interrupted->vm : "next",
                    Changed(Template(3), seed_ + 99)};
    auto seq = RunStep(**repo, next);
    ASSERT_TRUE(seq.ok()) << when << ": the next backup failed: " << seq.status().ToString();
    auto store = (*repo)->OpenVm(next.vm, Repository::Access::kRead);
    ASSERT_TRUE(store.ok()) << when << ": " << store.status().ToString();
    auto snap = (*store)->GetSnapshot("vda", *seq);
    ASSERT_TRUE(snap.ok()) << when << ": " << snap.status().ToString();
    EXPECT_EQ(RestoreSha(**repo, **store, *snap), Sha(next.content)) << when << ": next backup";
  }

  // Runs `steps` once to count their operations, then under a cut at up to
  // `max_points` of them (all when there are fewer), chosen from the seed,
  // the first, the last and "after the last" always among them.
  void Sweep(const std::string& name, const std::vector<Step>& steps, size_t max_points) {
    const auto t0 = std::chrono::steady_clock::now();
    const uint64_t scenario_seed = seed_ ^ std::hash<std::string>{}(name);
    Run dry = RunWithCut(steps, 0, scenario_seed);
    ASSERT_FALSE(dry.interrupted) << name << ": the run without a cut failed";
    ASSERT_NO_FATAL_FAILURE(Verify(dry, name + ", no cut, power failure after the last step"));
    ASSERT_FALSE(HasFailure()) << name << ": after the run without a cut";
    const uint64_t total = dry.operations;
    ASSERT_GT(total, 20u) << name;
    std::vector<uint64_t> points;
    if (total <= max_points) {
      for (uint64_t k = 1; k <= total; k++) points.push_back(k);
    } else {
      std::set<uint64_t> chosen = {1, total};
      std::mt19937_64 rng(scenario_seed);
      while (chosen.size() < max_points)
        chosen.insert(std::uniform_int_distribution<uint64_t>(1, total)(rng));
      points.assign(chosen.begin(), chosen.end());
    }
    PowerCut::Outcome sum;
    int interrupted = 0;
    for (uint64_t k : points) {
      const uint64_t seed = scenario_seed + k;
      Run run = RunWithCut(steps, k, seed);
      const std::string when =
          name + ", cut at operation " + std::to_string(k) + " of " + std::to_string(total) +
          " (VMDEDUP_TEST_SEED=" + std::to_string(seed_) + "; " + run.outcome.ToString() + ")";
      interrupted += run.interrupted ? 1 : 0;
      sum.files_dropped += run.outcome.files_dropped;
      sum.files_revived += run.outcome.files_revived;
      sum.files_torn += run.outcome.files_torn;
      sum.files_zeroed += run.outcome.files_zeroed;
      sum.dirs_dropped += run.outcome.dirs_dropped;
      ASSERT_NO_FATAL_FAILURE(Verify(run, when));
      ASSERT_FALSE(HasFailure()) << when;
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << name << ": " << total << " operations, " << points.size()
              << " cut points (+1 without a cut), " << interrupted << " runs interrupted; "
              << sum.ToString() << "; " << secs << " s" << std::endl;
    // Nearly every point interrupted the run (a point past the end of a run
    // that happened to write less did not), and the sweep reached every
    // kind of loss.
    EXPECT_GE(interrupted * 10, static_cast<int>(points.size()) * 9);
    EXPECT_GT(sum.files_dropped, 0);
    EXPECT_GT(sum.files_torn, 0);
    EXPECT_GT(sum.dirs_dropped + sum.files_revived, 0);
  }

  ScratchDir dir_;
  uint64_t seed_ = 0;
  RepoConfig config_;
  std::string repo_, start_;
  Expected start_expected_;
};

// New VMs and their first snapshots (directories, the metadata store
// created; an all-zero disk's backup writes no container at all, so nothing
// but the VM's own directories carries its metadata), then an incremental
// of the first VM.
TEST_F(PowerCutTest, FirstBackupsOfNewVmsAndAnIncremental) {
  const std::string a0 = Template(1);
  ASSERT_NO_FATAL_FAILURE(Prepare({}));
  ASSERT_NO_FATAL_FAILURE(Sweep("first backups",
                                {{"z", std::string(kImageSize, '\0')},
                                 {"a", a0},
                                 {"b", Changed(a0, 2)},
                                 {"a", Changed(a0, 3)}},
                                100));
}

// Incrementals of a VM with history: its metadata store reopened (LevelDB
// recovers its log) and written again and again.
TEST_F(PowerCutTest, IncrementalsOfAVmWithHistory) {
  const std::string a0 = Template(4), a1 = Changed(a0, 5), a2 = Changed(a1, 6);
  ASSERT_NO_FATAL_FAILURE(Prepare({{"a", a0}, {"a", a1}}));
  ASSERT_NO_FATAL_FAILURE(
      Sweep("incrementals", {{"a", a2}, {"a", Changed(a2, 7)}, {"a", Changed(a2, 8)}}, 60));
}

// CDS builds (containers, index, manifest, pointer) and the backups that use
// the version they published.
TEST_F(PowerCutTest, CdsBuildsAndBackupsThatUseThem) {
  const std::string t = Template(9);
  ASSERT_NO_FATAL_FAILURE(Prepare({{"a", Changed(t, 10)}, {"b", Changed(t, 11)}}));
  ASSERT_NO_FATAL_FAILURE(
      Sweep("cds builds", {{"", ""}, {"c", Changed(t, 12)}, {"", ""}, {"a", Changed(t, 13)}}, 80));
}

}  // namespace
}  // namespace vmdedup::testing
