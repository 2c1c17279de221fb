// Unit tests of the metadata records (store/records.h) and the repository
// layer (store/repository.h): round trips, every corrupted or truncated byte
// detected, names and snapshot references validated, the VM lock.
#include "store/records.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include "base/crc32c.h"
#include "base/encoding.h"
#include "store/repository.h"
#include "tests/test_util.h"

namespace vmdedup {
namespace {

SnapshotRecord SampleSnapshot() {
  SnapshotRecord s;
  s.vm = "web1";
  s.disk = "vda";
  s.seq = 7;
  s.parent_seq = 6;
  s.time = 1764000000;
  s.size = (5ull << 30) + 12345;
  s.segment_size = 2 << 20;
  s.chunker = {ChunkerKind::kCdc, 4096, 1024, 16384};
  s.segment_count = (s.size + s.segment_size - 1) / s.segment_size;
  s.stats = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  s.duration_ms = 1234;
  s.source = "file:/x.qcow2 (qcow2)";
  s.read_mode = "incremental: dirty bitmap b since web1/vda/6";
  s.bitmap = "vmdedup.0123abcd.web1.vda.7";
  return s;
}

SegmentRecipe SampleRecipe() {
  SegmentRecipe r;
  r.id = 42;
  BlockRef z;
  z.kind = BlockKind::kZero;
  z.length = 8192;
  BlockRef a;
  a.kind = BlockKind::kOwn;
  a.length = 4096;
  a.fingerprint = Sha256({reinterpret_cast<const uint8_t*>("a"), 1});
  a.container = 3;
  a.offset = 32;
  a.record_len = 1000;
  BlockRef c = a;
  c.kind = BlockKind::kCds;
  c.container = 9;
  c.offset = 123456;
  r.blocks = {z, a, c};
  r.length = 8192 + 4096 + 4096;
  return r;
}

// Every single-byte change and every truncation of `value` must fail to
// decode with Corruption (or NotSupported for a newer record version).
template <typename Decode>
void ExpectEveryDamageDetected(const std::string& key, const std::string& value, Decode decode) {
  for (size_t i = 0; i < value.size(); i++) {
    for (uint8_t flip : {0x01, 0x80, 0xff}) {
      std::string bad = value;
      bad[i] = static_cast<char>(bad[i] ^ flip);
      Status st = decode(key, bad);
      EXPECT_TRUE(st.IsCorruption() || st.code() == Status::Code::kNotSupported)
          << "byte " << i << " flip " << int(flip) << ": " << st.ToString();
    }
  }
  for (size_t n = 0; n < value.size(); n++) {
    Status st = decode(key, value.substr(0, n));
    EXPECT_TRUE(st.IsCorruption()) << "truncated to " << n << ": " << st.ToString();
  }
  // The same value under another key is detected too (the key is checksummed).
  EXPECT_TRUE(decode(key + "x", value).IsCorruption());
}

TEST(RecordsTest, SnapshotRoundTripAndDamage) {
  SnapshotRecord s = SampleSnapshot();
  std::string key = SnapshotKey(s.disk, s.seq);
  EXPECT_EQ(key, "snap/vda/00000000000000000007");
  std::string v = EncodeSnapshot(key, s);
  SnapshotRecord d;
  ASSERT_TRUE(DecodeSnapshot(key, v, &d).ok());
  EXPECT_EQ(d.Id(), "web1/vda/7");
  EXPECT_EQ(d.parent_seq, 6u);
  EXPECT_EQ(d.size, s.size);
  EXPECT_EQ(d.segment_count, s.segment_count);
  EXPECT_EQ(d.chunker.kind, ChunkerKind::kCdc);
  EXPECT_EQ(d.stats.metadata, 9u);
  EXPECT_EQ(d.bitmap, s.bitmap);
  EXPECT_EQ(d.read_mode, s.read_mode);
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    SnapshotRecord r;
    return DecodeSnapshot(k, val, &r);
  });
}

