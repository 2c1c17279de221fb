// Tests of the local-directory ObjectStore: round trips, ranges, listing,
// atomic replacement, name validation, and leftovers of crashed writers.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <thread>

#include "store/object_store.h"
#include "tests/test_util.h"

namespace vmdedup {
namespace {

using testing::RandomBytes;
using testing::ScratchDir;

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

void WriteFile(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
}

TEST(LocalObjectStoreTest, PutGetSizeDelete) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.Sub("repo"));
  std::string data = RandomBytes(100000, 1);
  ASSERT_TRUE(store->Put("vms/a/data/0001.ctr", Bytes(data)).ok());

  std::string got;
  ASSERT_TRUE(store->Get("vms/a/data/0001.ctr", &got).ok());
  EXPECT_EQ(got, data);
  auto size = store->Size("vms/a/data/0001.ctr");
  ASSERT_TRUE(size.ok());
  EXPECT_EQ(*size, data.size());
  // The object is a plain file at root/name.
  struct stat sb;
  ASSERT_EQ(::stat(dir.Sub("repo/vms/a/data/0001.ctr").c_str(), &sb), 0);
  EXPECT_EQ(static_cast<size_t>(sb.st_size), data.size());

  ASSERT_TRUE(store->Delete("vms/a/data/0001.ctr").ok());
  EXPECT_TRUE(store->Get("vms/a/data/0001.ctr", &got).IsNotFound());
  EXPECT_TRUE(store->Size("vms/a/data/0001.ctr").status().IsNotFound());
  // Deleting a missing object is OK.
  EXPECT_TRUE(store->Delete("vms/a/data/0001.ctr").ok());
  EXPECT_TRUE(store->Delete("never/was").ok());
}

TEST(LocalObjectStoreTest, EmptyObject) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  ASSERT_TRUE(store->Put("empty", {}).ok());
  std::string got = "junk";
  ASSERT_TRUE(store->Get("empty", &got).ok());
  EXPECT_EQ(got, "");
  EXPECT_EQ(*store->Size("empty"), 0u);
  ASSERT_TRUE(store->GetRange("empty", 0, 0, &got).ok());
  EXPECT_TRUE(store->GetRange("empty", 0, 1, &got).IsCorruption());
}

TEST(LocalObjectStoreTest, GetRange) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  std::string data = RandomBytes(8192, 2);
  ASSERT_TRUE(store->Put("obj", Bytes(data)).ok());

  std::string got;
  ASSERT_TRUE(store->GetRange("obj", 0, 8192, &got).ok());
  EXPECT_EQ(got, data);
  ASSERT_TRUE(store->GetRange("obj", 100, 1000, &got).ok());
  EXPECT_EQ(got, data.substr(100, 1000));
  ASSERT_TRUE(store->GetRange("obj", 8191, 1, &got).ok());
  EXPECT_EQ(got, data.substr(8191));
  ASSERT_TRUE(store->GetRange("obj", 8192, 0, &got).ok());
  EXPECT_EQ(got, "");

  // Past the end: the object is truncated as far as the reader knows.
  Status st = store->GetRange("obj", 8000, 193, &got);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("object obj truncated"), std::string::npos) << st.ToString();
  EXPECT_TRUE(store->GetRange("obj", 8193, 0, &got).IsCorruption());
  EXPECT_TRUE(store->GetRange("obj", UINT64_MAX, 2, &got).IsCorruption());
  EXPECT_TRUE(store->GetRange("obj", 1, UINT64_MAX, &got).IsCorruption());
  EXPECT_TRUE(store->GetRange("missing", 0, 1, &got).IsNotFound());
}

TEST(LocalObjectStoreTest, ReaderReadsRangesOfOneOpenObject) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  std::string data = RandomBytes(8192, 4);
  ASSERT_TRUE(store->Put("d/obj", Bytes(data)).ok());
  auto reader = store->OpenReader("d/obj");
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  std::string got;
  ASSERT_TRUE((*reader)->ReadAt(100, 1000, &got).ok());
  EXPECT_EQ(got, data.substr(100, 1000));
  ASSERT_TRUE((*reader)->ReadAt(8192, 0, &got).ok());
  EXPECT_EQ(got, "");
  Status st = (*reader)->ReadAt(8000, 193, &got);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("object d/obj truncated"), std::string::npos) << st.ToString();
  EXPECT_TRUE((*reader)->ReadAt(1, UINT64_MAX, &got).IsCorruption());
  // The open object stays readable after a delete; truncated under the
  // reader, the missing bytes are Corruption.
  ASSERT_EQ(::link(dir.Sub("d/obj").c_str(), dir.Sub("d/keep").c_str()), 0);
  ASSERT_TRUE(store->Delete("d/obj").ok());
  ASSERT_TRUE((*reader)->ReadAt(0, 8192, &got).ok());
  EXPECT_EQ(got, data);
  ASSERT_EQ(::truncate(dir.Sub("d/keep").c_str(), 4096), 0);
  EXPECT_TRUE((*reader)->ReadAt(4000, 200, &got).IsCorruption());
  EXPECT_TRUE(store->OpenReader("missing").status().IsNotFound());
  EXPECT_TRUE(store->OpenReader("../x").status().IsInvalidArgument());
}

