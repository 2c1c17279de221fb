// Unit tests of the metadata records (store/records.h) and the repository
// layer (store/repository.h): round trips, every corrupted or truncated byte
// detected, segment recipe versions 1 and 2 (block index), names and
// snapshot references validated, the repository configuration (format
// versions 1 and 2, frame size), the VM lock.
#include "store/records.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>

#include "base/crc32c.h"
#include "base/encoding.h"
#include "store/check.h"
#include "store/container.h"
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
  EXPECT_EQ(static_cast<uint8_t>(v[1]), 2u) << "a snapshot without a source format is version 2";
  SnapshotRecord d;
  ASSERT_TRUE(DecodeSnapshot(key, v, &d).ok());
  EXPECT_EQ(d.cds_version, s.cds_version);
  EXPECT_EQ(d.bitmap, s.bitmap);
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    SnapshotRecord r;
    return DecodeSnapshot(k, val, &r);
  });
}

// Version 3 appends the source format; a snapshot without one stays version
// 2 (repositories of format version 1, NBD and live sources), and versions
// 1 and 2 read with none.
TEST(RecordsTest, SnapshotVersion3CarriesTheSourceFormat) {
  SnapshotRecord s = SampleSnapshot();
  s.cds_version = 5;
  s.source_format = "qcow2";
  std::string key = SnapshotKey(s.disk, s.seq);
  std::string v = EncodeSnapshot(key, s);
  EXPECT_EQ(static_cast<uint8_t>(v[1]), 3u);
  SnapshotRecord d;
  ASSERT_TRUE(DecodeSnapshot(key, v, &d).ok());
  EXPECT_EQ(d.source_format, "qcow2");
  EXPECT_EQ(d.cds_version, 5u);
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    SnapshotRecord r;
    return DecodeSnapshot(k, val, &r);
  });
  s.source_format.clear();
  v = EncodeSnapshot(key, s);
  EXPECT_EQ(static_cast<uint8_t>(v[1]), 2u);
  d.source_format = "stale";
  ASSERT_TRUE(DecodeSnapshot(key, v, &d).ok());
  EXPECT_EQ(d.source_format, "");
  // A version 6 record is a newer vmdedup's.
  std::string newer = Reseal(key, 6, v.substr(0, v.size() - 4));
  EXPECT_EQ(DecodeSnapshot(key, newer, &d).code(), Status::Code::kNotSupported);
}

// Version 5 appends the tags (only when there are some), after the source
// format and the image length, which it always carries.
TEST(RecordsTest, SnapshotVersion5CarriesTags) {
  SnapshotRecord s = SampleSnapshot();
  s.tags = {"pre-upgrade", "monthly"};
  std::string key = SnapshotKey(s.disk, s.seq);
  std::string v = EncodeSnapshot(key, s);
  EXPECT_EQ(static_cast<uint8_t>(v[1]), 5u);
  SnapshotRecord d;
  ASSERT_TRUE(DecodeSnapshot(key, v, &d).ok());
  EXPECT_EQ(d.tags, s.tags);
  EXPECT_EQ(d.image_bytes, s.size);
  EXPECT_EQ(d.source_format, "");
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    SnapshotRecord r;
    return DecodeSnapshot(k, val, &r);
  });
  s.tags.clear();
  v = EncodeSnapshot(key, s);
  EXPECT_LT(static_cast<uint8_t>(v[1]), 5u);
  ASSERT_TRUE(DecodeSnapshot(key, v, &d).ok());
  EXPECT_TRUE(d.tags.empty());
}

