// Tests of containers and block compression: round trips, capacity, and that
// malformed bytes of every kind (each single-byte change, each truncation,
// random garbage, well-checksummed but inconsistent records) give Corruption
// and never wrong data or a crash.

#include <gtest/gtest.h>
#include <zstd.h>

#include <random>
#include <thread>

#include "base/crc32c.h"
#include "base/encoding.h"
#include "base/fingerprint.h"
#include "store/compression.h"
#include "store/container.h"
#include "tests/test_util.h"

namespace vmdedup {
namespace {

using testing::RandomBytes;

std::span<const uint8_t> Bytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

Fingerprint Fp(std::string_view plaintext) { return Sha256(Bytes(plaintext)); }

struct Block {
  std::string plaintext;
  BlockRecordInfo info;
};

// A small container: a compressible block (zstd), an incompressible one
// (stored), an empty one, and another compressible one.
struct SmallContainer {
  std::vector<Block> blocks;
  std::string bytes;
  uint64_t id = 42;
};

SmallContainer MakeSmallContainer() {
  SmallContainer c;
  Compressor compressor(3);
  ContainerWriter w(c.id, 1 << 20);
  for (std::string plain : {std::string(300, 'a') + "tail", RandomBytes(90, 7), std::string(),
                            std::string(120, '\0') + "x"}) {
    std::string payload;
    Compression comp = compressor.Compress(Bytes(plain), &payload);
    EXPECT_TRUE(w.Fits(payload.size()));
    Block b{plain, w.Append(Fp(plain), static_cast<uint32_t>(plain.size()), comp, Bytes(payload))};
    c.blocks.push_back(std::move(b));
  }
  EXPECT_EQ(c.blocks[0].info.compression, Compression::kZstd);
  EXPECT_EQ(c.blocks[1].info.compression, Compression::kNone);
  EXPECT_EQ(c.blocks[2].info.compression, Compression::kNone);
  EXPECT_EQ(c.blocks[3].info.compression, Compression::kZstd);
  c.bytes = w.Finish();
  return c;
}

// Walks `container` and, on success, decodes every record against the
// fingerprint the writer gave it.
Status ReadAll(std::string_view container, uint64_t id, std::vector<std::string>* plaintexts) {
  plaintexts->clear();
  return ForEachBlockRecord(
      container, id, "container t", [&](const BlockRecordInfo& info, std::string_view record) {
        std::string plain;
        RETURN_IF_ERROR(DecodeBlockRecord(record, &info.fingerprint, &plain, "container t"));
        plaintexts->push_back(std::move(plain));
        return Status::OK();
      });
}

TEST(ContainerTest, RoundTripBothCompressions) {
  SmallContainer c = MakeSmallContainer();
  std::vector<BlockRecordInfo> infos;
  std::vector<std::string> plains;
  Status st = ForEachBlockRecord(
      c.bytes, c.id, "container t", [&](const BlockRecordInfo& info, std::string_view record) {
        infos.push_back(info);
        EXPECT_EQ(record.size(), info.record_len);
        std::string plain;
        Status d = DecodeBlockRecord(record, &info.fingerprint, &plain, "container t");
        EXPECT_TRUE(d.ok()) << d.ToString();
        plains.push_back(plain);
        return Status::OK();
      });
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(infos.size(), c.blocks.size());
  for (size_t i = 0; i < infos.size(); i++) {
    const BlockRecordInfo& want = c.blocks[i].info;
    EXPECT_EQ(infos[i].offset, want.offset);
    EXPECT_EQ(infos[i].record_len, want.record_len);
    EXPECT_EQ(infos[i].raw_len, want.raw_len);
    EXPECT_EQ(infos[i].compression, want.compression);
    EXPECT_EQ(infos[i].fingerprint, want.fingerprint);
    EXPECT_EQ(plains[i], c.blocks[i].plaintext);
    // A restore reads one record by (offset, length) without the rest.
    std::string_view record = std::string_view(c.bytes).substr(want.offset, want.record_len);
    std::string plain;
    ASSERT_TRUE(DecodeBlockRecord(record, &want.fingerprint, &plain, "container t").ok());
    EXPECT_EQ(plain, c.blocks[i].plaintext);
    ASSERT_TRUE(DecodeBlockRecord(record, nullptr, &plain, "container t").ok());
    EXPECT_EQ(plain, c.blocks[i].plaintext);
    RecordView view;
    ASSERT_TRUE(RecordView::Parse(record, "t", &view).ok());
    BlockRecordInfo parsed = view.info(want.offset);
    EXPECT_EQ(parsed.block_count, 1u);
    EXPECT_EQ(parsed.record_len, want.record_len);
    EXPECT_EQ(parsed.raw_len, want.raw_len);
    EXPECT_EQ(parsed.fingerprint, want.fingerprint);
  }
  // Records are back to back after the header.
  EXPECT_EQ(c.blocks[0].info.offset, kContainerHeaderSize);
  EXPECT_EQ(c.blocks[1].info.offset, c.blocks[0].info.offset + c.blocks[0].info.record_len);
  size_t records_end = c.blocks.back().info.offset + c.blocks.back().info.record_len;
  EXPECT_EQ(c.bytes.size(), records_end + kContainerTrailerSize);
}

TEST(ContainerTest, ByteLayoutIsAsDocumented) {
  SmallContainer c = MakeSmallContainer();
  const auto* p = reinterpret_cast<const uint8_t*>(c.bytes.data());
  EXPECT_EQ(c.bytes.substr(0, 8), "VMDDCTR1");
  EXPECT_EQ(DecodeU32(p + 8), 1u);  // block records only: version 1
  EXPECT_EQ(DecodeU32(p + 12), 0u);
  EXPECT_EQ(DecodeU64(p + 16), c.id);
  EXPECT_EQ(DecodeU32(p + 24), 0u);
  EXPECT_EQ(DecodeU32(p + 28), crc32c::Mask(crc32c::Value(p, 28)));

  const BlockRecordInfo& b = c.blocks[1].info;  // stored
  const uint8_t* r = p + b.offset;
  EXPECT_EQ(r[0], 0);
  EXPECT_EQ(r[1] | r[2] | r[3], 0);
  EXPECT_EQ(DecodeU32(r + 4), 90u);
  EXPECT_EQ(DecodeU32(r + 8), 90u);
  EXPECT_EQ(0, std::memcmp(r + 12, b.fingerprint.bytes.data(), 32));
  uint32_t crc = crc32c::Extend(crc32c::Value(r, 44), r + 48, 90);
  EXPECT_EQ(DecodeU32(r + 44), crc32c::Mask(crc));
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(r + 48), 90), c.blocks[1].plaintext);
  EXPECT_EQ(p[c.blocks[0].info.offset], 1);  // zstd

