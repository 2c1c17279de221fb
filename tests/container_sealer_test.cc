// Tests of ContainerSealer (engine/container_sealer.h): it stores containers
// and then their metadata on its own thread, in order; a batch is written
// only after its container is durable; nothing is written after a failure;
// stored buffers come back for reuse.

#include "engine/container_sealer.h"

#include <gtest/gtest.h>

#include <mutex>
#include <string>
#include <vector>

#include "tests/fault_injection.h"
#include "tests/memory_metadata_store.h"
#include "tests/test_util.h"

namespace vmdedup {
namespace {

using testing::ScratchDir;

// A metadata store that records, for every batch written, its keys and
// whether each object named by an "obj/NAME" key existed in `objects` at
// that moment.
class WitnessMetadataStore final : public MetadataStore {
 public:
  explicit WitnessMetadataStore(ObjectStore* objects) : objects_(objects) {}
  Status Get(std::string_view key, std::string* value) override { return base_->Get(key, value); }
  Status Write(const WriteBatch& batch, bool sync) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, value] : batch.ops()) {
      log_.push_back(key);
      if (key.rfind("obj/", 0) == 0) {
        std::string bytes;
        if (!objects_->Get(key.substr(4), &bytes).ok()) missing_.push_back(key);
      }
    }
    return base_->Write(batch, sync);
  }
  Status Scan(std::string_view prefix,
              const std::function<bool(std::string_view, std::string_view)>& fn) override {
    return base_->Scan(prefix, fn);
  }
  uint64_t ApproximateBytes() override { return base_->ApproximateBytes(); }

  std::vector<std::string> log() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }
  std::vector<std::string> missing() {
    std::lock_guard<std::mutex> lock(mu_);
    return missing_;
  }

 private:
  ObjectStore* objects_;
  std::unique_ptr<MetadataStore> base_ = NewMemoryMetadataStore();
  std::mutex mu_;
  std::vector<std::string> log_;
  std::vector<std::string> missing_;  // referenced before it was stored
};

WriteBatch BatchNaming(const std::string& object, const std::string& other) {
  WriteBatch b;
  if (!object.empty()) b.Put("obj/" + object, "x");
  b.Put(other, "y");
  return b;
}

std::string Content(int i) { return std::string(100000 + i, static_cast<char>('a' + i)); }

TEST(ContainerSealerTest, StoresEachContainerBeforeTheBatchThatNamesIt) {
  ScratchDir dir;
  auto objects = NewLocalObjectStore(dir.path());
  WitnessMetadataStore meta(objects.get());
  {
    ContainerSealer sealer(objects.get(), &meta, "vm1");
    for (int i = 0; i < 6; i++) {
      std::string name = "c" + std::to_string(i);
      ASSERT_TRUE(sealer.Submit(name, Content(i), BatchNaming(name, "k" + std::to_string(i))).ok());
    }
    // A batch without a container (recipes only) keeps its place too.
    ASSERT_TRUE(sealer.Submit("", "", BatchNaming("", "k6")).ok());
    ASSERT_TRUE(sealer.Drain().ok());
  }
  EXPECT_TRUE(meta.missing().empty()) << meta.missing().front();
  std::vector<std::string> want;
  for (int i = 0; i < 6; i++) {
    want.push_back("obj/c" + std::to_string(i));
    want.push_back("k" + std::to_string(i));
  }
  want.push_back("k6");
  EXPECT_EQ(meta.log(), want);
  for (int i = 0; i < 6; i++) {
    std::string got;
    ASSERT_TRUE(objects->Get("c" + std::to_string(i), &got).ok());
    EXPECT_EQ(got, Content(i));
  }
}

TEST(ContainerSealerTest, NothingIsWrittenAfterAFailedPut) {
  ScratchDir dir;
  auto base = NewLocalObjectStore(dir.path());
  auto plan = std::make_shared<FaultPlan>();
  plan->kind = FaultPlan::Kind::kNoSpace;
  plan->fail_at = 2;  // the second Put
  auto objects = NewFaultInjectingObjectStore(base.get(), plan);
  WitnessMetadataStore meta(base.get());
  ContainerSealer sealer(objects.get(), &meta, "vm1");
  ASSERT_TRUE(sealer.Submit("c0", Content(0), BatchNaming("c0", "k0")).ok());
  ASSERT_TRUE(sealer.Submit("c1", Content(1), BatchNaming("c1", "k1")).ok());  // fails later
  Status st = sealer.Submit("c2", Content(2), BatchNaming("c2", "k2"));
  EXPECT_TRUE(st.IsNoSpace()) << st.ToString();
  EXPECT_NE(st.message().find("store container c1"), std::string::npos) << st.ToString();
  // The failure sticks: later work is refused and Drain reports it.
  EXPECT_TRUE(sealer.Submit("", "", BatchNaming("", "k3")).IsNoSpace());
  EXPECT_TRUE(sealer.Drain().IsNoSpace());
  EXPECT_EQ(meta.log(), (std::vector<std::string>{"obj/c0", "k0"}));
  std::string got;
  EXPECT_TRUE(base->Get("c1", &got).IsNotFound());
  EXPECT_TRUE(base->Get("c2", &got).IsNotFound());
}

TEST(ContainerSealerTest, AFailedBatchStopsLaterContainers) {
  ScratchDir dir;
  auto objects = NewLocalObjectStore(dir.path());
  auto base_meta = NewMemoryMetadataStore();
  auto plan = std::make_shared<FaultPlan>();
  plan->kind = FaultPlan::Kind::kIOError;
  plan->fail_at = 1;  // the first metadata write
  auto meta = NewFaultInjectingMetadataStore(base_meta.get(), plan);
  ContainerSealer sealer(objects.get(), meta.get(), "web1");
  ASSERT_TRUE(sealer.Submit("c0", Content(0), BatchNaming("c0", "k0")).ok());
  Status st = sealer.Submit("c1", Content(1), BatchNaming("c1", "k1"));
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  EXPECT_NE(st.message().find("write metadata of VM 'web1'"), std::string::npos) << st.ToString();
  EXPECT_TRUE(sealer.Drain().IsIOError());
  std::string got;
  EXPECT_TRUE(objects->Get("c0", &got).ok());  // stored: an unreferenced leftover
  EXPECT_TRUE(objects->Get("c1", &got).IsNotFound());
  EXPECT_TRUE(base_meta->Get("k0", &got).IsNotFound());
}

TEST(ContainerSealerTest, HandsStoredBuffersBackForReuse) {
  ScratchDir dir;
  auto objects = NewLocalObjectStore(dir.path());
  auto meta = NewMemoryMetadataStore();
  ContainerSealer sealer(objects.get(), meta.get(), "vm1");
  EXPECT_EQ(sealer.TakeBuffer().capacity(), std::string().capacity());  // nothing stored yet
  std::string bytes = Content(0);
  bytes.reserve(1 << 20);
  const char* storage = bytes.data();
  ASSERT_TRUE(sealer.Submit("c0", std::move(bytes), WriteBatch()).ok());
  ASSERT_TRUE(sealer.Drain().ok());
  std::string back = sealer.TakeBuffer();
  EXPECT_TRUE(back.empty());
  EXPECT_GE(back.capacity(), size_t{1} << 20);
  EXPECT_EQ(back.data(), storage);                                      // the same allocation
  EXPECT_EQ(sealer.TakeBuffer().capacity(), std::string().capacity());  // taken once
}

}  // namespace
}  // namespace vmdedup
