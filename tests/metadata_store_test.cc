// Tests of the MetadataStore implementations (LevelDB and in-memory share the
// contract tests), and of what only LevelDB does: persistence, locking,
// corruption and error mapping.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <thread>

#include "store/leveldb_log_scan.h"
#include "store/metadata_store.h"
#include "tests/memory_metadata_store.h"
#include "tests/test_util.h"

namespace vmdedup {
namespace {

using testing::RandomBytes;
using testing::ScratchDir;

std::vector<std::pair<std::string, std::string>> ScanAll(MetadataStore* store,
                                                         std::string_view prefix) {
  std::vector<std::pair<std::string, std::string>> out;
  Status st = store->Scan(prefix, [&](std::string_view k, std::string_view v) {
    out.emplace_back(k, v);
    return true;
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
}

// Contract tests, run against both implementations.
class MetadataStoreContractTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) {
      auto r = OpenLevelDbMetadataStore(dir_.Sub("meta"), /*create_if_missing=*/true);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      store_ = std::move(r).value();
    } else {
      store_ = NewMemoryMetadataStore();
    }
  }
  ScratchDir dir_;
  std::unique_ptr<MetadataStore> store_;
};

TEST_P(MetadataStoreContractTest, PutGetDelete) {
  std::string v;
  EXPECT_TRUE(store_->Get("k", &v).IsNotFound());
  WriteBatch b;
  b.Put("k", "v1");
  b.Put(std::string("bin\0key", 7), std::string("\0\xff\0", 3));
  ASSERT_TRUE(store_->Write(b, true).ok());
  ASSERT_TRUE(store_->Get("k", &v).ok());
  EXPECT_EQ(v, "v1");
  ASSERT_TRUE(store_->Get(std::string_view("bin\0key", 7), &v).ok());
  EXPECT_EQ(v, std::string("\0\xff\0", 3));
  EXPECT_TRUE(store_->Get("bin", &v).IsNotFound());

  WriteBatch b2;
  b2.Put("k", "v2");
  ASSERT_TRUE(store_->Write(b2, false).ok());
  ASSERT_TRUE(store_->Get("k", &v).ok());
  EXPECT_EQ(v, "v2");

  WriteBatch b3;
  b3.Delete("k");
  b3.Delete("never-there");
  ASSERT_TRUE(store_->Write(b3, true).ok());
  EXPECT_TRUE(store_->Get("k", &v).IsNotFound());
  // An empty batch is fine.
  ASSERT_TRUE(store_->Write(WriteBatch(), true).ok());
}

TEST_P(MetadataStoreContractTest, BatchAppliesInOrder) {
  WriteBatch b;
  b.Put("a", "1");
  b.Delete("a");
  b.Put("b", "1");
  b.Put("b", "2");
  EXPECT_EQ(b.bytes(), 6u);
  ASSERT_TRUE(store_->Write(b, true).ok());
  std::string v;
  EXPECT_TRUE(store_->Get("a", &v).IsNotFound());
  ASSERT_TRUE(store_->Get("b", &v).ok());
  EXPECT_EQ(v, "2");
}

TEST_P(MetadataStoreContractTest, ScanOrderAndPrefixBounds) {
  WriteBatch b;
  // Keys around the prefix "seg/" boundaries: "seg." < "seg/" < "seg0".
  for (const char* k :
       {"seg/b", "seg.", "seg/a", "seg0", "seg/", "seg/a/x", "se", "snap/1", "seg/\xff"}) {
    b.Put(k, std::string("v:") + k);
  }
  ASSERT_TRUE(store_->Write(b, true).ok());

  auto got = ScanAll(store_.get(), "seg/");
  std::vector<std::string> keys;
  for (auto& [k, v] : got) {
    keys.push_back(k);
    EXPECT_EQ(v, "v:" + k);
  }
  EXPECT_EQ(keys, (std::vector<std::string>{"seg/", "seg/a", "seg/a/x", "seg/b", "seg/\xff"}));

  EXPECT_EQ(ScanAll(store_.get(), "").size(), 9u);
  EXPECT_EQ(ScanAll(store_.get(), "seg/a").size(), 2u);
  EXPECT_TRUE(ScanAll(store_.get(), "t").empty());
  EXPECT_TRUE(ScanAll(store_.get(), "seg/c").empty());

  // Early stop.
  int calls = 0;
  ASSERT_TRUE(store_
                  ->Scan("seg/",
                         [&](std::string_view, std::string_view) {
                           calls++;
                           return calls < 2;
                         })
                  .ok());
  EXPECT_EQ(calls, 2);
}

TEST_P(MetadataStoreContractTest, ScanSeesASnapshot) {
  WriteBatch b;
  for (int i = 0; i < 10; i++) b.Put("k/" + std::to_string(i), "old");
  ASSERT_TRUE(store_->Write(b, true).ok());
  int seen = 0;
  // Writes made from inside the scan are not seen by it.
  ASSERT_TRUE(store_
                  ->Scan("k/",
                         [&](std::string_view, std::string_view v) {
                           EXPECT_EQ(v, "old");
                           if (seen++ == 0) {
                             WriteBatch w;
                             for (int i = 0; i < 10; i++) w.Put("k/" + std::to_string(i), "new");
                             w.Put("k/99", "new");
                             w.Delete("k/5");
                             EXPECT_TRUE(store_->Write(w, false).ok());
                           }
                           return true;
                         })
                  .ok());
  EXPECT_EQ(seen, 10);
  auto after = ScanAll(store_.get(), "k/");
  ASSERT_EQ(after.size(), 10u);  // 0..9 without 5, plus 99
  for (auto& [k, v] : after) EXPECT_EQ(v, "new") << k;
}

TEST_P(MetadataStoreContractTest, BatchesAreAtomicForConcurrentReaders) {
  // A writer flips 20 keys together between two values; readers scanning
  // must never see a mix.
  auto write_all = [&](const std::string& v) {
    WriteBatch b;
    for (int i = 0; i < 20; i++) b.Put("x/" + std::to_string(100 + i), v);
    return store_->Write(b, false);
  };
  ASSERT_TRUE(write_all("A").ok());
  std::atomic<bool> stop{false};
  std::atomic<int> mixed{0};
  std::thread reader([&] {
    while (!stop) {
      std::set<std::string> values;
      (void)store_->Scan("x/", [&](std::string_view, std::string_view v) {
        values.emplace(v);
        return true;
      });
      if (values.size() != 1) mixed++;
    }
  });
  for (int i = 0; i < 200; i++) ASSERT_TRUE(write_all(i % 2 ? "A" : "B").ok());
  stop = true;
  reader.join();
  EXPECT_EQ(mixed.load(), 0);
}

TEST_P(MetadataStoreContractTest, ApproximateBytesGrows) {
  uint64_t before = store_->ApproximateBytes();
  WriteBatch b;
  b.Put("big", RandomBytes(100000, 1));
  ASSERT_TRUE(store_->Write(b, true).ok());
  EXPECT_GE(store_->ApproximateBytes(), before + 100000);
}

INSTANTIATE_TEST_SUITE_P(Impl, MetadataStoreContractTest, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "LevelDb" : "Memory";
                         });