  const uint8_t* t = p + c.bytes.size() - kContainerTrailerSize;
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(t), 8), "VMDDEND1");
  EXPECT_EQ(DecodeU32(t + 8), 4u);
  EXPECT_EQ(DecodeU32(t + 12), 0u);
  EXPECT_EQ(DecodeU64(t + 16), c.bytes.size() - kContainerTrailerSize);
  EXPECT_EQ(DecodeU32(t + 24), 0u);
  EXPECT_EQ(DecodeU32(t + 28), crc32c::Mask(crc32c::Value(t, 28)));
}

TEST(ContainerTest, EmptyContainerAndReuse) {
  ContainerWriter w(7, 4096);
  EXPECT_TRUE(w.empty());
  std::string empty = w.Finish();
  EXPECT_EQ(empty.size(), kContainerHeaderSize + kContainerTrailerSize);
  int calls = 0;
  ASSERT_TRUE(ForEachBlockRecord(empty, 7, "c", [&](const BlockRecordInfo&, std::string_view) {
                calls++;
                return Status::OK();
              }).ok());
  EXPECT_EQ(calls, 0);

  // Finish leaves the writer ready for the next id.
  EXPECT_EQ(w.id(), 8u);
  EXPECT_TRUE(w.empty());
  std::string data = "hello";
  w.Append(Fp(data), 5, Compression::kNone, Bytes(data));
  EXPECT_EQ(w.block_count(), 1u);
  std::string c8 = w.Finish();
  std::vector<std::string> plains;
  ASSERT_TRUE(ReadAll(c8, 8, &plains).ok());
  EXPECT_EQ(plains, std::vector<std::string>{"hello"});
  w.Reset(100);
  EXPECT_EQ(w.id(), 100u);
  EXPECT_EQ(w.size(), kContainerHeaderSize);
  ASSERT_TRUE(ReadAll(w.Finish(), 100, &plains).ok());
  EXPECT_TRUE(plains.empty());

  // Reset into a recycled buffer: its old bytes are gone, its allocation is
  // kept when it holds the writer's capacity, and the container is the one a
  // fresh writer makes.
  c8.reserve(4096);
  const char* storage = c8.data();
  w.Reset(8, std::move(c8));
  w.Append(Fp(data), 5, Compression::kNone, Bytes(data));
  std::string again = w.Finish();
  EXPECT_EQ(again.data(), storage);
  ContainerWriter fresh(8, 4096);
  fresh.Append(Fp(data), 5, Compression::kNone, Bytes(data));
  EXPECT_EQ(again, fresh.Finish());
}