// Version 4 appends the exact length of a raw image of odd length (only
// then); it reads back, must round up to the size, and older versions
// read as 0 (the size).
TEST(RecordsTest, SnapshotVersion4CarriesAnOddImageLength) {
  SnapshotRecord s = SampleSnapshot();
  s.size = 1000448;  // 1,000,001 bytes rounded up to a sector
  s.segment_count = 1;
  s.image_bytes = 1000001;
  std::string key = SnapshotKey(s.disk, s.seq);
  std::string v = EncodeSnapshot(key, s);
  EXPECT_EQ(static_cast<uint8_t>(v[1]), 4u);
  SnapshotRecord d;
  ASSERT_TRUE(DecodeSnapshot(key, v, &d).ok());
  EXPECT_EQ(d.image_bytes, 1000001u);
  EXPECT_EQ(d.source_format, "");
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    SnapshotRecord r;
    return DecodeSnapshot(k, val, &r);
  });
  // Equal to the size: not written (version 3 with a format, else 2).
  s.image_bytes = s.size;
  s.source_format = "raw";
  v = EncodeSnapshot(key, s);
  EXPECT_EQ(static_cast<uint8_t>(v[1]), 3u);
  ASSERT_TRUE(DecodeSnapshot(key, v, &d).ok());
  EXPECT_EQ(d.image_bytes, 0u);
  // A length that does not round up to the size is Corruption.
  for (uint64_t bad : {uint64_t{1000448 + 1}, uint64_t{1000448 - 512}}) {
    s.image_bytes = bad;
    v = EncodeSnapshot(key, s);
    EXPECT_TRUE(DecodeSnapshot(key, v, &d).IsCorruption()) << bad;
  }
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
  // A version 3 record without its source format is truncated; version 0
  // never existed.
  EXPECT_TRUE(DecodeSnapshot(key, Reseal(key, 3, v2.substr(0, v2.size() - 4)), &d).IsCorruption());
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

TEST(RecordsTest, QuarantineRoundTripAndDamage) {
  QuarantineRecord q;
  q.container = 0x2a;
  q.time = 1796000000;
  q.reason = "container vms/a/data/000000000000002a.ctr: checksum mismatch";
  const std::string key = QuarantineKey(q.container);
  EXPECT_EQ(key, "quarantine/000000000000002a");
  const std::string v = EncodeQuarantine(key, q);
  QuarantineRecord d;
  ASSERT_TRUE(DecodeQuarantine(key, v, &d).ok());
  EXPECT_EQ(d.container, q.container);
  EXPECT_EQ(d.time, q.time);
  EXPECT_EQ(d.reason, q.reason);
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    QuarantineRecord r;
    return DecodeQuarantine(k, val, &r);
  });
  // The record names the container its key names.
  q.container = 0x2b;
  EXPECT_TRUE(DecodeQuarantine(key, EncodeQuarantine(key, q), &d).IsCorruption());
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

// The value EncodeSegmentRecipe must write for `r` as record `version`,
// built from docs/format.md ("Metadata records"): type 4, the version, the
// body (version 2: a block index after each non-zero block's record
// length) and the masked crc32c of key, type, version and body.
std::string RecipeValueAsDocumented(const std::string& key, const SegmentRecipe& r,
                                    uint8_t version) {
  ByteWriter w;
  w.U8(4);
  w.U8(version);
  w.Varint(r.id);
  w.Varint(r.length);
  w.Varint(r.blocks.size());
  for (const BlockRef& b : r.blocks) {
    w.U8(static_cast<uint8_t>(b.kind));
    w.Varint(b.length);
    if (b.kind == BlockKind::kZero) continue;
    w.Bytes(b.fingerprint.bytes.data(), b.fingerprint.bytes.size());
    w.Varint(b.container);
    w.Varint(b.offset);
    w.Varint(b.record_len);
    if (version >= 2) w.Varint(b.index);
  }
  uint32_t crc = crc32c::Extend(0, key.data(), key.size());
  crc = crc32c::Extend(crc, w.buffer().data(), w.size());
  w.U32(crc32c::Mask(crc));
  return w.Take();
}