TEST(LevelDbMetadataStoreTest, PersistsAcrossReopen) {
  ScratchDir dir;
  {
    auto r = OpenLevelDbMetadataStore(dir.Sub("m"), true);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    WriteBatch b;
    for (int i = 0; i < 1000; i++) b.Put("r/" + std::to_string(i), RandomBytes(100, i));
    ASSERT_TRUE((*r)->Write(b, true).ok());
  }
  auto r = OpenLevelDbMetadataStore(dir.Sub("m"), false);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  std::string v;
  ASSERT_TRUE((*r)->Get("r/777", &v).ok());
  EXPECT_EQ(v, RandomBytes(100, 777));
  EXPECT_EQ(ScanAll(r->get(), "r/").size(), 1000u);
}

TEST(LevelDbMetadataStoreTest, MissingWithoutCreateIsNotFound) {
  ScratchDir dir;
  auto r = OpenLevelDbMetadataStore(dir.Sub("absent"), false);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().ToString();
}

TEST(LevelDbMetadataStoreTest, SecondOpenInProcessIsBusy) {
  ScratchDir dir;
  auto first = OpenLevelDbMetadataStore(dir.Sub("m"), true);
  ASSERT_TRUE(first.ok());
  auto second = OpenLevelDbMetadataStore(dir.Sub("m"), true);
  ASSERT_FALSE(second.ok());
  EXPECT_TRUE(second.status().IsBusy()) << second.status().ToString();
  EXPECT_NE(second.status().message().find(dir.Sub("m")), std::string::npos);
  // Released on close.
  first = Status::Aborted("closed");
  auto third = OpenLevelDbMetadataStore(dir.Sub("m"), true);
  EXPECT_TRUE(third.ok()) << third.status().ToString();
}

