// Tests of the fault-injecting store wrappers, and with them the crash rule
// the stores make possible: data is durable before the metadata that
// references it, so a crash at any write leaves every committed reference
// resolvable.

#include <gtest/gtest.h>

#include "store/container.h"
#include "tests/fault_injection.h"
#include "tests/memory_metadata_store.h"
#include "tests/test_util.h"

namespace vmdedup {
namespace {

using testing::RandomBytes;
using testing::ScratchDir;

std::span<const uint8_t> Bytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

std::shared_ptr<FaultPlan> Plan(FaultPlan::Kind kind, uint64_t fail_at) {
  auto plan = std::make_shared<FaultPlan>();
  plan->kind = kind;
  plan->fail_at = fail_at;
  return plan;
}

TEST(FaultInjectionTest, UnarmedPlanPassesEverythingThrough) {
  ScratchDir dir;
  auto base = NewLocalObjectStore(dir.path());
  auto plan = std::make_shared<FaultPlan>();
  auto store = NewFaultInjectingObjectStore(base.get(), plan);
  for (int i = 0; i < 5; i++) ASSERT_TRUE(store->Put("o" + std::to_string(i), Bytes("d")).ok());
  std::vector<std::string> names;
  ASSERT_TRUE(store->List("", &names).ok());
  EXPECT_EQ(names.size(), 5u);
  EXPECT_EQ(plan->write_ops.load(), 5u);
  EXPECT_EQ(plan->faults_injected.load(), 0u);
  EXPECT_NE(store->Describe().find(dir.path()), std::string::npos);
}

TEST(FaultInjectionTest, IOErrorHitsOnlyTheChosenWrite) {
  ScratchDir dir;
  auto base = NewLocalObjectStore(dir.path());
  auto plan = Plan(FaultPlan::Kind::kIOError, 2);
  auto store = NewFaultInjectingObjectStore(base.get(), plan);
  EXPECT_TRUE(store->Put("a", Bytes("1")).ok());
  Status st = store->Put("b", Bytes("2"));
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  EXPECT_TRUE(store->Put("c", Bytes("3")).ok());
  std::string got;
  EXPECT_TRUE(base->Get("b", &got).IsNotFound());  // nothing written
  ASSERT_TRUE(base->Get("c", &got).ok());
  EXPECT_EQ(plan->faults_injected.load(), 1u);
}

TEST(FaultInjectionTest, NoSpaceIsNoSpace) {
  ScratchDir dir;
  auto base = NewLocalObjectStore(dir.path());
  auto meta = NewMemoryMetadataStore();
  auto plan = Plan(FaultPlan::Kind::kNoSpace, 1);
  auto store = NewFaultInjectingObjectStore(base.get(), plan);
  auto fmeta = NewFaultInjectingMetadataStore(meta.get(), plan);
  EXPECT_TRUE(store->Put("a", Bytes("1")).IsNoSpace());
  std::string got;
  EXPECT_TRUE(base->Get("a", &got).IsNotFound());
  // Metadata writes share the plan's count: the second op passes.
  WriteBatch b;
  b.Put("k", "v");
  EXPECT_TRUE(fmeta->Write(b, true).ok());

  auto plan2 = Plan(FaultPlan::Kind::kNoSpace, 1);
  auto fmeta2 = NewFaultInjectingMetadataStore(meta.get(), plan2);
  WriteBatch b2;
  b2.Put("k2", "v");
  EXPECT_TRUE(fmeta2->Write(b2, true).IsNoSpace());
  EXPECT_TRUE(meta->Get("k2", &got).IsNotFound());
}

TEST(FaultInjectionTest, CrashFailsThatAndEveryLaterWrite) {
  ScratchDir dir;
  auto base = NewLocalObjectStore(dir.path());
  auto meta = NewMemoryMetadataStore();
  auto plan = Plan(FaultPlan::Kind::kCrash, 3);
  auto store = NewFaultInjectingObjectStore(base.get(), plan);
  auto fmeta = NewFaultInjectingMetadataStore(meta.get(), plan);

  ASSERT_TRUE(store->Put("a", Bytes("1")).ok());  // op 1
  WriteBatch b;
  b.Put("ref/a", "a");
  ASSERT_TRUE(fmeta->Write(b, true).ok());               // op 2
  EXPECT_TRUE(store->Put("b", Bytes("2")).IsIOError());  // op 3: the crash
  WriteBatch b2;
  b2.Put("ref/b", "b");
  EXPECT_TRUE(fmeta->Write(b2, true).IsIOError());       // op 4: dead
  EXPECT_TRUE(store->Put("c", Bytes("3")).IsIOError());  // op 5: dead
  EXPECT_TRUE(store->Delete("a").IsIOError());           // deletes too
  EXPECT_EQ(plan->faults_injected.load(), 3u);

  // What survived: exactly the writes before the crash.
  std::vector<std::string> names;
  ASSERT_TRUE(base->List("", &names).ok());
  EXPECT_EQ(names, std::vector<std::string>{"a"});
  std::string got;
  EXPECT_TRUE(meta->Get("ref/a", &got).ok());
  EXPECT_TRUE(meta->Get("ref/b", &got).IsNotFound());
  // Reads through the wrappers still work, for inspection.
  ASSERT_TRUE(store->Get("a", &got).ok());
  EXPECT_EQ(got, "1");
  ASSERT_TRUE(fmeta->Get("ref/a", &got).ok());
}

TEST(FaultInjectionTest, ShortWriteLeavesATruncatedObjectThatReadersDetect) {
  ScratchDir dir;
  auto base = NewLocalObjectStore(dir.path());
  auto plan = Plan(FaultPlan::Kind::kShortWrite, 1);
  auto store = NewFaultInjectingObjectStore(base.get(), plan);

  ContainerWriter w(5, 1 << 20);
  std::string block = RandomBytes(3000, 1);
  Fingerprint fp = Sha256(Bytes(block));
  BlockRecordInfo first = w.Append(fp, 3000, Compression::kNone, Bytes(block));
  BlockRecordInfo second = w.Append(fp, 3000, Compression::kNone, Bytes(block));
  std::string container = w.Finish();

  Status st = store->Put("vms/a/data/5.ctr", Bytes(container));
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  auto size = base->Size("vms/a/data/5.ctr");
  ASSERT_TRUE(size.ok());
  EXPECT_EQ(*size, container.size() / 2);

  // A whole-container reader (check, GC) reports Corruption...
  std::string got;
  ASSERT_TRUE(store->Get("vms/a/data/5.ctr", &got).ok());
  Status walk =
      ForEachBlockRecord(got, 5, "vms/a/data/5.ctr", [](const BlockRecordInfo&, std::string_view) {
        ADD_FAILURE() << "no record of a truncated container";
        return Status::OK();
      });
  EXPECT_TRUE(walk.IsCorruption()) << walk.ToString();
  // ...and so does a restore reading one record past the end.
  Status range = store->GetRange("vms/a/data/5.ctr", second.offset, second.record_len, &got);
  EXPECT_TRUE(range.IsCorruption()) << range.ToString();
  // The record wholly before the cut is intact and still verifies.
  ASSERT_TRUE(store->GetRange("vms/a/data/5.ctr", first.offset, first.record_len, &got).ok());
  std::string plain;
  ASSERT_TRUE(DecodeBlockRecord(got, &fp, &plain, "c").ok());
  EXPECT_EQ(plain, block);
}

TEST(FaultInjectionTest, MetadataFaultsNeverApplyPartOfABatch) {
  for (auto kind : {FaultPlan::Kind::kIOError, FaultPlan::Kind::kNoSpace,
                    FaultPlan::Kind::kShortWrite, FaultPlan::Kind::kCrash}) {
    auto meta = NewMemoryMetadataStore();
    auto plan = Plan(kind, 1);
    auto fmeta = NewFaultInjectingMetadataStore(meta.get(), plan);
    WriteBatch b;
    for (int i = 0; i < 10; i++) b.Put("k/" + std::to_string(i), "v");
    Status st = fmeta->Write(b, true);
    EXPECT_FALSE(st.ok());
    EXPECT_EQ(st.IsNoSpace(), kind == FaultPlan::Kind::kNoSpace) << st.ToString();
    int n = 0;
    ASSERT_TRUE(meta->Scan("",
                           [&](std::string_view, std::string_view) {
                             n++;
                             return true;
                           })
                    .ok());
    EXPECT_EQ(n, 0) << static_cast<int>(kind);
    // Only a crash keeps failing.
    EXPECT_EQ(fmeta->Write(b, true).ok(), kind != FaultPlan::Kind::kCrash);
  }
}

TEST(FaultInjectionTest, FailReadsWhileSet) {
  ScratchDir dir;
  auto base = NewLocalObjectStore(dir.path());
  auto meta = NewMemoryMetadataStore();
  auto plan = std::make_shared<FaultPlan>();
  auto store = NewFaultInjectingObjectStore(base.get(), plan);
  auto fmeta = NewFaultInjectingMetadataStore(meta.get(), plan);
  ASSERT_TRUE(store->Put("a", Bytes("xyz")).ok());
  WriteBatch b;
  b.Put("k", "v");
  ASSERT_TRUE(fmeta->Write(b, true).ok());

  plan->fail_reads = true;
  std::string got;
  std::vector<std::string> names;
  EXPECT_TRUE(store->Get("a", &got).IsIOError());
  EXPECT_TRUE(store->GetRange("a", 0, 1, &got).IsIOError());
  EXPECT_TRUE(store->Size("a").status().IsIOError());
  EXPECT_TRUE(store->List("", &names).IsIOError());
  EXPECT_TRUE(fmeta->Get("k", &got).IsIOError());
  EXPECT_TRUE(fmeta->Scan("", [](auto, auto) { return true; }).IsIOError());
  EXPECT_TRUE(store->Put("b", Bytes("w")).ok());  // writes unaffected

  plan->fail_reads = false;
  ASSERT_TRUE(store->GetRange("a", 1, 2, &got).ok());
  EXPECT_EQ(got, "yz");
  ASSERT_TRUE(fmeta->Get("k", &got).ok());
}

// A miniature backup: each round stores a container, then commits metadata
// that references it. Crashing at every possible write, then "restarting"
// on the bare stores, every committed reference must name a whole, valid
// container, and the stores must accept the next run.
TEST(FaultInjectionTest, CrashAtEveryWriteKeepsCommittedReferencesValid) {
  constexpr int kRounds = 3;
  for (uint64_t crash_at = 1; crash_at <= 2 * kRounds + 1; crash_at++) {
    ScratchDir dir;
    auto objects = NewLocalObjectStore(dir.Sub("objects"));
    {
      auto meta = OpenLevelDbMetadataStore(dir.Sub("meta"), true);
      ASSERT_TRUE(meta.ok()) << meta.status().ToString();
      auto plan = Plan(FaultPlan::Kind::kCrash, crash_at);
      auto fobjects = NewFaultInjectingObjectStore(objects.get(), plan);
      auto fmeta = NewFaultInjectingMetadataStore(meta->get(), plan);
      for (int round = 0; round < kRounds; round++) {
        ContainerWriter w(round, 1 << 16);
        std::string block = RandomBytes(1000, round);
        w.Append(Sha256(Bytes(block)), 1000, Compression::kNone, Bytes(block));
        std::string name = "vms/a/data/" + std::to_string(round) + ".ctr";
        if (!fobjects->Put(name, Bytes(w.Finish())).ok()) break;
        WriteBatch b;
        b.Put("snap/" + std::to_string(round), name);
        if (!fmeta->Write(b, true).ok()) break;
      }
      EXPECT_EQ(plan->faults_injected.load() > 0, crash_at <= 2 * kRounds);
    }
    // Restart.
    auto meta = OpenLevelDbMetadataStore(dir.Sub("meta"), false);
    ASSERT_TRUE(meta.ok()) << meta.status().ToString();
    int committed = 0;
    ASSERT_TRUE((*meta)
                    ->Scan("snap/",
                           [&](std::string_view key, std::string_view value) {
                             uint64_t id = std::stoull(std::string(key.substr(5)));
                             std::string bytes;
                             Status st = objects->Get(std::string(value), &bytes);
                             EXPECT_TRUE(st.ok()) << st.ToString();
                             st = ForEachBlockRecord(bytes, id, std::string(value),
                                                     [](auto&, auto) { return Status::OK(); });
                             EXPECT_TRUE(st.ok()) << st.ToString();
                             committed++;
                             return true;
                           })
                    .ok());
    EXPECT_EQ(committed, std::min<int>(kRounds, static_cast<int>((crash_at - 1) / 2)))
        << "crash at " << crash_at;
    WriteBatch next;
    next.Put("snap/next", "x");
    EXPECT_TRUE((*meta)->Write(next, true).ok());
    EXPECT_TRUE(objects->Put("vms/a/data/next.ctr", Bytes("x")).ok());
  }
}

}  // namespace
}  // namespace vmdedup