TEST(ContainerTest, WrongIdIsCorruption) {
  SmallContainer c = MakeSmallContainer();
  std::vector<std::string> plains;
  Status st = ReadAll(c.bytes, c.id + 1, &plains);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("container t"), std::string::npos);
  EXPECT_TRUE(plains.empty());
}

TEST(ContainerTest, FitsRespectsCapacityIncludingTrailer) {
  const size_t overhead = kContainerHeaderSize + kBlockRecordHeaderSize + kContainerTrailerSize;
  ContainerWriter w(1, 1000);
  EXPECT_TRUE(w.Fits(1000 - overhead));
  EXPECT_FALSE(w.Fits(1000 - overhead + 1));
  std::string p(500, 'x');
  w.Append(Fp(p), 500, Compression::kNone, Bytes(p));
  EXPECT_TRUE(w.Fits(1000 - overhead - 500 - kBlockRecordHeaderSize));
  EXPECT_FALSE(w.Fits(1000 - overhead - 500 - kBlockRecordHeaderSize + 1));
  std::string q(1000 - overhead - 500 - kBlockRecordHeaderSize, 'y');
  w.Append(Fp(q), static_cast<uint32_t>(q.size()), Compression::kNone, Bytes(q));
  EXPECT_FALSE(w.Fits(0));
  EXPECT_EQ(w.Finish().size(), 1000u);

  ContainerWriter tiny(1, 50);  // smaller than header + trailer + one header
  EXPECT_FALSE(tiny.Fits(0));
  ContainerWriter big(1, SIZE_MAX);  // clamped to kMaxContainerSize
  EXPECT_TRUE(big.Fits(kMaxBlockSize));
  EXPECT_FALSE(big.Fits(kMaxBlockSize + 1));
}

TEST(ContainerTest, FullSizeContainerStaysWithinMaximum) {
  ContainerWriter w(3, SIZE_MAX);
  std::string block = RandomBytes(kMaxBlockSize, 9);
  Fingerprint fp = Fp(block);
  while (w.Fits(block.size())) {
    w.Append(fp, kMaxBlockSize, Compression::kNone, Bytes(block));
  }
  EXPECT_EQ(w.block_count(), (kMaxContainerSize - 64) / (kMaxBlockSize + 48));
  std::string bytes = w.Finish();
  EXPECT_LE(bytes.size(), kMaxContainerSize);
  uint32_t n = 0;
  ASSERT_TRUE(ForEachBlockRecord(bytes, 3, "c", [&](const BlockRecordInfo& info, std::string_view) {
                EXPECT_EQ(info.raw_len, kMaxBlockSize);
                n++;
                return Status::OK();
              }).ok());
  EXPECT_EQ(n, 63u);
  // One byte more than the maximum is refused.
  bytes.insert(kContainerHeaderSize, std::string(kMaxContainerSize + 1 - bytes.size(), '\0'));
  EXPECT_TRUE(
      ForEachBlockRecord(bytes, 3, "c", [](auto&, auto) { return Status::OK(); }).IsCorruption());
}

TEST(ContainerTest, CallbackStatusStopsTheWalk) {
  SmallContainer c = MakeSmallContainer();
  int calls = 0;
  Status st = ForEachBlockRecord(c.bytes, c.id, "c", [&](const BlockRecordInfo&, std::string_view) {
    return ++calls == 2 ? Status::Aborted("enough") : Status::OK();
  });
  EXPECT_TRUE(st.IsAborted());
  EXPECT_EQ(calls, 2);
}

// Every byte of a container is under a checksum: changing any one byte, in
// any way, is Corruption from ForEachBlockRecord.
TEST(ContainerTest, EverySingleByteChangeIsCorruption) {
  SmallContainer c = MakeSmallContainer();
  for (size_t i = 0; i < c.bytes.size(); i++) {
    for (uint8_t x : {0x01, 0x80, 0xff, 0x5a}) {
      std::string bad = c.bytes;
      bad[i] = static_cast<char>(bad[i] ^ x);
      std::vector<std::string> plains;
      Status st = ReadAll(bad, c.id, &plains);
      ASSERT_TRUE(st.IsCorruption()) << "byte " << i << " ^ " << int(x) << ": " << st.ToString();
      ASSERT_NE(st.message().find("container t"), std::string::npos) << st.ToString();
      // What was delivered before the error was right.
      for (size_t k = 0; k < plains.size(); k++) ASSERT_EQ(plains[k], c.blocks[k].plaintext);
    }
  }
}