TEST(LocalObjectStoreTest, TruncatedFileIsCorruptionOnRangeRead) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  std::string data = RandomBytes(4096, 3);
  ASSERT_TRUE(store->Put("obj", Bytes(data)).ok());
  ASSERT_EQ(::truncate(dir.Sub("obj").c_str(), 1000), 0);
  std::string got;
  EXPECT_TRUE(store->GetRange("obj", 0, 4096, &got).IsCorruption());
  ASSERT_TRUE(store->GetRange("obj", 0, 1000, &got).ok());
  EXPECT_EQ(got, data.substr(0, 1000));
}

TEST(LocalObjectStoreTest, PutReplacesAtomically) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  std::string v1 = RandomBytes(50000, 4), v2 = RandomBytes(123, 5);
  ASSERT_TRUE(store->Put("x/obj", Bytes(v1)).ok());
  ASSERT_TRUE(store->Put("x/obj", Bytes(v2)).ok());
  std::string got;
  ASSERT_TRUE(store->Get("x/obj", &got).ok());
  EXPECT_EQ(got, v2);
  // No temporary is left behind by successful Puts.
  std::vector<ObjectStore::Temporary> temps;
  ASSERT_TRUE(store->ListTemporary("", &temps).ok());
  EXPECT_TRUE(temps.empty());

  // Readers racing with replacements see one version or the other, whole.
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::thread reader([&] {
    std::string r;
    while (!stop) {
      if (!store->Get("x/obj", &r).ok() || (r != v1 && r != v2)) bad++;
    }
  });
  for (int i = 0; i < 30; i++) {
    ASSERT_TRUE(store->Put("x/obj", Bytes(i % 2 ? v1 : v2)).ok());
  }
  stop = true;
  reader.join();
  EXPECT_EQ(bad.load(), 0);
}

// PutNew never replaces: a container name already taken (ids handed out
// twice after lost metadata) leaves the object there as it was, and no
// temporary behind. Both ways: the local store's own (atomic), and the
// default of the interface (check, then Put).
TEST(LocalObjectStoreTest, PutNewNeverReplaces) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  const std::string v1 = RandomBytes(3 << 20, 6), v2 = RandomBytes(100, 7);
  ASSERT_TRUE(store->PutNew("vms/a/data/0000000000000001.ctr", Bytes(v1)).ok());
  Status st = store->PutNew("vms/a/data/0000000000000001.ctr", Bytes(v2));
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("never replaced"), std::string::npos) << st.ToString();
  std::string got;
  ASSERT_TRUE(store->Get("vms/a/data/0000000000000001.ctr", &got).ok());
  EXPECT_EQ(got, v1);
  std::vector<ObjectStore::Temporary> temps;
  ASSERT_TRUE(store->ListTemporary("", &temps).ok());
  EXPECT_TRUE(temps.empty());

  // The interface's default, through a store that only forwards.
  struct Forwarding : ObjectStore {
    ObjectStore* base;
    explicit Forwarding(ObjectStore* b) : base(b) {}
    Status Put(const std::string& n, std::span<const uint8_t> d) override {
      return base->Put(n, d);
    }
    Status Get(const std::string& n, std::string* o) override { return base->Get(n, o); }
    Status GetRange(const std::string& n, uint64_t off, uint64_t len, std::string* o) override {
      return base->GetRange(n, off, len, o);
    }
    Result<uint64_t> Size(const std::string& n) override { return base->Size(n); }
    Status Delete(const std::string& n) override { return base->Delete(n); }
    Status List(const std::string& p, std::vector<std::string>* o) override {
      return base->List(p, o);
    }
    std::string Describe() const override { return base->Describe(); }
  } forwarding(store.get());
  EXPECT_TRUE(forwarding.PutNew("vms/a/data/0000000000000001.ctr", Bytes(v2)).IsCorruption());
  EXPECT_TRUE(forwarding.PutNew("vms/a/data/0000000000000002.ctr", Bytes(v2)).ok());
  ASSERT_TRUE(store->Get("vms/a/data/0000000000000001.ctr", &got).ok());
  EXPECT_EQ(got, v1);
}

