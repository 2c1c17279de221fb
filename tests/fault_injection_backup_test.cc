// In-process fault injection into whole backups (RunBackupJob with a real
// qcow2 image served by qemu-nbd): the repository's object store and its
// metadata stores are wrapped by the fault-injecting twins of
// store/fault_injection.h, sharing one FaultPlan. For every write operation
// N of a backup (object Put or metadata Write, counted from 1) and every
// fault kind (I/O error, no space, short write, crash), the backup with the
// fault at N must fail with the matching Status (or succeed when its N-th
// write never came); then, reopened without faults, the repository must
// check clean (leftovers reclaimable, never errors), every earlier snapshot
// must restore bit-exactly, and the next backup must succeed, stay
// incremental (the failed run gave its dirty bitmap back) and restore
// bit-exactly. Both the first backup of a VM (with its VM-info write) and
// incrementals are swept.
//
// Write order (docs/format.md): [vm-info], then per container: counter
// (the id, synced), Put, batch (catalog + recipes), ..., and the commit.
// With the default container capacity a backup of this small image writes
// one container, which already reaches every kind of state a crash can
// leave: an id without an object, an object without a catalog record, a
// catalogued container and recipes that no snapshot references.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <regex>

#include "base/fingerprint.h"
#include "engine/backup_job.h"
#include "engine/restore.h"
#include "store/check.h"
#include "store/object_store.h"
#include "store/repository.h"
#include "tests/fault_injection.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

using Kind = FaultPlan::Kind;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kImageSize = 8 * kMiB;
constexpr uint64_t kImageData = 3 * kMiB;

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kNone:
      return "none";
    case Kind::kIOError:
      return "IOError";
    case Kind::kNoSpace:
      return "NoSpace";
    case Kind::kShortWrite:
      return "ShortWrite";
    case Kind::kCrash:
      return "Crash";
  }
  return "?";
}

// Owns the real metadata store under its fault-injecting wrapper (the
// wrapper does not own its base).
class OwningFaultyMetadataStore final : public MetadataStore {
 public:
  OwningFaultyMetadataStore(std::unique_ptr<MetadataStore> base, std::shared_ptr<FaultPlan> plan)
      : base_(std::move(base)),
        faulty_(NewFaultInjectingMetadataStore(base_.get(), std::move(plan))) {}
  Status Get(std::string_view key, std::string* value) override { return faulty_->Get(key, value); }
  Status Write(const WriteBatch& batch, bool sync) override { return faulty_->Write(batch, sync); }
  Status Scan(std::string_view prefix,
              const std::function<bool(std::string_view, std::string_view)>& fn) override {
    return faulty_->Scan(prefix, fn);
  }
  uint64_t ApproximateBytes() override { return faulty_->ApproximateBytes(); }

 private:
  std::unique_ptr<MetadataStore> base_;  // destroyed after faulty_
  std::unique_ptr<MetadataStore> faulty_;
};

// A repository whose object and metadata writes go through one FaultPlan.
struct FaultyRepo {
  std::shared_ptr<FaultPlan> plan = std::make_shared<FaultPlan>();
  std::unique_ptr<ObjectStore> base_objects;
  std::unique_ptr<ObjectStore> objects;
  std::unique_ptr<Repository> repo;  // declared last: destroyed first
};

class FaultInjectionBackupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_path_ = dir_.Sub("repo");
    image_ = dir_.Sub("disk.qcow2");
  }

  // A new repository (config_, by default the default configuration) and a
  // new image with random
  // data. With `reuse_image`, the image made by the last Reset with the same
  // seed is copied back instead (faster; no bitmaps of other repositories).
  void Reset(uint64_t seed, bool reuse_image = false) {
    std::error_code ec;
    std::filesystem::remove_all(repo_path_, ec);
    unlink(image_.c_str());
    auto repo = Repository::Create(repo_path_, config_);
    ASSERT_TRUE(repo.ok()) << repo.status().ToString();
    rng_.seed(seed);
    expected_.clear();
    const std::string pristine = dir_.Sub("pristine-" + std::to_string(seed) + ".qcow2");
    if (reuse_image && !pristine_sha_.empty()) {
      auto r = RunCommand({"cp", pristine, image_});
      ASSERT_EQ(r.exit_code, 0) << r.err;
      sha_ = pristine_sha_;
      return;
    }
    std::string raw = dir_.Sub("seed.raw");
    {
      std::ofstream out(raw, std::ios::binary | std::ios::trunc);
      std::string bytes = RandomBytes(kImageData, seed);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    ASSERT_EQ(truncate(raw.c_str(), kImageSize), 0);
    auto r = RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    unlink(raw.c_str());
    sha_ = ImageSha();
    auto r2 = RunCommand({"cp", image_, pristine});
    ASSERT_EQ(r2.exit_code, 0) << r2.err;
    pristine_sha_ = sha_;
  }

  std::string ImageSha() {
    std::string raw = dir_.Sub("current.raw");
    unlink(raw.c_str());
    auto r = RunCommand({"qemu-img", "convert", "-O", "raw", image_, raw});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string sha = FileSha256(raw);
    unlink(raw.c_str());
    return sha;
  }

  uint64_t Rand(uint64_t lo, uint64_t hi) {
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng_);
  }

  // A guest-like change of a steady size: 512 KiB of random data, a small
  // pattern write and a discard.
  void Change() {
    std::string pattern = dir_.Sub("pattern.bin");
    {
      std::ofstream out(pattern, std::ios::binary | std::ios::trunc);
      std::string bytes = RandomBytes(512 * 1024, rng_());
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    uint64_t off = Rand(0, (kImageSize - 512 * 1024) / 65536) * 65536;
    uint64_t p = Rand(0, kImageSize / 4096 - 4) * 4096;
    uint64_t d = Rand(0, kImageSize / 65536 - 2) * 65536;
    auto r = RunCommand(
        {"qemu-io", "-f", "qcow2", "-c",
         "write -q -s " + pattern + " " + std::to_string(off) + " 512k", "-c",
         "write -q -P " + std::to_string(Rand(1, 255)) + " " + std::to_string(p) + " 12k", "-c",
         "discard -q " + std::to_string(d) + " 128k", image_});
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
    sha_ = ImageSha();
  }

  Result<std::unique_ptr<FaultyRepo>> OpenFaulty(Kind kind, uint64_t fail_at) {
    auto f = std::make_unique<FaultyRepo>();
    f->plan->kind = kind;
    f->plan->fail_at = fail_at;
    f->base_objects = NewLocalObjectStore(repo_path_);
    f->objects = NewFaultInjectingObjectStore(f->base_objects.get(), f->plan);
    std::shared_ptr<FaultPlan> plan = f->plan;
    RepositoryOptions options;
    options.objects = f->objects.get();
    options.wrap_metadata = [plan](std::unique_ptr<MetadataStore> base) {
      return std::unique_ptr<MetadataStore>(new OwningFaultyMetadataStore(std::move(base), plan));
    };
    ASSIGN_OR_RETURN(f->repo, Repository::Open(repo_path_, std::move(options)));
    return f;
  }

  BackupJobOptions JobOptions() {
    BackupJobOptions o;
    o.vm = "vm1";
    o.disk = "vda";
    o.source = "qcow2:" + image_;
    o.threads = 2;
    return o;
  }

  // One backup with the fault armed at write `fail_at` (0: none). Returns
  // its result and the plan (write count, faults injected).
  std::pair<Result<SnapshotRecord>, std::shared_ptr<FaultPlan>> FaultyBackup(Kind kind,
                                                                             uint64_t fail_at) {
    auto f = OpenFaulty(kind, fail_at);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    if (!f.ok()) return {f.status(), nullptr};
    auto snap = RunBackupJob(*(*f)->repo, JobOptions());
    return {std::move(snap), (*f)->plan};
  }

  // Restores snapshot `seq` and returns the SHA-256 of the image.
  std::string RestoreSha(Repository& repo, VmStore& vm, uint64_t seq) {
    auto snap = vm.GetSnapshot("vda", seq);
    EXPECT_TRUE(snap.ok()) << snap.status().ToString();
    if (!snap.ok()) return "";
    RestoreRequest req;
    req.path = dir_.Sub("restored.raw");
    req.force = true;
    auto r = RestoreToFile(repo, vm, *snap, req);
    EXPECT_TRUE(r.ok()) << "restore vm1/vda/" << seq << ": " << r.status().ToString();
    std::string sha = FileSha256(req.path);
    unlink(req.path.c_str());
    return sha;
  }

  // Without faults: check finds no damage, the snapshots are exactly the
  // committed ones and each restores bit-exactly. Returns the check report.
  CheckReport VerifyRepository(const std::string& when) {
    auto repo = Repository::Open(repo_path_);
    EXPECT_TRUE(repo.ok()) << when << ": " << repo.status().ToString();
    if (!repo.ok()) return {};
    CheckOptions co;
    co.read_data = true;
    auto report = CheckRepository(**repo, co);
    EXPECT_TRUE(report.ok()) << when << ": " << report.status().ToString();
    if (!report.ok()) return {};
    for (const auto& f : report->findings)
      EXPECT_EQ(f.kind, CheckFinding::Kind::kReclaimable) << when << ": " << f.message;
    EXPECT_TRUE(report->ok()) << when;
    EXPECT_EQ(report->snapshots, expected_.size()) << when;
    auto vms = (*repo)->ListVms();
    if (!vms.ok() || vms->empty()) {
      EXPECT_TRUE(expected_.empty()) << when << ": no VM in the repository";
      return *report;
    }
    auto vm = (*repo)->OpenVm("vm1", Repository::Access::kRead);
    EXPECT_TRUE(vm.ok()) << when << ": " << vm.status().ToString();
    if (!vm.ok()) return *report;
    auto snaps = (*vm)->ListSnapshots("vda");
    EXPECT_TRUE(snaps.ok());
    if (!snaps.ok()) return *report;
    std::vector<uint64_t> seqs, want;
    for (const auto& s : *snaps) seqs.push_back(s.seq);
    for (const auto& [seq, sha] : expected_) want.push_back(seq);
    EXPECT_EQ(seqs, want) << when;
    for (const auto& [seq, sha] : expected_)
      EXPECT_EQ(RestoreSha(**repo, **vm, seq), sha) << when << ": snapshot vm1/vda/" << seq;
    return *report;
  }

  // The next backup, without faults: succeeds, restores bit-exactly, and
  // (after a first snapshot) is incremental.
  void CleanBackup(const std::string& when, bool expect_incremental) {
    auto repo = Repository::Open(repo_path_);
    ASSERT_TRUE(repo.ok()) << repo.status().ToString();
    auto snap = RunBackupJob(**repo, JobOptions());
    ASSERT_TRUE(snap.ok()) << when << ": " << snap.status().ToString();
    EXPECT_EQ(snap->seq, expected_.empty() ? 1u : expected_.rbegin()->first + 1) << when;
    expected_[snap->seq] = sha_;
    if (expect_incremental) {
      EXPECT_EQ(snap->read_mode.rfind("incremental", 0), 0u) << when << ": " << snap->read_mode;
    }
    auto vm = (*repo)->OpenVm("vm1", Repository::Access::kRead);
    ASSERT_TRUE(vm.ok()) << vm.status().ToString();
    EXPECT_EQ(RestoreSha(**repo, **vm, snap->seq), sha_) << when << ": new snapshot " << snap->seq;
  }

  // Write operations of a backup without faults (it commits a snapshot).
  uint64_t CountWrites(const std::string& when, bool expect_incremental) {
    auto [snap, plan] = FaultyBackup(Kind::kNone, 0);
    EXPECT_TRUE(snap.ok()) << when << ": " << snap.status().ToString();
    if (!snap.ok() || !plan) return 0;
    expected_[snap->seq] = sha_;
    if (expect_incremental) {
      EXPECT_EQ(snap->read_mode.rfind("incremental", 0), 0u) << snap->read_mode;
    }
    EXPECT_EQ(plan->faults_injected.load(), 0u);
    return plan->write_ops.load();
  }

  // Runs the backup with `kind` at write `n` and checks how it ended.
  void RunFaulty(Kind kind, uint64_t n, const std::string& when) {
    const std::string attempt_sha = sha_;
    auto [snap, plan] = FaultyBackup(kind, n);
    ASSERT_TRUE(plan) << when;
    const uint64_t injected = plan->faults_injected.load();
    if (injected == 0) {
      // The backup wrote fewer than n times: it must have succeeded.
      ASSERT_TRUE(snap.ok()) << when << ": failed without a fault: " << snap.status().ToString();
      EXPECT_LT(plan->write_ops.load(), n) << when;
      EXPECT_EQ(snap->seq, expected_.empty() ? 1u : expected_.rbegin()->first + 1) << when;
      expected_[snap->seq] = attempt_sha;
      unfired_++;
      VerifyRepository(when);
      return;
    }
    fired_++;
    if (snap.ok()) {
      // The one write after the commit: the snapshot ledger. Its failure
      // leaves the snapshot committed (a warning says so) and the ledger
      // behind the store; a torn one (a short write) stops the next
      // backups until `repair` writes it again, as docs/operations.md says.
      ASSERT_EQ(plan->FirstFault(), "vms/vm1/ledger")
          << when << ": a fault was injected but the backup committed " << snap->Id();
      expected_[snap->seq] = attempt_sha;
      if (kind == Kind::kShortWrite) {
        auto repo = Repository::Open(repo_path_);
        ASSERT_TRUE(repo.ok()) << repo.status().ToString();
        auto repaired = (*repo)->RepairVmMetadata("vm1");
        ASSERT_TRUE(repaired.ok()) << when << ": " << repaired.status().ToString();
        EXPECT_TRUE(repaired->ledger_rewritten) << when;
      }
      VerifyRepository(when);
      return;
    }
    const Status& st = snap.status();
    EXPECT_NE(st.message().find("injected"), std::string::npos) << when << ": " << st.ToString();
    if (kind == Kind::kNoSpace) {
      EXPECT_TRUE(st.IsNoSpace()) << when << ": " << st.ToString();
    } else {
      EXPECT_TRUE(st.IsIOError()) << when << ": " << st.ToString();
    }
    EXPECT_EQ(injected, 1u) << when;
    // A failed backup stops writing at its first failure.
    EXPECT_EQ(plan->write_ops.load(), n) << when << ": writes went on after the failure";

    CheckReport report = VerifyRepository(when);
    // A short Put left a truncated object under the container's final name:
    // nothing references it, nothing catalogues it, check reports it as
    // reclaimable.
    std::smatch m;
    std::string msg = st.message();
    if (kind == Kind::kShortWrite &&
        std::regex_search(msg, m, std::regex("put (vms/vm1/data/[0-9a-f]{16}\\.ctr)"))) {
      short_puts_++;
      const std::string object = m[1];
      struct stat sb;
      EXPECT_EQ(stat((repo_path_ + "/" + object).c_str(), &sb), 0) << when << ": " << object;
      bool reported = false;
      for (const auto& f : report.findings)
        if (f.kind == CheckFinding::Kind::kReclaimable &&
            f.message.find(object) != std::string::npos &&
            f.message.find("not in the catalog") != std::string::npos)
          reported = true;
      EXPECT_TRUE(reported) << when << ": truncated " << object << " not reported as reclaimable";
    }
  }

  ScratchDir dir_;
  RepoConfig config_;
  std::string repo_path_, image_;
  std::mt19937_64 rng_;
  std::string sha_, pristine_sha_;
  std::map<uint64_t, std::string> expected_;
  int fired_ = 0, unfired_ = 0, short_puts_ = 0;
};