TEST(ContainerTest, EveryTruncationAndExtensionIsCorruption) {
  SmallContainer c = MakeSmallContainer();
  for (size_t len = 0; len < c.bytes.size(); len++) {
    int calls = 0;
    Status st = ForEachBlockRecord(std::string_view(c.bytes).substr(0, len), c.id, "container t",
                                   [&](const BlockRecordInfo&, std::string_view) {
                                     calls++;
                                     return Status::OK();
                                   });
    ASSERT_TRUE(st.IsCorruption()) << "length " << len << ": " << st.ToString();
    ASSERT_EQ(calls, 0) << "length " << len;  // detected before any record
  }
  for (std::string extra : {std::string(1, '\0'), std::string(32, '\0'), std::string("junk")}) {
    std::vector<std::string> plains;
    EXPECT_TRUE(ReadAll(c.bytes + extra, c.id, &plains).IsCorruption());
  }
  // The trailer of an earlier state of the same container cannot pass.
  SmallContainer d = MakeSmallContainer();
  std::string two = c.bytes + d.bytes.substr(kContainerHeaderSize);
  std::vector<std::string> plains;
  EXPECT_TRUE(ReadAll(two, c.id, &plains).IsCorruption());
}

TEST(ContainerTest, EveryChangeAndTruncationOfARecordIsCorruption) {
  SmallContainer c = MakeSmallContainer();
  for (const Block& b : c.blocks) {
    std::string record = c.bytes.substr(b.info.offset, b.info.record_len);
    std::string plain;
    for (size_t i = 0; i < record.size(); i++) {
      for (uint8_t x : {0x01, 0x80, 0xff}) {
        std::string bad = record;
        bad[i] = static_cast<char>(bad[i] ^ x);
        ASSERT_TRUE(DecodeBlockRecord(bad, &b.info.fingerprint, &plain, "t").IsCorruption())
            << "offset " << b.info.offset << " byte " << i;
        ASSERT_TRUE(DecodeBlockRecord(bad, nullptr, &plain, "t").IsCorruption());
      }
    }
    for (size_t len = 0; len < record.size(); len++) {
      ASSERT_TRUE(DecodeBlockRecord(record.substr(0, len), nullptr, &plain, "t").IsCorruption())
          << len;
    }
    // Read with a length too long (the next record's bytes appended).
    EXPECT_TRUE(DecodeBlockRecord(record + "x", nullptr, &plain, "t").IsCorruption());
  }
}

// RecordView::DecodePrefix (a reader decoding straight into its output):
// the same bytes as DecodeBlockRecord, never a byte past the output, a
// refusal for an output longer than the block, Corruption for a damaged
// record.
TEST(ContainerTest, DecodeIntoTheOutputMatchesDecodeAndStaysInside) {
  SmallContainer c = MakeSmallContainer();
  for (const Block& b : c.blocks) {
    std::string record = c.bytes.substr(b.info.offset, b.info.record_len);
    std::vector<uint8_t> out(b.plaintext.size() + 1, 0xee);
    std::span<uint8_t> exact(out.data(), b.plaintext.size());
    RecordView view;
    ASSERT_TRUE(RecordView::Parse(record, "t", &view).ok());
    ASSERT_TRUE(view.DecodePrefix(exact, "t").ok());
    EXPECT_EQ(std::string(out.begin(), out.end() - 1), b.plaintext);
    EXPECT_EQ(out.back(), 0xee) << "wrote past the output";
    Status longer = view.DecodePrefix(out, "container t");
    EXPECT_FALSE(longer.ok());
    EXPECT_NE(longer.message().find("container t"), std::string::npos);
    for (size_t i = 0; i < record.size(); i++) {
      std::string bad = record;
      bad[i] = static_cast<char>(bad[i] ^ 0x10);
      RecordView damaged;
      ASSERT_TRUE(RecordView::Parse(bad, "t", &damaged).IsCorruption()) << "byte " << i;
    }
  }
}

TEST(ContainerTest, WrongExpectedFingerprintIsCorruption) {
  SmallContainer c = MakeSmallContainer();
  const Block& b = c.blocks[0];
  std::string record = c.bytes.substr(b.info.offset, b.info.record_len);
  Fingerprint other = c.blocks[1].info.fingerprint;
  std::string plain;
  Status st = DecodeBlockRecord(record, &other, &plain, "container t @32");
  EXPECT_TRUE(st.IsCorruption());
  EXPECT_NE(st.message().find("container t @32"), std::string::npos);
  EXPECT_NE(st.message().find(other.Hex()), std::string::npos);
}