// Rewrites a value's record version byte (and its body) and re-seals it,
// as an older or newer vmdedup would have written it.
std::string Reseal(const std::string& key, uint8_t version, std::string head_and_body) {
  head_and_body[1] = static_cast<char>(version);
  uint32_t crc = crc32c::Extend(0, key.data(), key.size());
  crc = crc32c::Extend(crc, head_and_body.data(), head_and_body.size());
  ByteWriter w;
  w.Bytes(head_and_body.data(), head_and_body.size());
  w.U32(crc32c::Mask(crc));
  return w.Take();
}

TEST(RecordsTest, SnapshotVersion2CarriesTheCdsVersion) {
  SnapshotRecord s = SampleSnapshot();
  s.cds_version = (1ull << 40) + 3;
  std::string key = SnapshotKey(s.disk, s.seq);
  std::string v = EncodeSnapshot(key, s);
  EXPECT_EQ(static_cast<uint8_t>(v[1]), 2u) << "snapshots are written as record version 2";
  SnapshotRecord d;
  ASSERT_TRUE(DecodeSnapshot(key, v, &d).ok());
  EXPECT_EQ(d.cds_version, s.cds_version);
  EXPECT_EQ(d.bitmap, s.bitmap);
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    SnapshotRecord r;
    return DecodeSnapshot(k, val, &r);
  });
}

TEST(RecordsTest, SnapshotVersion1IsStillReadWithoutCdsVersion) {
  SnapshotRecord s = SampleSnapshot();
  s.cds_version = 0;
  std::string key = SnapshotKey(s.disk, s.seq);
  std::string v2 = EncodeSnapshot(key, s);
  // A version 1 body is the version 2 body without the trailing cds version
  // (here the one byte 0x00 of varint 0).
  std::string covered = v2.substr(0, v2.size() - 4);
  ASSERT_EQ(covered.back(), '\0');
  covered.pop_back();
  std::string v1 = Reseal(key, 1, covered);

  SnapshotRecord d;
  d.cds_version = 99;  // must be reset by the decoder
  Status st = DecodeSnapshot(key, v1, &d);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(d.cds_version, 0u);
  EXPECT_EQ(d.Id(), "web1/vda/7");
  EXPECT_EQ(d.bitmap, s.bitmap);
  EXPECT_EQ(d.stats.metadata, 9u);
  ExpectEveryDamageDetected(key, v1, [](const std::string& k, const std::string& val) {
    SnapshotRecord r;
    return DecodeSnapshot(k, val, &r);
  });

  // A version 1 record carrying a version 2 body has a trailing byte.
  EXPECT_TRUE(DecodeSnapshot(key, Reseal(key, 1, v2.substr(0, v2.size() - 4)), &d).IsCorruption());
  // A version 2 record without the cds version is truncated.
  EXPECT_TRUE(DecodeSnapshot(key, Reseal(key, 2, covered), &d).IsCorruption());
  // Version 3 is a newer vmdedup's, version 0 never existed.
  EXPECT_EQ(DecodeSnapshot(key, Reseal(key, 3, v2.substr(0, v2.size() - 4)), &d).code(),
            Status::Code::kNotSupported);
  EXPECT_TRUE(DecodeSnapshot(key, Reseal(key, 0, covered), &d).IsCorruption());
  // Other record types stay at version 1.
  std::string counter = EncodeCounter(CounterKey("container"), 5);
  EXPECT_EQ(static_cast<uint8_t>(counter[1]), 1u);
  uint64_t n = 0;
  EXPECT_EQ(
      DecodeCounter(CounterKey("container"),
                    Reseal(CounterKey("container"), 2, counter.substr(0, counter.size() - 4)), &n)
          .code(),
      Status::Code::kNotSupported);
}