TEST(LocalObjectStoreTest, ConcurrentPutsOfDistinctObjects) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10; i++) {
        std::string d = RandomBytes(1000 + i, t * 100 + i);
        EXPECT_TRUE(store->Put("t" + std::to_string(t) + "/o" + std::to_string(i), Bytes(d)).ok());
      }
    });
  }
  for (auto& th : threads) th.join();
  std::vector<std::string> names;
  ASSERT_TRUE(store->List("", &names).ok());
  EXPECT_EQ(names.size(), 40u);
  std::string got;
  ASSERT_TRUE(store->Get("t2/o7", &got).ok());
  EXPECT_EQ(got, RandomBytes(1007, 207));
}

TEST(LocalObjectStoreTest, StaleTemporaryWithOurPidDoesNotBlockPut) {
  // After a reboot a new process may get the PID of a crashed writer.
  ScratchDir dir;
  ASSERT_EQ(::mkdir(dir.Sub("d").c_str(), 0755), 0);
  for (int i = 0; i < 5; i++) {
    WriteFile(dir.Sub("d/obj.tmp." + std::to_string(getpid()) + "." + std::to_string(i)), "old");
  }
  auto store = NewLocalObjectStore(dir.path());
  ASSERT_TRUE(store->Put("d/obj", Bytes(std::string("new"))).ok());
  std::string got;
  ASSERT_TRUE(store->Get("d/obj", &got).ok());
  EXPECT_EQ(got, "new");
  std::vector<ObjectStore::Temporary> temps;
  ASSERT_TRUE(store->ListTemporary("", &temps).ok());
  EXPECT_EQ(temps.size(), 5u);  // left for check to report, untouched
}

TEST(LocalObjectStoreTest, ListIsRecursiveSortedAndPrefixed) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  // Byte order puts "a.x" before "a/b" ('.' < '/'), whatever the directory
  // walk order is.
  for (const char* n :
       {"vms/b/data/2", "vms/a/data/1", "a/b", "a.x", "vms/a/meta", "cds/0", "vms/ab/data/0"}) {
    ASSERT_TRUE(store->Put(n, Bytes(std::string(n))).ok()) << n;
  }
  std::vector<std::string> names;
  ASSERT_TRUE(store->List("", &names).ok());
  EXPECT_EQ(names, (std::vector<std::string>{"a.x", "a/b", "cds/0", "vms/a/data/1", "vms/a/meta",
                                             "vms/ab/data/0", "vms/b/data/2"}));
  ASSERT_TRUE(store->List("vms/a", &names).ok());
  EXPECT_EQ(names, (std::vector<std::string>{"vms/a/data/1", "vms/a/meta", "vms/ab/data/0"}));
  ASSERT_TRUE(store->List("vms/a/", &names).ok());
  EXPECT_EQ(names, (std::vector<std::string>{"vms/a/data/1", "vms/a/meta"}));
  ASSERT_TRUE(store->List("vms/a/d", &names).ok());
  EXPECT_EQ(names, (std::vector<std::string>{"vms/a/data/1"}));
  ASSERT_TRUE(store->List("vms/zzz/", &names).ok());
  EXPECT_TRUE(names.empty());
  ASSERT_TRUE(store->List("a.x/", &names).ok());  // a file, not a directory
  EXPECT_TRUE(names.empty());
  EXPECT_TRUE(store->List("../", &names).IsInvalidArgument());

  // A store over a root that does not exist yet lists nothing.
  auto empty = NewLocalObjectStore(dir.Sub("fresh"));
  ASSERT_TRUE(empty->List("", &names).ok());
  EXPECT_TRUE(names.empty());
}

TEST(LocalObjectStoreTest, RejectsBadNames) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.Sub("repo"));
  std::string d = "x";
  for (const char* n : {"", "/abs", "a//b", "a/", "./a", "a/./b", "../escape", "a/../../b",
                        "a/b.tmp.1.2", "x.tmp."}) {
    EXPECT_TRUE(store->Put(n, Bytes(d)).IsInvalidArgument()) << n;
    std::string got;
    EXPECT_TRUE(store->Get(n, &got).IsInvalidArgument()) << n;
    EXPECT_TRUE(store->Delete(n).IsInvalidArgument()) << n;
  }
  struct stat sb;
  EXPECT_NE(::stat(dir.Sub("escape").c_str(), &sb), 0);
  // ".tmp" alone, or in a directory name, is fine.
  EXPECT_TRUE(store->Put("a.tmp", Bytes(d)).ok());
  EXPECT_TRUE(store->Put("d.tmp.1/obj", Bytes(d)).ok());
}