// Records a buggy or hostile writer could produce with a valid checksum:
// the fields themselves must be checked.
TEST(ContainerTest, ChecksummedButInconsistentRecordsAreCorruption) {
  std::string plain = std::string(1000, 'q');
  std::string zpayload;
  Compressor compressor(1);
  ASSERT_EQ(compressor.Compress(Bytes(plain), &zpayload), Compression::kZstd);
  Fingerprint fp = Fp(plain);

  auto decode_single = [&](uint32_t raw_len, Compression comp, std::string_view payload) {
    ContainerWriter w(1, 1 << 20);
    w.Append(fp, raw_len, comp, Bytes(payload));
    std::string bytes = w.Finish();
    std::string out;
    return DecodeBlockRecord(
        std::string_view(bytes).substr(kContainerHeaderSize, bytes.size() - 64), &fp, &out, "t");
  };
  ASSERT_TRUE(decode_single(1000, Compression::kZstd, zpayload).ok());
  EXPECT_TRUE(decode_single(999, Compression::kZstd, zpayload).IsCorruption());
  EXPECT_TRUE(decode_single(1001, Compression::kZstd, zpayload).IsCorruption());
  EXPECT_TRUE(decode_single(1000, Compression::kZstd, zpayload.substr(0, zpayload.size() - 1))
                  .IsCorruption());
  EXPECT_TRUE(decode_single(1000, Compression::kZstd, zpayload + "trailing").IsCorruption());
  EXPECT_TRUE(decode_single(1000, Compression::kZstd, zpayload + zpayload).IsCorruption());
  EXPECT_TRUE(decode_single(1000, Compression::kZstd, RandomBytes(50, 3)).IsCorruption());
  EXPECT_TRUE(decode_single(0, Compression::kZstd, "").IsCorruption());

  // Field-level problems with the checksum recomputed over them.
  auto patched = [&](size_t at, uint32_t value, bool u8) {
    ContainerWriter w(1, 1 << 20);
    w.Append(fp, 1000, Compression::kZstd, Bytes(zpayload));
    std::string bytes = w.Finish();
    std::string record = bytes.substr(kContainerHeaderSize, bytes.size() - 64);
    auto* r = reinterpret_cast<uint8_t*>(record.data());
    if (u8) {
      r[at] = static_cast<uint8_t>(value);
    } else {
      EncodeU32(r + at, value);
    }
    uint32_t crc = crc32c::Extend(crc32c::Value(r, 44), r + 48, record.size() - 48);
    EncodeU32(r + 44, crc32c::Mask(crc));
    std::string out;
    Status st = DecodeBlockRecord(record, &fp, &out, "t");
    // Same record inside a container, for ForEachBlockRecord.
    std::string container = bytes.substr(0, kContainerHeaderSize) + record +
                            bytes.substr(bytes.size() - kContainerTrailerSize);
    Status walk = ForEachBlockRecord(container, 1, "t", [](auto&, auto) { return Status::OK(); });
    return std::make_pair(st, walk);
  };
  for (auto [at, value, u8] : std::vector<std::tuple<size_t, uint32_t, bool>>{
           {0, 2, true},                   // unknown compression
           {0, 255, true},                 // unknown compression
           {1, 1, true},                   // reserved
           {3, 1, true},                   // reserved
           {4, kMaxBlockSize + 1, false},  // raw_len too large
           {4, UINT32_MAX, false}}) {
    auto [st, walk] = patched(at, value, u8);
    EXPECT_TRUE(st.IsCorruption()) << at << " " << value << ": " << st.ToString();
    EXPECT_TRUE(walk.IsCorruption()) << at << " " << value << ": " << walk.ToString();
  }
  // Uncompressed with payload_len != raw_len.
  auto [st, walk] = patched(0, 0, true);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_TRUE(walk.IsCorruption()) << walk.ToString();
}