// A recipe whose blocks all lie in block records (index 0) is written as
// record version 1, which a vmdedup that predates frame records reads.
TEST(RecordsTest, RecipeWithoutFrameBlocksIsVersion1) {
  SegmentRecipe r = SampleRecipe();
  std::string key = SegmentRecipeKey(r.id);
  std::string v = EncodeSegmentRecipe(key, r);
  EXPECT_EQ(static_cast<uint8_t>(v[0]), 4u);  // segment recipe
  EXPECT_EQ(static_cast<uint8_t>(v[1]), 1u) << "no block index: record version 1";
  EXPECT_EQ(v, RecipeValueAsDocumented(key, r, 1));
  SegmentRecipe d;
  ASSERT_TRUE(DecodeSegmentRecipe(key, v, &d).ok());
  ASSERT_EQ(d.blocks.size(), 3u);
  for (size_t i = 0; i < 3; i++) {
    EXPECT_EQ(d.blocks[i].kind, r.blocks[i].kind) << i;
    EXPECT_EQ(d.blocks[i].length, r.blocks[i].length) << i;
    EXPECT_EQ(d.blocks[i].fingerprint, r.blocks[i].fingerprint) << i;
    EXPECT_EQ(d.blocks[i].container, r.blocks[i].container) << i;
    EXPECT_EQ(d.blocks[i].offset, r.blocks[i].offset) << i;
    EXPECT_EQ(d.blocks[i].record_len, r.blocks[i].record_len) << i;
    EXPECT_EQ(d.blocks[i].index, 0u) << i;
  }
  // A version 2 record whose indexes are all 0 (not what the writer makes,
  // but valid) reads the same.
  SegmentRecipe d2;
  ASSERT_TRUE(DecodeSegmentRecipe(key, RecipeValueAsDocumented(key, r, 2), &d2).ok());
  ASSERT_EQ(d2.blocks.size(), 3u);
  for (const BlockRef& b : d2.blocks) EXPECT_EQ(b.index, 0u);
  EXPECT_EQ(d2.blocks[2].offset, 123456u);
}

// A block inside a frame record makes the recipe version 2, which carries
// every non-zero block's index.
TEST(RecordsTest, RecipeWithFrameBlocksIsVersion2AndKeepsTheIndex) {
  SegmentRecipe r = SampleRecipe();
  r.blocks[1].index = 5;
  BlockRef last = r.blocks[1];
  last.offset = 70000;
  last.record_len = 16 + 36 * 256 + 500;
  last.index = kMaxFrameBlocks - 1;
  r.blocks.push_back(last);
  BlockRef first_of_frame = r.blocks[1];
  first_of_frame.index = 0;
  r.blocks.push_back(first_of_frame);
  r.length += 2 * 4096;
  std::string key = SegmentRecipeKey(r.id);
  std::string v = EncodeSegmentRecipe(key, r);
  EXPECT_EQ(static_cast<uint8_t>(v[1]), 2u) << "a block index: record version 2";
  EXPECT_EQ(v, RecipeValueAsDocumented(key, r, 2));
  SegmentRecipe d;
  ASSERT_TRUE(DecodeSegmentRecipe(key, v, &d).ok());
  ASSERT_EQ(d.blocks.size(), 5u);
  EXPECT_EQ(d.blocks[0].kind, BlockKind::kZero);
  EXPECT_EQ(d.blocks[1].index, 5u);
  EXPECT_EQ(d.blocks[1].offset, 32u);
  EXPECT_EQ(d.blocks[2].kind, BlockKind::kCds);
  EXPECT_EQ(d.blocks[2].index, 0u);
  EXPECT_EQ(d.blocks[3].index, kMaxFrameBlocks - 1);
  EXPECT_EQ(d.blocks[3].offset, 70000u);
  EXPECT_EQ(d.blocks[3].record_len, last.record_len);
  EXPECT_EQ(d.blocks[4].index, 0u);
  EXPECT_EQ(d.length, r.length);
  ExpectEveryDamageDetected(key, v, [](const std::string& k, const std::string& val) {
    SegmentRecipe x;
    return DecodeSegmentRecipe(k, val, &x);
  });
  // Version 3 is a newer vmdedup's.
  EXPECT_EQ(DecodeSegmentRecipe(key, Reseal(key, 3, v.substr(0, v.size() - 4)), &d).code(),
            Status::Code::kNotSupported);
}