TEST(LevelDbMetadataStoreTest, OpenHeldByAnotherProcessIsBusy) {
  ScratchDir dir;
  std::string path = dir.Sub("m");
  int ready[2], release[2];
  ASSERT_EQ(pipe(ready), 0);
  ASSERT_EQ(pipe(release), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto r = OpenLevelDbMetadataStore(path, true);
    char c = r.ok() ? 'y' : 'n';
    (void)!write(ready[1], &c, 1);
    (void)!read(release[0], &c, 1);
    _exit(0);
  }
  char c = 0;
  ASSERT_EQ(read(ready[0], &c, 1), 1);
  ASSERT_EQ(c, 'y');
  auto r = OpenLevelDbMetadataStore(path, true);
  (void)!write(release[1], &c, 1);
  int wstatus;
  waitpid(child, &wstatus, 0);
  for (int fd : {ready[0], ready[1], release[0], release[1]}) close(fd);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsBusy()) << r.status().ToString();
  // The child is gone: the lock went with it.
  auto again = OpenLevelDbMetadataStore(path, true);
  EXPECT_TRUE(again.ok()) << again.status().ToString();
}

TEST(LevelDbMetadataStoreTest, CorruptTableIsCorruption) {
  ScratchDir dir;
  std::string path = dir.Sub("m");
  {
    auto r = OpenLevelDbMetadataStore(path, true);
    ASSERT_TRUE(r.ok());
    // Enough to be flushed to a table when the store is reopened.
    WriteBatch b;
    for (int i = 0; i < 200; i++) b.Put("k/" + std::to_string(i), RandomBytes(1000, i));
    ASSERT_TRUE((*r)->Write(b, true).ok());
  }
  {
    // Reopening converts the log into a table file.
    auto r = OpenLevelDbMetadataStore(path, false);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  std::string table;
  for (const auto& e : std::filesystem::directory_iterator(path)) {
    if (e.path().extension() == ".ldb") table = e.path();
  }
  ASSERT_FALSE(table.empty());
  {
    std::fstream f(table, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    std::string junk(64, '\x5a');
    f.write(junk.data(), junk.size());
  }
  auto r = OpenLevelDbMetadataStore(path, false);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  Status bad = Status::OK();
  for (int i = 0; i < 200 && bad.ok(); i++) {
    std::string v;
    bad = (*r)->Get("k/" + std::to_string(i), &v);
  }
  EXPECT_TRUE(bad.IsCorruption()) << bad.ToString();
  int seen = 0;
  Status scan = (*r)->Scan("k/", [&](std::string_view, std::string_view) {
    seen++;
    return true;
  });
  EXPECT_TRUE(scan.IsCorruption()) << scan.ToString();
}

// A power cut can leave the log's unsynced tail partly zero (the file's
// size reached the disk, its last pages did not). The synced batches before
// it are durable and the store must open; the torn batch, never
// acknowledged as durable, is dropped. (LevelDB's paranoid recovery alone
// refuses such a log: OpenLevelDbMetadataStore recovers without it once.)
TEST(LevelDbMetadataStoreTest, ATornUnsyncedLogTailStillOpens) {
  ScratchDir dir;
  std::string path = dir.Sub("m");
  auto log_file = [&] {
    std::string log;
    for (const auto& e : std::filesystem::directory_iterator(path))
      if (e.path().extension() == ".log") log = e.path();
    return log;
  };
  uint64_t synced = 0, written = 0;
  {
    auto r = OpenLevelDbMetadataStore(path, true);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    WriteBatch b;
    b.Put("k/durable", RandomBytes(3000, 1));
    ASSERT_TRUE((*r)->Write(b, true).ok());
    synced = std::filesystem::file_size(log_file());
    WriteBatch c;
    c.Put("k/torn", RandomBytes(3000, 2));
    ASSERT_TRUE((*r)->Write(c, false).ok());
    written = std::filesystem::file_size(log_file());
  }
  ASSERT_GT(written, synced + 1000);
  {
    // The second record's header stays, part of its payload reads as zeros.
    std::fstream f(log_file(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(synced + 100));
    const std::string zeros(1000, '\0');
    f.write(zeros.data(), zeros.size());
  }
  auto r = OpenLevelDbMetadataStore(path, false);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  std::string v;
  ASSERT_TRUE((*r)->Get("k/durable", &v).ok());
  EXPECT_EQ(v, RandomBytes(3000, 1));
  EXPECT_TRUE((*r)->Get("k/torn", &v).IsNotFound());
  // And the store is whole again: it reopens with its checks on.
  r = Status::Aborted("closed");
  auto again = OpenLevelDbMetadataStore(path, false);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_TRUE((*again)->Get("k/durable", &v).ok());
}

// The log scan tells a torn tail from damage under whole records, on logs
// LevelDB itself wrote: batches of several sizes, one of them spanning
// several 32 KiB blocks (first, middle and last records).
TEST(LevelDbLogScanTest, TornTailsAndDamagedBodies) {
  ScratchDir dir;
  std::string path = dir.Sub("m");
  {
    auto r = OpenLevelDbMetadataStore(path, true);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    for (int i = 0; i < 12; i++) {
      WriteBatch b;
      b.Put("k/" + std::to_string(i), RandomBytes(i == 5 ? 100000 : 500 + 300 * i, i));
      ASSERT_TRUE((*r)->Write(b, true).ok());
    }
  }
  std::string log_path;
  for (const auto& e : std::filesystem::directory_iterator(path))
    if (e.path().extension() == ".log") log_path = e.path();
  std::ifstream in(log_path, std::ios::binary);
  const std::string log((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(log.size(), 120000u);
  EXPECT_EQ(ScanLevelDbLog(log), LevelDbLogState::kWhole);
  EXPECT_EQ(ScanLevelDbLog(""), LevelDbLogState::kWhole);
  auto scan = [](std::string data) { return ScanLevelDbLog(data); };
  // A tail cut anywhere inside the last record, or zero from there on.
  for (size_t keep : {log.size() - 1, log.size() - 100, log.size() - 3000}) {
    EXPECT_EQ(scan(log.substr(0, keep)), LevelDbLogState::kTornTail) << keep;
    std::string zeroed = log;
    std::fill(zeroed.begin() + static_cast<std::ptrdiff_t>(keep), zeroed.end(), '\0');
    EXPECT_EQ(scan(zeroed), LevelDbLogState::kTornTail) << keep;
  }
  // Inside the big batch's records: damage (a cut, zeros, a flipped byte)
  // with whole records after it.
  for (size_t at : {size_t{20000}, size_t{40000}, size_t{70000}}) {
    std::string flipped = log;
    flipped[at] = static_cast<char>(flipped[at] ^ 0x40);
    EXPECT_EQ(scan(flipped), LevelDbLogState::kDamagedBody) << at;
    std::string zeroed = log;
    std::fill(zeroed.begin() + static_cast<std::ptrdiff_t>(at),
              zeroed.begin() + static_cast<std::ptrdiff_t>(at + 10), '\0');
    EXPECT_EQ(scan(zeroed), LevelDbLogState::kDamagedBody) << at;
  }
  // A flipped byte in the first record is damage under whole records too.
  std::string first = log;
  first[10] = static_cast<char>(first[10] ^ 1);
  EXPECT_EQ(scan(first), LevelDbLogState::kDamagedBody);
  // The directory scan reports the worst of its logs.
  auto whole = ScanLevelDbLogs(path);
  ASSERT_TRUE(whole.ok()) << whole.status().ToString();
  EXPECT_EQ(*whole, LevelDbLogState::kWhole);
  {
    std::ofstream out(log_path, std::ios::binary | std::ios::trunc);
    out << first;
  }
  auto damaged = ScanLevelDbLogs(path);
  ASSERT_TRUE(damaged.ok());
  EXPECT_EQ(*damaged, LevelDbLogState::kDamagedBody);
  // And such a store is refused, not opened without its damaged records.
  auto r = OpenLevelDbMetadataStore(path, false);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsCorruption()) << r.status().ToString();
}

TEST(MemoryMetadataStoreTest, ConcurrentWriters) {
  auto store = NewMemoryMetadataStore();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 100; i++) {
        WriteBatch b;
        b.Put("t" + std::to_string(t) + "/" + std::to_string(i), "v");
        EXPECT_TRUE(store->Write(b, false).ok());
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ScanAll(store.get(), "t").size(), 400u);
  EXPECT_EQ(ScanAll(store.get(), "t3/").size(), 100u);
}

}  // namespace
}  // namespace vmdedup