TEST_F(FaultInjectionBackupTest, EveryWriteOfTheFirstBackupAndOfIncrementalsMayFail) {
  auto start = std::chrono::steady_clock::now();
  const Kind kinds[] = {Kind::kIOError, Kind::kNoSpace, Kind::kShortWrite, Kind::kCrash};
  uint64_t seed = 1;

  // The first backup of a VM: its writes, the VM-info record first.
  ASSERT_NO_FATAL_FAILURE(Reset(seed));
  const uint64_t first_writes = CountWrites("counting the first backup", false);
  // vm-info, counter, Put, batch, commit.
  ASSERT_GE(first_writes, 5u);
  std::cout << "first backup: " << first_writes << " writes" << std::endl;
  for (Kind kind : kinds) {
    for (uint64_t n = 1; n <= first_writes + 1; n++) {
      const std::string when = std::string("first backup, ") + KindName(kind) + " at write " +
                               std::to_string(n) + " of " + std::to_string(first_writes);
      ASSERT_NO_FATAL_FAILURE(Reset(seed, /*reuse_image=*/true));
      ASSERT_NO_FATAL_FAILURE(RunFaulty(kind, n, when));
      if (expected_.empty()) {
        ASSERT_NO_FATAL_FAILURE(CleanBackup(when + "; next backup", /*expect_incremental=*/false));
      } else {
        // Committed: the fault hit the ledger (the last write), or none fired.
        EXPECT_GE(n, first_writes) << when;
      }
      ASSERT_FALSE(HasFailure()) << when;
    }
  }

  // Incrementals: one chain per kind, a change before every faulty backup;
  // the next clean backup must still capture that change.
  for (Kind kind : kinds) {
    ASSERT_NO_FATAL_FAILURE(Reset(++seed));
    ASSERT_NO_FATAL_FAILURE(CleanBackup("first backup", false));
    ASSERT_NO_FATAL_FAILURE(Change());
    const uint64_t writes = CountWrites("counting an incremental", true);
    // counter, Put, batch, commit.
    ASSERT_GE(writes, 4u);
    std::cout << KindName(kind) << ": incremental backup: " << writes << " writes" << std::endl;
    for (uint64_t n = 1; n <= writes + 1; n++) {
      const std::string when = std::string("incremental, ") + KindName(kind) + " at write " +
                               std::to_string(n) + " of " + std::to_string(writes);
      ASSERT_NO_FATAL_FAILURE(Change());
      ASSERT_NO_FATAL_FAILURE(RunFaulty(kind, n, when));
      ASSERT_NO_FATAL_FAILURE(CleanBackup(when + "; next backup", /*expect_incremental=*/true));
      ASSERT_FALSE(HasFailure()) << when;
    }
    // No final restore of the chain: every snapshot but the last was
    // restored after the last fault, the last one right after its backup.
  }
  auto secs = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::steady_clock::now() - start)
                  .count() /
              1000.0;
  std::cout << "faults fired: " << fired_ << ", backups that ended before their fault: " << unfired_
            << ", short container writes: " << short_puts_ << ", " << secs << " s" << std::endl;
  EXPECT_GE(short_puts_, 2);  // the sweep did hit object Puts
  EXPECT_GE(unfired_, 8);     // and went one write past each backup
}