TEST(RecordsTest, RecipeBlockIndexOutOfRangeIsCorruption) {
  for (uint32_t index : {kMaxFrameBlocks, kMaxFrameBlocks + 1, 1000u, 65535u, UINT32_MAX}) {
    SegmentRecipe r = SampleRecipe();
    r.blocks[1].index = index;  // the encoder does not check
    std::string key = SegmentRecipeKey(r.id);
    std::string v = EncodeSegmentRecipe(key, r);
    ASSERT_EQ(static_cast<uint8_t>(v[1]), 2u);
    SegmentRecipe d;
    Status st = DecodeSegmentRecipe(key, v, &d);
    EXPECT_TRUE(st.IsCorruption()) << index << ": " << st.ToString();
    EXPECT_NE(st.message().find(key), std::string::npos) << st.ToString();
  }
  // A CDS block is always a block record: index 0 (docs/format.md).
  for (uint32_t index : {1u, 255u}) {
    SegmentRecipe r = SampleRecipe();
    r.blocks[2].index = index;
    std::string key = SegmentRecipeKey(r.id);
    SegmentRecipe d;
    Status st = DecodeSegmentRecipe(key, EncodeSegmentRecipe(key, r), &d);
    EXPECT_TRUE(st.IsCorruption()) << "CDS block index " << index << ": " << st.ToString();
  }
  // The largest index that exists reads back.
  SegmentRecipe r = SampleRecipe();
  r.blocks[1].index = kMaxFrameBlocks - 1;
  std::string key = SegmentRecipeKey(r.id);
  SegmentRecipe d;
  ASSERT_TRUE(DecodeSegmentRecipe(key, EncodeSegmentRecipe(key, r), &d).ok());
  EXPECT_EQ(d.blocks[1].index, kMaxFrameBlocks - 1);
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
  // The lock file names its holder while it is held, and no one after.
  auto lock_file = [&] {
    std::ifstream lock(path + "/vms/vm1/lock");
    return std::string((std::istreambuf_iterator<char>(lock)), std::istreambuf_iterator<char>());
  };
  EXPECT_EQ(lock_file(), std::to_string(::getpid()) + "\n");
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
  EXPECT_EQ(lock_file(), "") << "the writer's pid stayed in the lock file after it let go";
  auto third = (*again)->OpenVm("vm1", Repository::Access::kWrite);
  ASSERT_TRUE(third.ok()) << third.status().ToString();
  EXPECT_EQ(*(*third)->AllocateContainerId(), *b + 1);
  // A run of ids is reserved with one write; the next id follows the run.
  auto run = (*third)->AllocateContainerIds(16);
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(*run, *b + 2);
  EXPECT_EQ(*(*third)->AllocateContainerId(), *run + 16);
  EXPECT_TRUE((*third)->AllocateContainerIds(0).status().IsInvalidArgument());
  third = Status::Aborted("closed");
  {
    // A writer that takes the lock file but finds the metadata held by a
    // check fails Busy, and leaves no pid behind in the lock file for a
    // later message to name as the holder.
    auto inspector = (*again)->OpenVm("vm1", Repository::Access::kInspect);
    ASSERT_TRUE(inspector.ok()) << inspector.status().ToString();
    auto blocked = (*repo)->OpenVm("vm1", Repository::Access::kWrite);
    ASSERT_TRUE(blocked.status().IsBusy()) << blocked.status().ToString();
    EXPECT_NE(blocked.status().message().find("inspects it"), std::string::npos)
        << blocked.status().ToString();
    EXPECT_EQ(lock_file(), "") << "the failed writer's pid stayed in the lock file";
  }
  {
    // A reader (a read view) neither waits for nor blocks a writer, sees
    // the VM as it was when it opened, and writes nothing.
    auto before = (*again)->OpenVm("vm1", Repository::Access::kRead);
    ASSERT_TRUE(before.ok()) << before.status().ToString();
    auto writer = (*repo)->OpenVm("vm1", Repository::Access::kWrite);
    ASSERT_TRUE(writer.ok()) << writer.status().ToString();
    auto during = (*again)->OpenVm("vm1", Repository::Access::kRead);
    ASSERT_TRUE(during.ok()) << during.status().ToString();
    const uint64_t next = *(*during)->GetCounter("container");
    auto more = (*writer)->AllocateContainerIds(16);
    ASSERT_TRUE(more.ok()) << more.status().ToString();
    EXPECT_EQ(*(*during)->GetCounter("container"), next);  // as of its opening
    auto after = (*again)->OpenVm("vm1", Repository::Access::kRead);
    ASSERT_TRUE(after.ok()) << after.status().ToString();
    EXPECT_EQ(*(*after)->GetCounter("container"), *more + 16);
    EXPECT_EQ((*during)->AllocateContainerId().status().code(), Status::Code::kNotSupported);
    // A check's open of it waits for no one either: it is Busy.
    EXPECT_TRUE((*again)->OpenVm("vm1", Repository::Access::kInspect).status().IsBusy());
  }
  auto vms = (*again)->ListVms();
  ASSERT_TRUE(vms.ok());
  EXPECT_EQ(*vms, std::vector<std::string>{"vm1"});
}