TEST(RecordsTest, SegmentRecipeRoundTripAndDamage) {
  SegmentRecipe r = SampleRecipe();
  std::string key = SegmentRecipeKey(r.id);
  std::string v = EncodeSegmentRecipe(key, r);
  SegmentRecipe d;
  ASSERT_TRUE(DecodeSegmentRecipe(key, v, &d).ok());
  ASSERT_EQ(d.blocks.size(), 3u);
  EXPECT_EQ(d.length, r.length);
  EXPECT_EQ(d.blocks[1].fingerprint, r.blocks[1].fingerprint);
  EXPECT_EQ(d.blocks[2].kind, BlockKind::kCds);
  EXPECT_EQ(d.blocks[2].offset, 123456u);
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    SegmentRecipe x;
    return DecodeSegmentRecipe(k, val, &x);
  });
}

TEST(RecordsTest, SegmentListContainerAndCounterRoundTrip) {
  std::vector<uint64_t> ids = {0, 1, 2, 0, 1ull << 40};
  std::string key = SnapshotSegmentsKey("vda", 3);
  std::string v = EncodeSegmentList(key, ids);
  std::vector<uint64_t> back;
  ASSERT_TRUE(DecodeSegmentList(key, v, &back).ok());
  EXPECT_EQ(back, ids);
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    std::vector<uint64_t> x;
    return DecodeSegmentList(k, val, &x);
  });

  ContainerRecord c{5, 1 << 20, 17, 70000, ContainerObjectName("web1", 5), "vda/3"};
  EXPECT_EQ(c.object, "vms/web1/data/0000000000000005.ctr");
  key = ContainerKey(5);
  v = EncodeContainerRecord(key, c);
  ContainerRecord cd;
  ASSERT_TRUE(DecodeContainerRecord(key, v, &cd).ok());
  EXPECT_EQ(cd.object, c.object);
  EXPECT_EQ(cd.block_count, 17u);
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    ContainerRecord x;
    return DecodeContainerRecord(k, val, &x);
  });

  key = CounterKey("segment");
  v = EncodeCounter(key, 99);
  uint64_t n = 0;
  ASSERT_TRUE(DecodeCounter(key, v, &n).ok());
  EXPECT_EQ(n, 99u);
  // A record of one type is not accepted as another.
  SnapshotRecord s;
  EXPECT_TRUE(DecodeSnapshot(key, v, &s).IsCorruption());
}

TEST(RecordsTest, RecipeWhoseLengthsDoNotAddUpIsCorruption) {
  SegmentRecipe r = SampleRecipe();
  r.length += 1;
  std::string key = SegmentRecipeKey(r.id);
  SegmentRecipe d;
  EXPECT_TRUE(DecodeSegmentRecipe(key, EncodeSegmentRecipe(key, r), &d).IsCorruption());
}

TEST(RecordsTest, NamesAndSnapshotReferences) {
  EXPECT_TRUE(ValidateName("VM", "web-1.prod_A").ok());
  for (std::string bad :
       std::vector<std::string>{"", ".hidden", "a/b", "a b", "ä", std::string(65, 'x')})
    EXPECT_TRUE(ValidateName("VM", bad).IsInvalidArgument()) << bad;
  auto r = ParseSnapshotRef("web1/vda/12");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->vm, "web1");
  EXPECT_EQ(r->disk, "vda");
  EXPECT_EQ(*r->seq, 12u);
  r = ParseSnapshotRef("web1/vda/latest");
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->seq.has_value());
  for (std::string bad : std::vector<std::string>{"web1", "web1/vda", "web1/vda/0", "web1/vda/x",
                                                  "a/b/c/d", "/vda/1"})
    EXPECT_TRUE(ParseSnapshotRef(bad).status().IsInvalidArgument()) << bad;
}