TEST(ContainerTest, HeaderAndTrailerFieldsAreChecked) {
  SmallContainer c = MakeSmallContainer();
  auto patch = [&](size_t base, size_t at, uint64_t value, int width) {
    std::string bad = c.bytes;
    auto* p = reinterpret_cast<uint8_t*>(bad.data()) + base;
    if (width == 4) EncodeU32(p + at, static_cast<uint32_t>(value));
    if (width == 8) EncodeU64(p + at, value);
    EncodeU32(p + 28, crc32c::Mask(crc32c::Value(p, 28)));
    std::vector<std::string> plains;
    return ReadAll(bad, c.id, &plains);
  };
  const size_t t = c.bytes.size() - kContainerTrailerSize;
  EXPECT_TRUE(patch(0, 8, 3, 4).IsCorruption());              // version
  EXPECT_TRUE(patch(0, 8, 0, 4).IsCorruption());              // version
  EXPECT_TRUE(patch(0, 12, 1, 4).IsCorruption());             // flags
  EXPECT_TRUE(patch(0, 16, c.id + 1, 8).IsCorruption());      // id
  EXPECT_TRUE(patch(0, 24, 1, 4).IsCorruption());             // reserved
  EXPECT_TRUE(patch(t, 8, 3, 4).IsCorruption());              // count too small
  EXPECT_TRUE(patch(t, 8, 5, 4).IsCorruption());              // count too large
  EXPECT_TRUE(patch(t, 12, 1, 4).IsCorruption());             // reserved
  EXPECT_TRUE(patch(t, 16, t - 1, 8).IsCorruption());         // offset
  EXPECT_TRUE(patch(t, 24, 1, 4).IsCorruption());             // reserved
  EXPECT_TRUE(patch(0, 8, kContainerFormatVersion, 4).ok());  // control: unchanged
}

// Bounded fuzzing: random garbage, random garbage behind a valid header,
// multi-byte damage of a valid container, and record headers with random
// fields under a recomputed checksum. Must never crash (ASan/UBSan watch),
// never return OK for damaged bytes, and never return plaintext other than
// the block's when the expected fingerprint is given.
TEST(ContainerTest, FuzzNeverCrashesNorReturnsWrongData) {
  std::mt19937_64 rng(12345);
  SmallContainer c = MakeSmallContainer();
  auto noop = [](const BlockRecordInfo&, std::string_view) { return Status::OK(); };
  std::string plain;
  for (int iter = 0; iter < 3000; iter++) {
    size_t len = rng() % 400;
    std::string garbage = RandomBytes(len, rng());
    Status a = ForEachBlockRecord(garbage, 42, "f", noop);
    EXPECT_TRUE(a.IsCorruption()) << a.ToString();
    EXPECT_TRUE(DecodeBlockRecord(garbage, nullptr, &plain, "f").IsCorruption());
    RecordView view;
    EXPECT_TRUE(RecordView::Parse(garbage, "f", &view).IsCorruption());
    std::string behind_header = c.bytes.substr(0, kContainerHeaderSize) + garbage;
    EXPECT_TRUE(ForEachBlockRecord(behind_header, 42, "f", noop).IsCorruption());
  }
  for (int iter = 0; iter < 3000; iter++) {
    std::string bad = c.bytes;
    int changes = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < changes; k++) {
      bad[rng() % bad.size()] = static_cast<char>(rng());
    }
    if (rng() % 4 == 0) bad.resize(rng() % bad.size());
    std::vector<std::string> plains;
    Status st = ReadAll(bad, c.id, &plains);
    if (bad == c.bytes) {
      EXPECT_TRUE(st.ok());
    } else {
      EXPECT_TRUE(st.IsCorruption()) << st.ToString();
    }
    for (size_t k = 0; k < plains.size(); k++) EXPECT_EQ(plains[k], c.blocks[k].plaintext);
  }
  for (int iter = 0; iter < 3000; iter++) {
    const Block& b = c.blocks[rng() % c.blocks.size()];
    std::string record = c.bytes.substr(b.info.offset, b.info.record_len);
    auto* r = reinterpret_cast<uint8_t*>(record.data());
    // Damage header fields, then make the checksum match. (Payload bytes
    // under a forged checksum are beyond any decoder short of re-hashing the
    // plaintext, which check --read-data does.)
    r[rng() % 44] = static_cast<uint8_t>(rng());
    if (rng() % 3 == 0) EncodeU32(r + 4, static_cast<uint32_t>(rng() % 2000));
    uint32_t crc = crc32c::Extend(crc32c::Value(r, 44), r + 48, record.size() - 48);
    EncodeU32(r + 44, crc32c::Mask(crc));
    Status st = DecodeBlockRecord(record, &b.info.fingerprint, &plain, "f");
    if (st.ok()) {
      EXPECT_EQ(plain, b.plaintext) << "wrong data returned as OK";
    } else {
      EXPECT_TRUE(st.IsCorruption()) << st.ToString();
    }
  }
}