// The configuration file as docs/format.md describes it: "VMDDREPO", u32
// body length, the JSON body, u32 masked crc32c of all preceding bytes.
std::string ConfigFileBytes(const std::string& body) {
  ByteWriter w;
  w.Bytes("VMDDREPO", 8);
  w.U32(static_cast<uint32_t>(body.size()));
  w.Bytes(body.data(), body.size());
  w.U32(crc32c::Mask(crc32c::Value(w.buffer().data(), w.size())));
  return w.Take();
}

// A configuration body of `version`, with `frame_size` when given.
std::string ConfigBody(uint32_t version, std::optional<uint32_t> frame_size) {
  std::string body = "{\"format_version\": " + std::to_string(version) +
                     ", \"repo_id\": \"0123456789abcdef\", \"segment_size\": 1048576, "
                     "\"chunker\": \"cdc\", \"chunk_avg\": 8192, \"chunk_min\": 2048, "
                     "\"chunk_max\": 32768, \"compression_level\": 5, "
                     "\"container_capacity\": 16777216";
  if (frame_size) body += ", \"frame_size\": " + std::to_string(*frame_size);
  return body + "}\n";
}

// Writes `bytes` as the configuration of a new repository directory.
std::string WriteRepoConfig(const testing::ScratchDir& dir, const std::string& name,
                            const std::string& bytes) {
  std::string path = dir.Sub(name);
  std::filesystem::create_directories(path + "/vms");
  std::ofstream out(path + "/vmdedup-repo", std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

TEST(RepositoryTest, CreateWritesFormatVersion2AndTheFrameSize) {
  testing::ScratchDir dir;
  RepoConfig defaults;
  EXPECT_EQ(defaults.format_version, 2u);
  EXPECT_EQ(defaults.frame_size, 65536u);
  auto repo = Repository::Create(dir.Sub("repo"), defaults);
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  EXPECT_EQ((*repo)->config().format_version, 2u);
  EXPECT_EQ((*repo)->config().frame_size, 65536u);
  // The file itself, as documented.
  std::string file = testing::ReadFileBytes(dir.Sub("repo") + "/vmdedup-repo");
  ASSERT_GE(file.size(), 16u);
  EXPECT_EQ(file.substr(0, 8), "VMDDREPO");
  const auto* p = reinterpret_cast<const uint8_t*>(file.data());
  const uint32_t len = DecodeU32(p + 8);
  ASSERT_EQ(file.size(), 16u + len);
  EXPECT_EQ(DecodeU32(p + 12 + len), crc32c::Mask(crc32c::Value(p, 12 + len)));
  std::string body = file.substr(12, len);
  EXPECT_NE(body.find("\"format_version\": 2"), std::string::npos) << body;
  EXPECT_NE(body.find("\"frame_size\": 65536"), std::string::npos) << body;
  auto opened = Repository::Open(dir.Sub("repo"));
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  EXPECT_EQ((*opened)->config().format_version, 2u);
  EXPECT_EQ((*opened)->config().frame_size, 65536u);

  // A chosen frame size round-trips; Create always writes the current
  // format version.
  int n = 0;
  for (uint32_t frame_size : {0u, 4096u, 8192u, 1u << 20}) {
    for (uint32_t version : {1u, 2u}) {
      RepoConfig cfg;
      cfg.frame_size = frame_size;
      cfg.format_version = version;
      std::string path = dir.Sub("r" + std::to_string(n++));
      auto created = Repository::Create(path, cfg);
      ASSERT_TRUE(created.ok()) << frame_size << ": " << created.status().ToString();
      EXPECT_EQ((*created)->config().frame_size, frame_size);
      EXPECT_EQ((*created)->config().format_version, 2u);
      auto back = Repository::Open(path);
      ASSERT_TRUE(back.ok()) << frame_size << ": " << back.status().ToString();
      EXPECT_EQ((*back)->config().frame_size, frame_size);
      EXPECT_EQ((*back)->config().format_version, 2u);
    }
  }
}

TEST(RepositoryTest, FrameSizeOutOfRangeIsRefused) {
  testing::ScratchDir dir;
  RepoConfig cfg;
  for (uint32_t ok_size : {0u, 4096u, 65536u, 1u << 20}) {
    cfg.frame_size = ok_size;
    EXPECT_TRUE(ValidateRepoConfig(cfg).ok()) << ok_size;
  }
  int n = 0;
  for (uint32_t bad_size : {1u, 1000u, 4095u, (1u << 20) + 1, 2u << 20, UINT32_MAX}) {
    cfg.frame_size = bad_size;
    EXPECT_TRUE(ValidateRepoConfig(cfg).IsInvalidArgument()) << bad_size;
    std::string path = dir.Sub("bad" + std::to_string(n++));
    Status st = Repository::Create(path, cfg).status();
    EXPECT_TRUE(st.IsInvalidArgument()) << bad_size << ": " << st.ToString();
    EXPECT_FALSE(std::filesystem::exists(path + "/vmdedup-repo")) << bad_size;
  }
  // A format version 1 repository has no frames.
  cfg.format_version = 1;
  cfg.frame_size = 4096;
  EXPECT_TRUE(ValidateRepoConfig(cfg).IsInvalidArgument());
  cfg.frame_size = 0;
  EXPECT_TRUE(ValidateRepoConfig(cfg).ok());
}

TEST(RepositoryTest, BadChunkerIsRefused) {
  testing::ScratchDir dir;
  RepoConfig cfg;
  ASSERT_TRUE(ValidateRepoConfig(cfg).ok());
  cfg.chunker = {ChunkerKind::kCdc, 4096, 8192, 16384};  // min > avg
  Status st = ValidateRepoConfig(cfg);
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_NE(st.message().find("min_size <= avg_size <= max_size"), std::string::npos)
      << st.ToString();
  st = Repository::Create(dir.Sub("created"), cfg).status();
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_FALSE(std::filesystem::exists(dir.Sub("created") + "/vmdedup-repo"));
  cfg.chunker = {static_cast<ChunkerKind>(7), 4096, 1024, 16384};
  EXPECT_TRUE(ValidateRepoConfig(cfg).IsInvalidArgument());
  cfg.chunker = {ChunkerKind::kFixed, 3000, 0, 0};  // not a power of two
  EXPECT_TRUE(ValidateRepoConfig(cfg).IsInvalidArgument());

  // Opening a configuration whose chunker is invalid fails the same way.
  std::string body = ConfigBody(2, 65536);
  const std::string min = "\"chunk_min\": 2048";
  ASSERT_NE(body.find(min), std::string::npos);
  body.replace(body.find(min), min.size(), "\"chunk_min\": 16384");
  std::string path = WriteRepoConfig(dir, "opened", ConfigFileBytes(body));
  st = Repository::Open(path).status();
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
}

TEST(RepositoryTest, ConfigurationVersions) {
  testing::ScratchDir dir;
  // Version 1, made before frame records: no frame_size, reads as 0.
  std::string v1 = WriteRepoConfig(dir, "v1", ConfigFileBytes(ConfigBody(1, std::nullopt)));
  auto repo = Repository::Open(v1);
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  const RepoConfig& c = (*repo)->config();
  EXPECT_EQ(c.format_version, 1u);
  EXPECT_EQ(c.frame_size, 0u);
  EXPECT_EQ(c.repo_id, "0123456789abcdef");
  EXPECT_EQ(c.segment_size, 1u << 20);
  EXPECT_EQ(c.chunker.kind, ChunkerKind::kCdc);
  EXPECT_EQ(c.chunker.avg_size, 8192u);
  EXPECT_EQ(c.chunker.min_size, 2048u);
  EXPECT_EQ(c.chunker.max_size, 32768u);
  EXPECT_EQ(c.compression_level, 5);
  EXPECT_EQ(c.container_capacity, 16u << 20);
  // Opening does not rewrite it.
  EXPECT_EQ(testing::ReadFileBytes(v1 + "/vmdedup-repo"),
            ConfigFileBytes(ConfigBody(1, std::nullopt)));

  // Version 2 with a frame size (the hand-written file is right).
  std::string v2 = WriteRepoConfig(dir, "v2", ConfigFileBytes(ConfigBody(2, 8192)));
  repo = Repository::Open(v2);
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  EXPECT_EQ((*repo)->config().format_version, 2u);
  EXPECT_EQ((*repo)->config().frame_size, 8192u);
  std::string v2zero = WriteRepoConfig(dir, "v2zero", ConfigFileBytes(ConfigBody(2, 0)));
  repo = Repository::Open(v2zero);
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  EXPECT_EQ((*repo)->config().frame_size, 0u);

  // A newer vmdedup's repository.
  for (uint32_t version : {3u, 4u, 1000u}) {
    std::string path = WriteRepoConfig(dir, "v" + std::to_string(version),
                                       ConfigFileBytes(ConfigBody(version, 65536)));
    Status st = Repository::Open(path).status();
    EXPECT_EQ(st.code(), Status::Code::kNotSupported) << version << ": " << st.ToString();
  }
  std::string v0 = WriteRepoConfig(dir, "v0", ConfigFileBytes(ConfigBody(0, std::nullopt)));
  EXPECT_FALSE(Repository::Open(v0).ok());

  // Version 2 without frame_size is damaged.
  std::string missing =
      WriteRepoConfig(dir, "missing", ConfigFileBytes(ConfigBody(2, std::nullopt)));
  Status st = Repository::Open(missing).status();
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  // Version 2 with a frame size out of range is refused.
  for (uint32_t bad : {1000u, 2u << 20}) {
    std::string path =
        WriteRepoConfig(dir, "bad" + std::to_string(bad), ConfigFileBytes(ConfigBody(2, bad)));
    EXPECT_FALSE(Repository::Open(path).ok()) << bad;
  }
  // Every byte of the configuration is checked.
  std::string good = ConfigFileBytes(ConfigBody(1, std::nullopt));
  for (size_t i = 0; i < good.size(); i += 7) {
    std::string bad = good;
    bad[i] = static_cast<char>(bad[i] ^ 0x20);
    std::string path = WriteRepoConfig(dir, "flip", bad);
    EXPECT_TRUE(Repository::Open(path).status().IsCorruption()) << "byte " << i;
  }
}

// Busy names who holds the VM: a backup (the lock file's pid) or a reader
// such as serve (whose pid the lock file does not hold: it must not name
// the last writer, nor the caller itself).
// A first backup cut off before its metadata store existed leaves a VM
// directory without one: not a VM to list, a leftover to check when it has
// no containers, damage when it has.
TEST(RepositoryTest, AVmDirectoryWithoutAMetadataStoreIsALeftoverOrDamage) {
  testing::ScratchDir dir;
  std::string path = dir.Sub("repo");
  auto repo = Repository::Create(path, RepoConfig{});
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  ASSERT_TRUE((*repo)->OpenVm("real", Repository::Access::kWrite).ok());
  std::filesystem::create_directories(path + "/vms/ghost/meta");
  auto vms = (*repo)->ListVms();
  ASSERT_TRUE(vms.ok());
  EXPECT_EQ(*vms, std::vector<std::string>{"real"});
  auto dirs = (*repo)->ListVmDirectories();
  ASSERT_TRUE(dirs.ok());
  EXPECT_EQ(*dirs, (std::vector<std::string>{"ghost", "real"}));

  auto report = CheckRepository(**repo, CheckOptions{});
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  EXPECT_TRUE(report->ok());
  ASSERT_EQ(report->findings.size(), 1u);
  EXPECT_EQ(report->findings[0].kind, CheckFinding::Kind::kReclaimable);
  EXPECT_EQ(report->findings[0].vm, "ghost");

  const std::string data = "not really a container";
  ASSERT_TRUE((*repo)
                  ->objects()
                  ->Put("vms/ghost/data/0000000000000001.ctr",
                        {reinterpret_cast<const uint8_t*>(data.data()), data.size()})
                  .ok());
  report = CheckRepository(**repo, CheckOptions{});
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  EXPECT_FALSE(report->ok());
  bool damage = false;
  for (const auto& f : report->findings)
    if (f.kind == CheckFinding::Kind::kError && f.vm == "ghost" &&
        f.message.find("no metadata store") != std::string::npos)
      damage = true;
  EXPECT_TRUE(damage) << "a VM with containers and no metadata must be reported as damaged";
}

TEST(RepositoryTest, BusyNamesAWriterOrACheck) {
  testing::ScratchDir dir;
  RepoConfig cfg;
  auto repo = Repository::Create(dir.Sub("repo"), cfg);
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  const std::string self = "process " + std::to_string(getpid());
  {
    auto writer = (*repo)->OpenVm("vm1", Repository::Access::kWrite);
    ASSERT_TRUE(writer.ok()) << writer.status().ToString();
    auto inspector = (*repo)->OpenVm("vm1", Repository::Access::kInspect);
    ASSERT_TRUE(inspector.status().IsBusy()) << inspector.status().ToString();
    EXPECT_NE(inspector.status().message().find(self + " (a backup of it is running)"),
              std::string::npos)
        << inspector.status().ToString();
  }
  auto inspector = (*repo)->OpenVm("vm1", Repository::Access::kInspect);
  ASSERT_TRUE(inspector.ok()) << inspector.status().ToString();
  for (auto access : {Repository::Access::kWrite, Repository::Access::kInspect}) {
    auto other = (*repo)->OpenVm("vm1", access);
    ASSERT_TRUE(other.status().IsBusy()) << other.status().ToString();
    const std::string& m = other.status().message();
    EXPECT_NE(m.find("a check"), std::string::npos) << m;
    EXPECT_EQ(m.find("backup of it is running"), std::string::npos) << m;
    EXPECT_EQ(m.find(self), std::string::npos) << m;
  }
  // Readers are never Busy.
  EXPECT_TRUE((*repo)->OpenVm("vm1", Repository::Access::kRead).ok());
}

}  // namespace
}  // namespace vmdedup