TEST(RepositoryTest, CreateOpenAndLock) {
  testing::ScratchDir dir;
  std::string path = dir.Sub("repo");
  RepoConfig cfg;
  cfg.segment_size = 1 << 20;
  auto repo = Repository::Create(path, cfg);
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  EXPECT_EQ((*repo)->config().repo_id.size(), 16u);
  // Creating again over a non-empty directory is refused.
  EXPECT_TRUE(Repository::Create(path, cfg).status().IsInvalidArgument());
  auto again = Repository::Open(path);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->config().segment_size, 1u << 20);
  EXPECT_EQ((*again)->config().repo_id, (*repo)->config().repo_id);
  // Not a repository / missing.
  EXPECT_TRUE(Repository::Open(dir.Sub("nope")).status().IsNotFound());
  // Bad configuration values.
  RepoConfig bad = cfg;
  bad.segment_size = 3 << 20;
  EXPECT_TRUE(Repository::Create(dir.Sub("r2"), bad).status().IsInvalidArgument());
  bad = cfg;
  bad.compression_level = 0;
  EXPECT_TRUE(Repository::Create(dir.Sub("r3"), bad).status().IsInvalidArgument());

  // A reader of a VM that has no backups gets NotFound.
  EXPECT_TRUE((*repo)->OpenVm("vm1", Repository::Access::kRead).status().IsNotFound());
  auto writer = (*repo)->OpenVm("vm1", Repository::Access::kWrite);
  ASSERT_TRUE(writer.ok()) << writer.status().ToString();
  // A second writer is refused by the lock, with a message naming the VM.
  auto second = (*again)->OpenVm("vm1", Repository::Access::kWrite);
  ASSERT_TRUE(second.status().IsBusy()) << second.status().ToString();
  EXPECT_NE(second.status().message().find("'vm1'"), std::string::npos);
  // Container ids are never handed out twice.
  auto a = (*writer)->AllocateContainerId();
  auto b = (*writer)->AllocateContainerId();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*b, *a + 1);
  writer = Status::Aborted("closed");  // releases the VM
  auto third = (*again)->OpenVm("vm1", Repository::Access::kWrite);
  ASSERT_TRUE(third.ok()) << third.status().ToString();
  EXPECT_EQ(*(*third)->AllocateContainerId(), *b + 1);
  auto vms = (*again)->ListVms();
  ASSERT_TRUE(vms.ok());
  EXPECT_EQ(*vms, std::vector<std::string>{"vm1"});
}

// Busy names who holds the VM: a backup (the lock file's pid) or a reader
// such as serve (whose pid the lock file does not hold: it must not name
// the last writer, nor the caller itself).
TEST(RepositoryTest, BusyNamesAWriterOrAReader) {
  testing::ScratchDir dir;
  RepoConfig cfg;
  auto repo = Repository::Create(dir.Sub("repo"), cfg);
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  const std::string self = "process " + std::to_string(getpid());
  {
    auto writer = (*repo)->OpenVm("vm1", Repository::Access::kWrite);
    ASSERT_TRUE(writer.ok()) << writer.status().ToString();
    auto reader = (*repo)->OpenVm("vm1", Repository::Access::kRead);
    ASSERT_TRUE(reader.status().IsBusy()) << reader.status().ToString();
    EXPECT_NE(reader.status().message().find(self + " (a backup of it is running)"),
              std::string::npos)
        << reader.status().ToString();
  }
  auto reader = (*repo)->OpenVm("vm1", Repository::Access::kRead);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  for (auto access : {Repository::Access::kWrite, Repository::Access::kRead}) {
    auto other = (*repo)->OpenVm("vm1", access);
    ASSERT_TRUE(other.status().IsBusy()) << other.status().ToString();
    const std::string& m = other.status().message();
    EXPECT_NE(m.find("a serve, restore or check"), std::string::npos) << m;
    EXPECT_EQ(m.find("backup of it is running"), std::string::npos) << m;
    EXPECT_EQ(m.find(self), std::string::npos) << m;
  }
}

}  // namespace
}  // namespace vmdedup