TEST(CompressionTest, RoundTripAndFallback) {
  Compressor compressor(3);
  std::string out, back;
  std::string text;
  for (int i = 0; i < 200; i++) text += "line " + std::to_string(i % 7) + "\n";
  ASSERT_EQ(compressor.Compress(Bytes(text), &out), Compression::kZstd);
  EXPECT_LE(out.size(), text.size() - text.size() / 32);
  ASSERT_TRUE(
      Decompress(Compression::kZstd, Bytes(out), static_cast<uint32_t>(text.size()), &back, "b")
          .ok());
  EXPECT_EQ(back, text);

  std::string random = RandomBytes(4096, 1);
  ASSERT_EQ(compressor.Compress(Bytes(random), &out), Compression::kNone);
  EXPECT_EQ(out, random);
  ASSERT_TRUE(Decompress(Compression::kNone, Bytes(out), 4096, &back, "b").ok());
  EXPECT_EQ(back, random);

  ASSERT_EQ(compressor.Compress({}, &out), Compression::kNone);
  EXPECT_EQ(out, "");
  ASSERT_TRUE(Decompress(Compression::kNone, {}, 0, &back, "b").ok());
  EXPECT_EQ(back, "");

  // Saving less than 1/32 keeps the raw bytes: random data with a small
  // compressible part.
  std::string mostly_random = RandomBytes(4000, 2) + std::string(64, 'z');
  EXPECT_EQ(compressor.Compress(Bytes(mostly_random), &out), Compression::kNone);
}

// CompressInto makes the choice and the bytes of CompressView, straight into
// the caller's buffer, and never writes past it.
TEST(CompressionTest, CompressIntoMatchesCompressViewAndStaysInside) {
  Compressor c(1);
  std::string text;
  for (int i = 0; i < 2000; i++) text += "line " + std::to_string(i % 37) + " of a log\n";
  const std::string mixed = text.substr(0, 20000) + RandomBytes(20000, 11);
  for (const std::string& plain : {text, mixed, RandomBytes(65536, 12), std::string("x")}) {
    const std::span<const uint8_t> in = Bytes(plain);
    Compressor::View want = c.CompressView(in);
    const std::string want_bytes(reinterpret_cast<const char*>(want.bytes.data()),
                                 want.bytes.size());
    // Room for zstd's worst case, then a guard.
    const size_t room = Compressor::Bound(plain.size());
    std::vector<uint8_t> out(room + 64, 0xee);
    Compressor::View got = c.CompressInto(in, std::span<uint8_t>(out).first(room));
    EXPECT_EQ(got.compression, want.compression) << plain.size();
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(got.bytes.data()), got.bytes.size()),
              want_bytes);
    const uint8_t* where = got.compression == Compression::kZstd ? out.data() : in.data();
    EXPECT_EQ(got.bytes.data(), where);
    for (size_t i = room; i < out.size(); i++) ASSERT_EQ(out[i], 0xee) << i;
  }
  // Less room: still at most what keeping the compressed form allows.
  std::vector<uint8_t> tight(text.size() / 8);
  Compressor::View fitted = c.CompressInto(Bytes(text), tight);
  ASSERT_EQ(fitted.compression, Compression::kZstd);
  EXPECT_LE(fitted.bytes.size(), tight.size());
  std::string back;
  ASSERT_TRUE(Decompress(Compression::kZstd, fitted.bytes, text.size(), &back, "t").ok());
  EXPECT_EQ(back, text);
  // Too little room for the compressed form: stored as it is.
  std::vector<uint8_t> small(100);
  Compressor::View none = c.CompressInto(Bytes(text), small);
  EXPECT_EQ(none.compression, Compression::kNone);
  EXPECT_EQ(none.bytes.size(), text.size());
}

