// Tests of building the common data set (engine/cds_builder.h, `vmdedup cds`):
// MergePopularity; clear errors for bad budgets, an empty repository and an
// unreadable seed; builds over three small VMs backed up from qcow2 images
// that share some blocks (exactly the shared blocks are chosen, in popularity
// order, whatever the number of counting passes); a rebuild that keeps the
// blocks of the version in force in their containers; seed images; a VM
// being backed up (counted) and the CDS lock; and builds that fail or are SIGKILLed before
// publishing, which leave the version in force and list their leftovers.
#include "engine/cds_builder.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "store/cds_area.h"
#include "store/container.h"
#include "tests/fault_injection.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint32_t kBlock = 4096;  // the fixed chunker of the test repository

Fingerprint Fp(uint8_t first, uint8_t last) {
  Fingerprint f;
  f.bytes[0] = first;
  f.bytes[31] = last;
  return f;
}

BlockPopularity Pop(const Fingerprint& f, uint32_t holders, bool seed = false) {
  BlockPopularity b;
  b.fingerprint = f;
  b.length = kBlock;
  b.holders = holders;
  b.seed = seed;
  return b;
}

TEST(MergePopularityTest, AddsHoldersPerFingerprintAndKeepsOrder) {
  std::vector<BlockPopularity> host1 = {Pop(Fp(1, 0), 1), Pop(Fp(2, 0), 2), Pop(Fp(9, 0), 1)};
  std::vector<BlockPopularity> host2 = {Pop(Fp(2, 0), 3), Pop(Fp(5, 0), 1, true)};
  std::vector<BlockPopularity> host3 = {Pop(Fp(0, 7), 1), Pop(Fp(9, 0), 4)};
  auto merged = MergePopularity({host1, host2, host3, {}});
  ASSERT_EQ(merged.size(), 5u);
  EXPECT_EQ(merged[0].fingerprint, Fp(0, 7));
  EXPECT_EQ(merged[1].fingerprint, Fp(1, 0));
  EXPECT_EQ(merged[2].fingerprint, Fp(2, 0));
  EXPECT_EQ(merged[2].holders, 5u);
  EXPECT_EQ(merged[3].fingerprint, Fp(5, 0));
  EXPECT_TRUE(merged[3].seed);
  EXPECT_EQ(merged[4].holders, 5u);
  EXPECT_FALSE(merged[4].seed);
  for (const auto& b : merged) EXPECT_EQ(b.length, kBlock);
  EXPECT_TRUE(MergePopularity({}).empty());
  // A seed mark survives whichever part carries it.
  auto seeded = MergePopularity({{Pop(Fp(3, 3), 1)}, {Pop(Fp(3, 3), 1, true)}});
  ASSERT_EQ(seeded.size(), 1u);
  EXPECT_EQ(seeded[0].holders, 2u);
  EXPECT_TRUE(seeded[0].seed);
}

// A piece of random data placed at an offset of an image.
struct Piece {
  uint64_t offset;
  uint64_t length;
  uint64_t seed;
};

class CdsBuilderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_ = dir_.Sub("repo");
    auto r = Vmdedup({"init", repo_, "--chunker", "fixed"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }

  // A qcow2 image of `size` bytes holding `pieces` (zeros elsewhere).
  std::string MakeImage(const std::string& name, uint64_t size, const std::vector<Piece>& pieces) {
    std::string raw = dir_.Sub(name + ".raw");
    std::string image = dir_.Sub(name + ".qcow2");
    {
      std::ofstream out(raw, std::ios::binary | std::ios::trunc);
      for (const Piece& p : pieces) {
        out.seekp(static_cast<std::streamoff>(p.offset));
        std::string bytes = RandomBytes(p.length, p.seed);
        out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      }
    }
    EXPECT_EQ(truncate(raw.c_str(), static_cast<off_t>(size)), 0);
    auto r = RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    unlink(raw.c_str());
    return image;
  }

  void Backup(const std::string& vm, const std::string& image) {
    auto r = Vmdedup({"backup", "-r", repo_, "--vm", vm, "--disk", "vda", "-q", "qcow2:" + image});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  // The fingerprints of the 4 KiB blocks of a piece.
  static std::set<Fingerprint> Blocks(const Piece& p) {
    std::string bytes = RandomBytes(p.length, p.seed);
    std::set<Fingerprint> out;
    for (size_t i = 0; i < bytes.size(); i += kBlock)
      out.insert(Sha256({reinterpret_cast<const uint8_t*>(bytes.data()) + i, kBlock}));
    return out;
  }
  static std::set<Fingerprint> Union(std::initializer_list<std::set<Fingerprint>> sets) {
    std::set<Fingerprint> out;
    for (const auto& s : sets) out.insert(s.begin(), s.end());
    return out;
  }

  // Three VMs: A (64 KiB) in all three, B (32 KiB) in vm1 and vm2, C (32 KiB)
  // only in vm1, and 256 KiB of its own in each.
  void MakeThreeVms() {
    for (int i = 1; i <= 3; i++) {
      std::vector<Piece> pieces = {kA, {4 * kMiB, 256 * kKiB, 1000u + static_cast<uint64_t>(i)}};
      if (i <= 2) pieces.push_back(kB);
      if (i == 1) pieces.push_back(kC);
      Backup("vm" + std::to_string(i), MakeImage("vm" + std::to_string(i), 8 * kMiB, pieces));
    }
  }

  nlohmann::json Build(const std::vector<std::string>& extra, int expect_exit = 0) {
    std::vector<std::string> args = {"cds", "build", "-r", repo_, "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = Vmdedup(args);
    last_err_ = r.err;
    EXPECT_EQ(r.exit_code, expect_exit) << r.out << r.err;
    if (r.exit_code != 0) return {};
    return nlohmann::json::parse(r.out);
  }

  nlohmann::json CdsStatus() {
    auto r = Vmdedup({"cds", "status", "-r", repo_, "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return nlohmann::json::parse(r.out);
  }

  std::vector<CdsEntry> Entries(uint64_t version) {
    auto objects = NewLocalObjectStore(repo_);
    CdsArea area(objects.get());
    std::vector<CdsEntry> entries;
    Status st = area.ReadEntries(version, &entries);
    EXPECT_TRUE(st.ok()) << st.ToString();
    return entries;
  }

  static std::set<Fingerprint> Fps(const std::vector<CdsEntry>& entries) {
    std::set<Fingerprint> out;
    for (const auto& e : entries) out.insert(e.fingerprint);
    return out;
  }

  // Every entry's record decodes and re-hashes to its fingerprint.
  void VerifyRecords(const std::vector<CdsEntry>& entries) {
    auto objects = NewLocalObjectStore(repo_);
    for (const CdsEntry& e : entries) {
      std::string record, plain;
      std::string name = CdsArea::ContainerObjectName(e.container);
      ASSERT_TRUE(objects->GetRange(name, e.offset, e.record_len, &record).ok()) << name;
      Status st = DecodeBlockRecord(record, &e.fingerprint, &plain, name);
      ASSERT_TRUE(st.ok()) << st.ToString();
      EXPECT_EQ(plain.size(), e.length);
      EXPECT_EQ(Sha256({reinterpret_cast<const uint8_t*>(plain.data()), plain.size()}),
                e.fingerprint);
    }
  }

  CdsPointer Pointer() {
    auto objects = NewLocalObjectStore(repo_);
    CdsArea area(objects.get());
    auto p = area.ReadPointer();
    EXPECT_TRUE(p.ok()) << p.status().ToString();
    return p.ok() ? *p : CdsPointer{};
  }

  std::vector<std::string> Leftovers() {
    auto objects = NewLocalObjectStore(repo_);
    CdsArea area(objects.get());
    std::vector<std::string> names;
    Status st = area.ListLeftovers(&names);
    EXPECT_TRUE(st.ok()) << st.ToString();
    return names;
  }

  std::vector<std::string> CdsObjects() {
    auto objects = NewLocalObjectStore(repo_);
    std::vector<std::string> names;
    EXPECT_TRUE(objects->List("cds/", &names).ok());
    names.erase(std::remove(names.begin(), names.end(), "cds/lock"), names.end());
    return names;
  }

  const Piece kA{0, 64 * kKiB, 100};
  const Piece kB{1 * kMiB, 32 * kKiB, 200};
  const Piece kC{6 * kMiB, 32 * kKiB, 300};
  const Piece kD{7 * kMiB, 32 * kKiB, 400};
  ScratchDir dir_;
  std::string repo_;
  std::string last_err_;
};

TEST_F(CdsBuilderTest, BadBudgetsAreClearUsageErrors) {
  MakeThreeVms();
  struct Case {
    std::vector<std::string> args;
    std::string message;
  } cases[] = {
      {{"--fraction", "0"}, "--fraction must be a percentage above 0 and at most 100"},
      {{"--fraction", "101"}, "at most 100"},
      {{"--fraction", "-1"}, "above 0"},
      {{"--fraction", "nan"}, "above 0"},
      {{"--fraction", "abc"}, "above 0"},
      {{"--budget", "0"}, "must hold at least one entry"},
      {{"--budget", "12"}, "must hold at least one entry"},
      {{"--budget", "3X"}, "unknown size unit"},
      {{"--fraction", "1", "--budget", "1M"}, "either --fraction or --budget, not both"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> args = {"cds", "build", "-r", repo_};
    args.insert(args.end(), c.args.begin(), c.args.end());
    auto r = Vmdedup(args);
    EXPECT_EQ(r.exit_code, 2) << c.args[1] << ": " << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << r.err;
  }
  EXPECT_TRUE(CdsObjects().empty());

  // The same checks in the library.
  auto repo = Repository::Open(repo_);
  ASSERT_TRUE(repo.ok());
  for (double f : {0.0, -5.0, 100.5, std::numeric_limits<double>::quiet_NaN()}) {
    CdsBuildOptions o;
    o.fraction_percent = f;
    auto r = BuildCds(**repo, o);
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  }
  CdsBuildOptions both;
  both.fraction_percent = 1;
  both.index_budget_bytes = 1 << 20;
  auto r = BuildCds(**repo, both);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("exactly one budget"), std::string::npos);
  CdsBuildOptions none;
  r = BuildCds(**repo, none);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument());
  CdsBuildOptions zero;
  zero.index_budget_bytes = 0;
  r = BuildCds(**repo, zero);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument());
  EXPECT_TRUE(CdsObjects().empty());
}

TEST_F(CdsBuilderTest, EmptyRepositoryHasNothingToCount) {
  auto r = Vmdedup({"cds", "build", "-r", repo_});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("nothing to count"), std::string::npos) << r.err;
  EXPECT_EQ(Pointer().current, 0u);
  EXPECT_TRUE(CdsObjects().empty());
  auto s = CdsStatus();
  EXPECT_EQ(s["current"], 0);
  EXPECT_TRUE(s["versions"].empty());
}

TEST_F(CdsBuilderTest, UnreadableSeedIsNamedAndNothingIsWritten) {
  MakeThreeVms();
  std::string missing = dir_.Sub("no-such-template.qcow2");
  auto r = Vmdedup({"cds", "build", "-r", repo_, "--seed", "qcow2:" + missing});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("seed 'qcow2:" + missing + "'"), std::string::npos) << r.err;
  // A directory is not an image either.
  r = Vmdedup({"cds", "build", "-r", repo_, "--seed", "raw:" + dir_.path()});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("seed 'raw:" + dir_.path() + "'"), std::string::npos) << r.err;
  r = Vmdedup({"cds", "build", "-r", repo_, "--seed", "ftp://x/y"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("seed 'ftp://x/y'"), std::string::npos) << r.err;
  // A seed's format is never guessed: file:PATH has none to go by.
  const std::string tmpl = MakeImage("template", 8 * kMiB, {kC});
  r = Vmdedup({"cds", "build", "-r", repo_, "--seed", "file:" + tmpl});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("qcow2:PATH"), std::string::npos) << r.err;
  EXPECT_EQ(Pointer().current, 0u);
  EXPECT_TRUE(CdsObjects().empty());
}