TEST(LocalObjectStoreTest, TemporariesAreListedSeparatelyAndRemovable) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  ASSERT_TRUE(store->Put("vms/a/data/1.ctr", Bytes(std::string("real"))).ok());

  // The leftover of a writer that died, and one of a live writer (us).
  pid_t child = fork();
  if (child == 0) _exit(0);
  ASSERT_GT(child, 0);
  int wstatus;
  ASSERT_EQ(waitpid(child, &wstatus, 0), child);  // reaped: its PID is free
  std::string dead = "vms/a/data/2.ctr.tmp." + std::to_string(child) + ".0";
  std::string live = "vms/a/data/3.ctr.tmp." + std::to_string(getpid()) + ".7";
  WriteFile(dir.Sub(dead), std::string(1234, 'x'));
  WriteFile(dir.Sub(live), std::string(10, 'y'));

  std::vector<std::string> names;
  ASSERT_TRUE(store->List("", &names).ok());
  EXPECT_EQ(names, std::vector<std::string>{"vms/a/data/1.ctr"});

  std::vector<ObjectStore::Temporary> temps;
  ASSERT_TRUE(store->ListTemporary("vms/", &temps).ok());
  ASSERT_EQ(temps.size(), 2u);
  EXPECT_EQ(temps[0].name, dead);
  EXPECT_EQ(temps[0].bytes, 1234u);
  EXPECT_GE(temps[0].age_seconds, 0);
  EXPECT_FALSE(temps[0].writer_may_be_alive);
  EXPECT_EQ(temps[1].name, live);
  EXPECT_EQ(temps[1].bytes, 10u);
  EXPECT_TRUE(temps[1].writer_may_be_alive);
  ASSERT_TRUE(store->ListTemporary("other/", &temps).ok());
  EXPECT_TRUE(temps.empty());

  // RemoveTemporary never removes an object.
  EXPECT_TRUE(store->RemoveTemporary("vms/a/data/1.ctr").IsInvalidArgument());
  EXPECT_TRUE(store->RemoveTemporary("../x.tmp.1.1").IsInvalidArgument());
  ASSERT_TRUE(store->RemoveTemporary(dead).ok());
  ASSERT_TRUE(store->RemoveTemporary(dead).ok());  // already gone: OK
  ASSERT_TRUE(store->ListTemporary("", &temps).ok());
  ASSERT_EQ(temps.size(), 1u);
  EXPECT_EQ(temps[0].name, live);
  std::string got;
  ASSERT_TRUE(store->Get("vms/a/data/1.ctr", &got).ok());
  EXPECT_EQ(got, "real");
}

TEST(LocalObjectStoreTest, FileWhereADirectoryIsNeededIsAnError) {
  ScratchDir dir;
  auto store = NewLocalObjectStore(dir.path());
  ASSERT_TRUE(store->Put("a", Bytes(std::string("x"))).ok());
  Status st = store->Put("a/b", Bytes(std::string("y")));  // mkdir a: EEXIST, open: ENOTDIR
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  // A directory is not an object.
  ASSERT_TRUE(store->Put("d/obj", Bytes(std::string("z"))).ok());
  std::string got;
  EXPECT_TRUE(store->Get("d", &got).IsNotFound());
  EXPECT_TRUE(store->Size("d").status().IsNotFound());
}

TEST(LocalObjectStoreTest, FullFilesystemIsNoSpaceAndLeavesNothing) {
  // Needs a tiny filesystem: mounted as tmpfs when running as root, skipped
  // otherwise.
  if (geteuid() != 0) GTEST_SKIP() << "needs root to mount a small tmpfs";
  ScratchDir dir;
  std::string mnt = dir.Sub("small");
  ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=256k") != 0) {
    GTEST_SKIP() << "cannot mount tmpfs: " << std::strerror(errno);
  }
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mnt};

  auto store = NewLocalObjectStore(mnt);
  std::string small = RandomBytes(1000, 6);
  ASSERT_TRUE(store->Put("a/ok", Bytes(small)).ok());
  Status st = store->Put("a/big", Bytes(RandomBytes(1 << 20, 7)));
  EXPECT_TRUE(st.IsNoSpace()) << st.ToString();
  // The failed Put leaves neither the object nor its temporary.
  std::string got;
  EXPECT_TRUE(store->Get("a/big", &got).IsNotFound());
  std::vector<ObjectStore::Temporary> temps;
  ASSERT_TRUE(store->ListTemporary("", &temps).ok());
  EXPECT_TRUE(temps.empty());
  ASSERT_TRUE(store->Get("a/ok", &got).ok());
  EXPECT_EQ(got, small);
}

}  // namespace
}  // namespace vmdedup