// Level 1 compresses inputs of more than 16 KiB and up to 128 KiB with a
// 2^12-entry hash table, and smaller and larger ones exactly as zstd's
// one-shot ZSTD_compressCCtx does, whatever the order of sizes; other levels
// are ZSTD_compressCCtx's at every size.
TEST(CompressionTest, LevelOneUsesTheSmallHashTableAbove16UpTo128KiB) {
  // Log-like text: many repeats, at distances a smaller table loses some of.
  std::mt19937 rng(5);
  std::string text;
  while (text.size() < 300 * 1024)
    text += "host" + std::to_string(rng() % 50) + " event " + std::to_string(rng() % 1000) +
            " value " + std::to_string(rng() % 100000) + "\n";
  auto one_shot = [](const std::string& in, int level) {
    ZSTD_CCtx* ctx = ZSTD_createCCtx();
    std::string out(ZSTD_compressBound(in.size()), '\0');
    const size_t n = ZSTD_compressCCtx(ctx, out.data(), out.size(), in.data(), in.size(), level);
    ZSTD_freeCCtx(ctx);
    EXPECT_FALSE(ZSTD_isError(n)) << ZSTD_getErrorName(n);
    out.resize(ZSTD_isError(n) ? 0 : n);
    return out;
  };
  auto with_hash_log_12 = [](const std::string& in) {
    ZSTD_CCtx* ctx = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(ctx, ZSTD_c_compressionLevel, 1);
    ZSTD_CCtx_setParameter(ctx, ZSTD_c_hashLog, 12);
    std::string out(ZSTD_compressBound(in.size()), '\0');
    const size_t n = ZSTD_compress2(ctx, out.data(), out.size(), in.data(), in.size());
    ZSTD_freeCCtx(ctx);
    EXPECT_FALSE(ZSTD_isError(n)) << ZSTD_getErrorName(n);
    out.resize(ZSTD_isError(n) ? 0 : n);
    return out;
  };
  struct Case {
    std::string in, want;
  };
  std::vector<Case> cases;
  const std::vector<size_t> sizes = {8 * 1024,   16 * 1024,      16 * 1024 + 1, 64 * 1024,
                                     128 * 1024, 128 * 1024 + 1, 256 * 1024};
  for (size_t size : sizes) {
    const std::string in = text.substr(0, size);
    const bool tuned = size > 16 * 1024 && size <= 128 * 1024;
    const std::string tuned_form = with_hash_log_12(in), plain_form = one_shot(in, 1);
    ASSERT_NE(tuned_form, plain_form) << size << ": the input does not tell the tables apart";
    cases.push_back({in, tuned ? tuned_form : plain_form});
  }
  Compressor c(1);
  std::string out, back;
  // Every change between the tiers, both ways.
  for (size_t k : {0, 3, 6, 3, 0, 1, 2, 1, 4, 5, 4, 6, 2}) {
    const Case& cs = cases[k];
    ASSERT_EQ(c.Compress(Bytes(cs.in), &out), Compression::kZstd);
    EXPECT_EQ(out, cs.want) << cs.in.size();
    ASSERT_TRUE(
        Decompress(Compression::kZstd, Bytes(out), static_cast<uint32_t>(cs.in.size()), &back, "t")
            .ok());
    EXPECT_EQ(back, cs.in);
  }
  // Other levels keep zstd's parameters at every size.
  for (int level : {-1, 3}) {
    Compressor other(level);
    for (size_t size : {8 * 1024, 64 * 1024, 256 * 1024}) {
      const std::string in = text.substr(0, size);
      ASSERT_EQ(other.Compress(Bytes(in), &out), Compression::kZstd) << level << " " << size;
      EXPECT_EQ(out, one_shot(in, level)) << level << " " << size;
    }
  }
}

TEST(CompressionTest, WrongLengthOrBadPayloadIsCorruption) {
  Compressor compressor(3);
  std::string plain(5000, 'k'), z, out;
  ASSERT_EQ(compressor.Compress(Bytes(plain), &z), Compression::kZstd);
  for (uint32_t raw_len : {0u, 1u, 4999u, 5001u, 10000u, UINT32_MAX}) {
    Status st = Decompress(Compression::kZstd, Bytes(z), raw_len, &out, "blk 9");
    EXPECT_TRUE(st.IsCorruption()) << raw_len << ": " << st.ToString();
    EXPECT_NE(st.message().find("blk 9"), std::string::npos);
  }
  for (size_t len = 0; len < z.size(); len++) {
    EXPECT_TRUE(Decompress(Compression::kZstd, Bytes(z).first(len), 5000, &out, "b").IsCorruption())
        << len;
  }
  EXPECT_TRUE(Decompress(Compression::kZstd, Bytes(z + "x"), 5000, &out, "b").IsCorruption());
  EXPECT_TRUE(Decompress(Compression::kNone, Bytes(plain), 4999, &out, "b").IsCorruption());
  EXPECT_TRUE(Decompress(Compression::kNone, Bytes(plain), 5001, &out, "b").IsCorruption());
  EXPECT_TRUE(
      Decompress(static_cast<Compression>(9), Bytes(plain), 5000, &out, "b").IsCorruption());
}

TEST(CompressionTest, DecompressIsThreadSafe) {
  Compressor compressor(3);
  std::string plain = std::string(3000, 'a') + RandomBytes(100, 5), z;
  ASSERT_EQ(compressor.Compress(Bytes(plain), &z), Compression::kZstd);
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&] {
      std::string out;
      for (int i = 0; i < 200; i++) {
        if (!Decompress(Compression::kZstd, Bytes(z), static_cast<uint32_t>(plain.size()), &out,
                        "b")
                 .ok() ||
            out != plain) {
          bad++;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

}  // namespace
}  // namespace vmdedup