TEST_F(CdsBuilderTest, ChoosesExactlyTheSharedBlocksAndRebuildKeepsThem) {
  MakeThreeVms();
  const auto a = Blocks(kA), b = Blocks(kB);

  // Budget of 16 entries: only A (three holders) fits.
  auto v1 = Build({"--budget", std::to_string(16 * 24)});
  ASSERT_FALSE(v1.is_null());
  EXPECT_EQ(v1["version"], 1);
  EXPECT_EQ(v1["previous_version"], 0);
  EXPECT_EQ(v1["vms_counted"], 3);
  EXPECT_EQ(v1["candidates"], 24);  // A and B
  EXPECT_EQ(v1["unique_blocks"], 16 + 8 + 8 + 3 * 64);
  EXPECT_EQ(v1["unique_bytes"], (16 + 8 + 8 + 3 * 64) * kBlock);
  EXPECT_EQ(v1["blocks"], 16);
  EXPECT_EQ(v1["copied_blocks"], 16);
  EXPECT_EQ(v1["raw_bytes"], 64 * kKiB);
  auto e1 = Entries(1);
  EXPECT_EQ(Fps(e1), a);
  VerifyRecords(e1);

  auto s = CdsStatus();
  EXPECT_EQ(s["current"], 1);
  ASSERT_EQ(s["versions"].size(), 1u);
  EXPECT_EQ(s["versions"][0]["version"], 1);
  EXPECT_EQ(s["versions"][0]["blocks"], 16);
  EXPECT_EQ(s["versions"][0]["raw_bytes"], 64 * kKiB);
  EXPECT_EQ(s["versions"][0]["current"], true);
  EXPECT_EQ(s["versions"][0]["selection"], "index budget 384 B");
  EXPECT_EQ(s["snapshots_without_cds"], 3);
  auto human = Vmdedup({"cds", "status", "-r", repo_});
  EXPECT_EQ(human.exit_code, 0);
  EXPECT_NE(human.out.find("*1"), std::string::npos) << human.out;

  // Version 2 takes everything shared (A and B): A stays in version 1's
  // containers, only B is copied.
  auto v2 = Build({"--fraction", "100"});
  ASSERT_FALSE(v2.is_null());
  EXPECT_EQ(v2["version"], 2);
  EXPECT_EQ(v2["previous_version"], 1);
  EXPECT_EQ(v2["blocks"], 24);
  EXPECT_EQ(v2["copied_blocks"], 8);
  EXPECT_NE(last_err_.find("all of them are taken"), std::string::npos) << last_err_;
  auto e2 = Entries(2);
  EXPECT_EQ(Fps(e2), Union({a, b}));
  VerifyRecords(e2);
  for (const CdsEntry& e : e2) {
    uint64_t expected = a.count(e.fingerprint) ? 1 : 2;
    EXPECT_EQ(CdsArea::VersionOfContainer(e.container), expected) << e.fingerprint.Hex();
  }
  for (const CdsEntry& old : e1) {
    auto it = std::find_if(e2.begin(), e2.end(),
                           [&](const CdsEntry& e) { return e.fingerprint == old.fingerprint; });
    ASSERT_NE(it, e2.end());
    EXPECT_EQ(it->container, old.container);
    EXPECT_EQ(it->offset, old.offset);
  }
  s = CdsStatus();
  EXPECT_EQ(s["current"], 2);
  ASSERT_EQ(s["versions"].size(), 2u);
  EXPECT_EQ(s["versions"][0]["current"], false);
  EXPECT_EQ(s["versions"][1]["current"], true);
  EXPECT_TRUE(Leftovers().empty());

  // Counting in many passes gives the same result (exact counting), and a
  // fraction of the unique data takes the most popular first.
  auto v3 = Build({"--fraction", "100", "--count-memory", "1K"});
  ASSERT_FALSE(v3.is_null());
  EXPECT_GT(v3["passes"].get<uint32_t>(), 1u);
  EXPECT_EQ(v3["candidates"], 24);
  EXPECT_EQ(v3["copied_blocks"], 0);
  EXPECT_EQ(Fps(Entries(3)), Union({a, b}));
  // 8% of 224 blocks' bytes is 17.92 blocks: the 16 of A, then 1 of B.
  auto v4 = Build({"--fraction", "8", "--count-memory", "1K"});
  ASSERT_FALSE(v4.is_null());
  auto e4 = Entries(4);
  ASSERT_EQ(e4.size(), 17u);
  auto f4 = Fps(e4);
  for (const auto& fp : a) EXPECT_TRUE(f4.count(fp));
  // The one of B is B's smallest fingerprint (ties go by fingerprint).
  auto first_b = *b.begin();
  EXPECT_TRUE(f4.count(first_b)) << first_b.Hex();
}