// The sweep above fills one container over 4 segments, so every commit
// happens after the last segment is read. Here 64 KiB segments and 1 MiB
// containers put each fault in the middle of the run, with dozens of
// segments still to plan, read and commit: the run must stop at its first
// failure and report that failure, not go on and end with another error (or
// none). A container Put fails on the sealer's thread and reaches the run at
// its next seal, so its writes are counted up to that point only.
TEST_F(FaultInjectionBackupTest, AFaultInTheMiddleOfALongRunEndsItWithThatFault) {
  config_.segment_size = 64 << 10;
  config_.container_capacity = 1 << 20;
  const uint64_t seed = 11;
  ASSERT_NO_FATAL_FAILURE(Reset(seed));
  const uint64_t writes = CountWrites("counting the first backup", false);
  // vm-info, counter, then a Put and a batch for each of at least 3 containers.
  ASSERT_GE(writes, 9u);
  std::cout << "first backup with small segments and containers: " << writes << " writes"
            << std::endl;
  for (Kind kind : {Kind::kNoSpace, Kind::kIOError}) {
    for (uint64_t n = 1; n <= writes; n++) {
      const std::string when = std::string("small containers, ") + KindName(kind) + " at write " +
                               std::to_string(n) + " of " + std::to_string(writes);
      ASSERT_NO_FATAL_FAILURE(Reset(seed, /*reuse_image=*/true));
      ASSERT_NO_FATAL_FAILURE(RunFaulty(kind, n, when));
      ASSERT_FALSE(HasFailure()) << when;
    }
  }
}

}  // namespace
}  // namespace vmdedup::testing