// A raw seed is read directly, as a raw backup source is: the same blocks as
// the qcow2 seed, with qemu-nbd made to fail if anything starts it.
TEST_F(CdsBuilderTest, RawSeedIsReadWithoutQemuNbd) {
  MakeThreeVms();
  std::string tmpl = MakeImage("template", 8 * kMiB, {kC, kD});
  std::string raw = dir_.Sub("template-raw.img");
  auto c = RunCommand({"qemu-img", "convert", "-f", "qcow2", "-O", "raw", tmpl, raw});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  std::string bin = dir_.Sub("bin");
  ASSERT_EQ(mkdir(bin.c_str(), 0755), 0);
  {
    std::ofstream out(bin + "/qemu-nbd");
    out << "#!/bin/sh\ntouch '" << dir_.Sub("qemu-nbd-ran") << "'\nexit 1\n";
  }
  ASSERT_EQ(chmod((bin + "/qemu-nbd").c_str(), 0755), 0);
  auto r = RunShell("PATH='" + bin + "':\"$PATH\" '" + VmdedupBinary() + "' cds build -r '" +
                    repo_ + "' --fraction 100 --seed 'raw:" + raw + "' --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(access(dir_.Sub("qemu-nbd-ran").c_str(), F_OK), 0) << "qemu-nbd was started";
  auto v = nlohmann::json::parse(r.out);
  EXPECT_EQ(v["seed_blocks"], 16);
  EXPECT_EQ(v["blocks"], 40);
  EXPECT_EQ(Fps(Entries(1)), Union({Blocks(kA), Blocks(kB), Blocks(kC), Blocks(kD)}));
}

TEST_F(CdsBuilderTest, SeedBlocksAreCandidatesEvenWithOneHolder) {
  MakeThreeVms();
  // The template holds C (which only vm1 holds) and D (which no VM holds).
  std::string tmpl = MakeImage("template", 8 * kMiB, {kC, kD});
  auto v = Build({"--fraction", "100", "--seed", "qcow2:" + tmpl, "--threads", "3"});
  ASSERT_FALSE(v.is_null());
  EXPECT_EQ(v["seed_blocks"], 16);
  EXPECT_EQ(v["candidates"], 24 + 16);
  EXPECT_EQ(v["blocks"], 40);
  auto e = Entries(1);
  EXPECT_EQ(Fps(e), Union({Blocks(kA), Blocks(kB), Blocks(kC), Blocks(kD)}));
  VerifyRecords(e);
  auto s = CdsStatus();
  ASSERT_EQ(s["versions"].size(), 1u);
  ASSERT_EQ(s["versions"][0]["seeds"].size(), 1u);
  EXPECT_EQ(s["versions"][0]["seeds"][0], "qcow2:" + tmpl);

  // With a small budget the seed's blocks rank by holders like any other:
  // C (vm1 + seed = 2) comes with B, D (seed only = 1) last.
  auto repo = Repository::Open(repo_);
  ASSERT_TRUE(repo.ok());
  CdsBuildOptions o;
  o.index_budget_bytes = (16 + 8 + 8) * 24;
  o.seeds = {"qcow2:" + tmpl};
  std::vector<std::string> phases;
  o.progress = [&](uint64_t, uint64_t, const char* phase) {
    if (phases.empty() || phases.back() != phase) phases.push_back(phase);
  };
  auto r = BuildCds(**repo, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->version, 2u);
  EXPECT_EQ(r->blocks, 32u);
  EXPECT_EQ(r->copied_blocks, 0u);
  EXPECT_EQ(Fps(Entries(2)), Union({Blocks(kA), Blocks(kB), Blocks(kC)}));
  EXPECT_NE(std::find(phases.begin(), phases.end(), "seed"), phases.end());
  EXPECT_NE(std::find(phases.begin(), phases.end(), "count"), phases.end());
}

TEST_F(CdsBuilderTest, AVmBeingBackedUpIsCountedAndOneBuildAtATime) {
  MakeThreeVms();
  auto repo = Repository::Open(repo_);
  ASSERT_TRUE(repo.ok());
  {
    auto lock = (*repo)->LockCds();
    ASSERT_TRUE(lock.ok()) << lock.status().ToString();
    auto r = Vmdedup({"cds", "build", "-r", repo_});
    EXPECT_EQ(r.exit_code, 4) << r.err;
    EXPECT_NE(r.err.find("another cds build is running on " + repo_), std::string::npos) << r.err;
    auto again = (*repo)->LockCds();
    EXPECT_FALSE(again.ok());
  }
  // vm3 held as a backup holds it: read through a read view, it is counted.
  auto vm3 = (*repo)->OpenVm("vm3", Repository::Access::kWrite);
  ASSERT_TRUE(vm3.ok());
  auto v = Build({"--fraction", "100"});
  ASSERT_FALSE(v.is_null());
  EXPECT_EQ(v["vms_counted"], 3);
  EXPECT_FALSE(v.contains("vms_skipped")) << v.dump();
  EXPECT_EQ(v["blocks"], 24);  // A (3 VMs) and B (vm1, vm2)
  auto s = CdsStatus();
  EXPECT_EQ(s["versions"].size(), 1u);
  EXPECT_EQ(s["versions"][0]["snapshots"], 0);  // none looked up in it yet
  EXPECT_EQ(s["snapshots_without_cds"], 3);     // vm3's too, although it is held
}

TEST_F(CdsBuilderTest, FailedBuildLeavesTheVersionInForce) {
  MakeThreeVms();
  ASSERT_FALSE(Build({"--budget", std::to_string(16 * 24)}).is_null());
  // Version 2 needs Puts of: one container (B), the index, the manifest and
  // the pointer. A crash at any of them leaves version 1 in force.
  for (uint64_t fail_at = 1; fail_at <= 4; fail_at++) {
    auto base = NewLocalObjectStore(repo_);
    auto plan = std::make_shared<FaultPlan>();
    plan->kind = FaultPlan::Kind::kCrash;
    plan->fail_at = fail_at;
    auto faulty = NewFaultInjectingObjectStore(base.get(), plan);
    auto repo = Repository::Open(repo_, {.objects = faulty.get()});
    ASSERT_TRUE(repo.ok());
    CdsBuildOptions o;
    o.fraction_percent = 100;
    auto r = BuildCds(**repo, o);
    ASSERT_FALSE(r.ok()) << "fail_at " << fail_at;
    EXPECT_EQ(plan->faults_injected.load(), 1u);
    CdsPointer p = Pointer();
    EXPECT_EQ(p.current, 1u) << "fail_at " << fail_at;
    EXPECT_EQ(p.published, std::vector<uint64_t>{1});
    auto left = Leftovers();
    if (fail_at == 1) {
      EXPECT_TRUE(left.empty());
    } else {
      EXPECT_FALSE(left.empty()) << "fail_at " << fail_at;
    }
    for (const auto& name : left) EXPECT_EQ(name.rfind("cds/", 0), 0u) << name;
  }
  // The next build succeeds past the leftovers and keeps version 1's blocks.
  auto v = Build({"--fraction", "100"});
  ASSERT_FALSE(v.is_null());
  EXPECT_GT(v["version"].get<uint64_t>(), 1u);
  EXPECT_EQ(v["previous_version"], 1);
  EXPECT_EQ(Pointer().current, v["version"].get<uint64_t>());
  VerifyRecords(Entries(v["version"].get<uint64_t>()));
}

// Kills its own process right after the first CDS container is stored.
class KillAfterFirstCdsContainer : public ObjectStore {
 public:
  explicit KillAfterFirstCdsContainer(ObjectStore* base) : base_(base) {}
  Status Put(const std::string& name, std::span<const uint8_t> data) override {
    Status st = base_->Put(name, data);
    if (name.rfind("cds/data/", 0) == 0) ::kill(::getpid(), SIGKILL);
    return st;
  }
  Status Get(const std::string& name, std::string* out) override { return base_->Get(name, out); }
  Status GetRange(const std::string& name, uint64_t offset, uint64_t length,
                  std::string* out) override {
    return base_->GetRange(name, offset, length, out);
  }
  Result<uint64_t> Size(const std::string& name) override { return base_->Size(name); }
  Status Delete(const std::string& name) override { return base_->Delete(name); }
  Status List(const std::string& prefix, std::vector<std::string>* names) override {
    return base_->List(prefix, names);
  }
  std::string Describe() const override { return base_->Describe(); }

 private:
  ObjectStore* base_;
};

TEST_F(CdsBuilderTest, SigkilledBuildLeavesTheVersionInForce) {
  MakeThreeVms();
  ASSERT_FALSE(Build({"--budget", std::to_string(16 * 24)}).is_null());
  auto before = Entries(1);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto base = NewLocalObjectStore(repo_);
    KillAfterFirstCdsContainer killer(base.get());
    auto repo = Repository::Open(repo_, {.objects = &killer});
    if (!repo.ok()) _exit(10);
    CdsBuildOptions o;
    o.fraction_percent = 100;
    auto r = BuildCds(**repo, o);
    _exit(r.ok() ? 11 : 12);  // not reached: killed after the first container
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGKILL);

  CdsPointer p = Pointer();
  EXPECT_EQ(p.current, 1u);
  auto left = Leftovers();
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0], CdsArea::ContainerObjectName(CdsArea::ContainerId(2, 0)));
  auto after = Entries(1);
  ASSERT_EQ(after.size(), before.size());
  VerifyRecords(after);
  // The lock died with the process: the next build runs.
  auto v = Build({"--fraction", "100"});
  ASSERT_FALSE(v.is_null());
  EXPECT_EQ(v["version"], 3);  // version 2's number is taken by the leftovers
  EXPECT_EQ(Pointer().current, 3u);
  // The rerun's leftovers are still those of the killed build.
  EXPECT_EQ(Leftovers(), left);
}

}  // namespace
}  // namespace vmdedup::testing
