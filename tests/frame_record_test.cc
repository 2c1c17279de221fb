// Tests of multi-block frame records (container format version 2; see
// docs/format.md, "Containers (objects)"): ContainerWriter::FitsFrame,
// AppendFrame and FrameRecordSize, RecordView (Parse, block, Find,
// DecodePrefix), DecodeBlock, ForEachBlockRecord over containers that hold
// frame records, and DecompressPrefix. Round trips, the documented byte
// layout, and that every damaged or inconsistent frame record (each
// single-byte change, each truncation, well-checksummed records with bad
// fields, a frame record in a version 1 container) gives Corruption, never
// wrong data or a crash.

#include <gtest/gtest.h>

#include <optional>
#include <random>

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

std::span<uint8_t> MutableBytes(std::string* s) {
  return {reinterpret_cast<uint8_t*>(s->data()), s->size()};
}

Fingerprint Fp(std::string_view plaintext) { return Sha256(Bytes(plaintext)); }

std::string Concat(const std::vector<std::string>& parts) {
  std::string all;
  for (const std::string& p : parts) all += p;
  return all;
}

// `n` bytes of text that zstd compresses well, different for each seed.
std::string Compressible(size_t n, int seed) {
  std::string s;
  for (int k = 0; s.size() < n; k++) {
    s += "block " + std::to_string(seed) + " line " + std::to_string(k % 13) + "\n";
  }
  s.resize(n);
  return s;
}

// One record as the test wrote it.
struct Rec {
  std::vector<std::string> blocks;  // plaintexts; one for a block record
  std::string payload;              // the stored bytes
  BlockRecordInfo info;             // what the writer returned
  bool frame() const { return blocks.size() > 1; }
};

struct Built {
  uint64_t id = 0;
  std::vector<Rec> records;
  std::string bytes;
  uint32_t writer_blocks = 0;
  uint32_t writer_records = 0;
  std::vector<std::string> AllBlocks() const {
    std::vector<std::string> all;
    for (const Rec& r : records) all.insert(all.end(), r.blocks.begin(), r.blocks.end());
    return all;
  }
  std::vector<Fingerprint> AllFingerprints() const {
    std::vector<Fingerprint> fps;
    for (const std::string& b : AllBlocks()) fps.push_back(Fp(b));
    return fps;
  }
};

// Writes one record per entry of `records`: a block record for a single
// block, a frame record otherwise, each compressed (as one) when that saves
// 1/32, as the backup does.
Built Build(uint64_t id, const std::vector<std::vector<std::string>>& records,
            size_t capacity = 4u << 20) {
  Built b;
  b.id = id;
  Compressor compressor(3);
  ContainerWriter w(id, capacity);
  for (const std::vector<std::string>& blocks : records) {
    Rec rec;
    rec.blocks = blocks;
    std::string plain = Concat(blocks);
    Compression c = compressor.Compress(Bytes(plain), &rec.payload);
    if (blocks.size() == 1) {
      EXPECT_TRUE(w.Fits(rec.payload.size()));
      rec.info = w.Append(Fp(plain), static_cast<uint32_t>(plain.size()), c, Bytes(rec.payload));
    } else {
      std::vector<FrameBlock> fbs;
      for (const std::string& blk : blocks) {
        fbs.push_back({Fp(blk), static_cast<uint32_t>(blk.size())});
      }
      EXPECT_TRUE(w.FitsFrame(fbs.size(), rec.payload.size()));
      rec.info = w.AppendFrame(fbs, c, Bytes(rec.payload));
    }
    b.records.push_back(std::move(rec));
  }
  b.writer_blocks = w.block_count();
  b.writer_records = w.record_count();
  b.bytes = w.Finish();
  return b;
}

// A block record, a zstd frame of 16 blocks of 4 KiB (compressible and
// random ones alternating) and a frame stored as is (random blocks).
Built MakeBigContainer() {
  std::vector<std::string> mixed;
  for (int i = 0; i < 16; i++) {
    mixed.push_back(i % 2 == 0 ? Compressible(4096, i) : RandomBytes(4096, 100 + i));
  }
  std::vector<std::string> random;
  uint64_t seed = 200;
  for (size_t len : {1000, 4096, 1, 777, 3000}) random.push_back(RandomBytes(len, seed++));
  Built b = Build(77, {{Compressible(4096, 99)}, mixed, random});
  EXPECT_EQ(b.records[0].info.compression, Compression::kZstd);
  EXPECT_EQ(b.records[1].info.compression, Compression::kZstd);
  EXPECT_EQ(b.records[2].info.compression, Compression::kNone);
  return b;
}

// Small enough to damage every byte: a block record, a zstd frame of three
// blocks, a frame of two random blocks stored as is, a stored block record.
Built MakeSmallContainer() {
  Built b = Build(42, {{std::string(300, 'a') + "tail"},
                       {std::string(200, 'b') + "x", RandomBytes(40, 5), std::string(150, 'c')},
                       {RandomBytes(60, 6), RandomBytes(1, 7)},
                       {RandomBytes(30, 8)}});
  EXPECT_EQ(b.records[0].info.compression, Compression::kZstd);
  EXPECT_EQ(b.records[1].info.compression, Compression::kZstd);
  EXPECT_EQ(b.records[2].info.compression, Compression::kNone);
  EXPECT_EQ(b.records[3].info.compression, Compression::kNone);
  return b;
}

// Walks `container` and decodes every block of every record against the
// fingerprint the test gave it (`expected`, all blocks in order).
Status ReadAll(std::string_view container, uint64_t id, const std::vector<Fingerprint>& expected,
               std::vector<std::string>* plaintexts) {
  plaintexts->clear();
  return ForEachBlockRecord(
      container, id, "container t", [&](const BlockRecordInfo& info, std::string_view record) {
        for (uint32_t i = 0; i < info.block_count; i++) {
          const size_t k = plaintexts->size();
          if (k >= expected.size()) return Status::Aborted("more blocks than written");
          std::string plain;
          RETURN_IF_ERROR(DecodeBlock(record, i, &expected[k], &plain, "container t"));
          plaintexts->push_back(std::move(plain));
        }
        return Status::OK();
      });
}

Status Walk(std::string_view container, uint64_t id) {
  return ForEachBlockRecord(container, id, "container t",
                            [](const BlockRecordInfo&, std::string_view) { return Status::OK(); });
}

// A frame record built by hand from its fields, its checksum computed as
// docs/format.md says: independent of ContainerWriter.
struct Entry {
  Fingerprint fp;
  uint32_t len = 0;
};

void ResealFrame(std::string* record) {
  auto* p = reinterpret_cast<uint8_t*>(record->data());
  uint32_t crc = crc32c::Extend(crc32c::Value(p, 12), p + 16, record->size() - 16);
  EncodeU32(p + 12, crc32c::Mask(crc));
}

std::string FrameRecordBytes(uint8_t compression, uint16_t count, uint32_t raw_len,
                             const std::vector<Entry>& table, std::string_view payload,
                             std::optional<uint32_t> payload_len = std::nullopt) {
  ByteWriter w;
  w.U8(compression);
  w.U8(1);
  w.U16(count);
  w.U32(raw_len);
  w.U32(payload_len.value_or(static_cast<uint32_t>(payload.size())));
  w.U32(0);  // checksum, below
  for (const Entry& e : table) {
    w.Bytes(e.fp.bytes.data(), e.fp.bytes.size());
    w.U32(e.len);
  }
  w.Bytes(payload.data(), payload.size());
  std::string record = w.Take();
  ResealFrame(&record);
  return record;
}

// Header, `records` back to back and trailer, every checksum right.
std::string WrapContainer(uint64_t id, uint32_t version, const std::vector<std::string>& records) {
  ByteWriter w;
  w.Bytes("VMDDCTR1", 8);
  w.U32(version);
  w.U32(0);
  w.U64(id);
  w.U32(0);
  w.U32(crc32c::Mask(crc32c::Value(w.buffer().data(), 28)));
  for (const std::string& r : records) w.Bytes(r.data(), r.size());
  const uint64_t trailer_at = w.size();
  ByteWriter t;
  t.Bytes("VMDDEND1", 8);
  t.U32(static_cast<uint32_t>(records.size()));
  t.U32(0);
  t.U64(trailer_at);
  t.U32(0);
  t.U32(crc32c::Mask(crc32c::Value(t.buffer().data(), 28)));
  w.Bytes(t.buffer().data(), t.size());
  return w.Take();
}

TEST(FrameRecordTest, RoundTrip) {
  Built c = MakeBigContainer();
  const auto* p = reinterpret_cast<const uint8_t*>(c.bytes.data());
  EXPECT_EQ(DecodeU32(p + 8), 2u) << "a container holding a frame record is version 2";
  EXPECT_EQ(c.writer_records, 3u);
  EXPECT_EQ(c.writer_blocks, 1u + 16u + 5u);

  // What the writer returned.
  for (size_t r = 0; r < c.records.size(); r++) {
    const Rec& rec = c.records[r];
    const size_t n = rec.blocks.size();
    EXPECT_EQ(rec.info.block_count, n);
    EXPECT_EQ(rec.info.raw_len, Concat(rec.blocks).size());
    EXPECT_EQ(rec.info.record_len, rec.frame()
                                       ? ContainerWriter::FrameRecordSize(n, rec.payload.size())
                                       : kBlockRecordHeaderSize + rec.payload.size());
  }
  EXPECT_EQ(ContainerWriter::FrameRecordSize(16, 1000), 16u + 36u * 16 + 1000);
  EXPECT_EQ(c.records[0].info.offset, kContainerHeaderSize);
  EXPECT_EQ(c.records[1].info.offset, c.records[0].info.offset + c.records[0].info.record_len);
  EXPECT_EQ(c.records[2].info.offset, c.records[1].info.offset + c.records[1].info.record_len);
  EXPECT_EQ(c.bytes.size(),
            c.records[2].info.offset + c.records[2].info.record_len + kContainerTrailerSize);

  // The walk sees the same three records.
  std::vector<BlockRecordInfo> infos;
  Status st = ForEachBlockRecord(
      c.bytes, c.id, "container t", [&](const BlockRecordInfo& info, std::string_view record) {
        EXPECT_EQ(record.size(), info.record_len);
        EXPECT_EQ(record, std::string_view(c.bytes).substr(info.offset, info.record_len));
        infos.push_back(info);
        return Status::OK();
      });
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(infos.size(), 3u);
  for (size_t r = 0; r < 3; r++) {
    const BlockRecordInfo& want = c.records[r].info;
    EXPECT_EQ(infos[r].offset, want.offset) << r;
    EXPECT_EQ(infos[r].record_len, want.record_len) << r;
    EXPECT_EQ(infos[r].raw_len, want.raw_len) << r;
    EXPECT_EQ(infos[r].block_count, want.block_count) << r;
    EXPECT_EQ(infos[r].compression, want.compression) << r;
    EXPECT_EQ(infos[r].fingerprint, want.fingerprint) << r;
  }
  EXPECT_EQ(infos[0].fingerprint, Fp(c.records[0].blocks[0]));
  EXPECT_EQ(infos[0].block_count, 1u);
  EXPECT_EQ(infos[1].block_count, 16u);
  EXPECT_EQ(infos[2].block_count, 5u);

  // Each record read alone by (offset, record_len), as a restore does.
  for (const Rec& rec : c.records) {
    std::string_view record =
        std::string_view(c.bytes).substr(rec.info.offset, rec.info.record_len);
    const std::string plain = Concat(rec.blocks);
    RecordView view;
    ASSERT_TRUE(RecordView::Parse(record, "container t", &view).ok());
    EXPECT_EQ(view.is_frame(), rec.frame());
    EXPECT_EQ(view.block_count(), rec.blocks.size());
    EXPECT_EQ(view.raw_len(), plain.size());
    EXPECT_EQ(view.compression(), rec.info.compression);
    BlockRecordInfo vi = view.info(rec.info.offset);
    EXPECT_EQ(vi.offset, rec.info.offset);
    EXPECT_EQ(vi.record_len, rec.info.record_len);
    EXPECT_EQ(vi.block_count, rec.info.block_count);
    uint32_t plain_offset = 0;
    for (uint32_t i = 0; i < rec.blocks.size(); i++) {
      const std::string& want = rec.blocks[i];
      const Fingerprint fp = Fp(want);
      RecordView::Block b = view.block(i);
      EXPECT_EQ(b.fingerprint, fp) << i;
      EXPECT_EQ(b.raw_len, want.size()) << i;
      EXPECT_EQ(b.plain_offset, plain_offset) << i;
      auto found = view.Find(i, &fp, static_cast<uint32_t>(want.size()), "container t");
      ASSERT_TRUE(found.ok()) << found.status().ToString();
      EXPECT_EQ(found->plain_offset, plain_offset);
      EXPECT_EQ(found->raw_len, want.size());
      auto found_any = view.Find(i, nullptr, static_cast<uint32_t>(want.size()), "container t");
      ASSERT_TRUE(found_any.ok());

      std::string out = "left over from before";
      Status d = DecodeBlock(record, i, &fp, &out, "container t");
      ASSERT_TRUE(d.ok()) << d.ToString();
      EXPECT_EQ(out, want) << "block " << i;
      out = "x";
      ASSERT_TRUE(DecodeBlock(record, i, nullptr, &out, "container t").ok());
      EXPECT_EQ(out, want) << "block " << i;
      plain_offset += static_cast<uint32_t>(want.size());
    }
    std::string out;
    EXPECT_TRUE(DecodeBlock(record, view.block_count(), nullptr, &out, "t").IsCorruption());

    // Prefixes of the record's plaintext.
    for (size_t len : std::vector<size_t>{0, 1, plain.size() / 2, plain.size() - 1, plain.size()}) {
      std::string prefix(len, '\xee');
      Status d = view.DecodePrefix(MutableBytes(&prefix), "container t");
      ASSERT_TRUE(d.ok()) << len << ": " << d.ToString();
      EXPECT_EQ(prefix, plain.substr(0, len)) << len;
    }
    std::string too_long(plain.size() + 1, '\0');
    EXPECT_FALSE(view.DecodePrefix(MutableBytes(&too_long), "container t").ok());
  }

  // Every block through the walk, against the fingerprints written.
  std::vector<std::string> plains;
  st = ReadAll(c.bytes, c.id, c.AllFingerprints(), &plains);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(plains, c.AllBlocks());
}

TEST(FrameRecordTest, VersionFollowsTheRecordsAndTheWriterResets) {
  // Block records only: version 1, whoever writes it.
  Built blocks_only = Build(5, {{Compressible(2000, 1)}, {RandomBytes(500, 2)}});
  EXPECT_EQ(DecodeU32(reinterpret_cast<const uint8_t*>(blocks_only.bytes.data()) + 8), 1u);
  std::vector<std::string> plains;
  ASSERT_TRUE(ReadAll(blocks_only.bytes, 5, blocks_only.AllFingerprints(), &plains).ok());
  EXPECT_EQ(plains, blocks_only.AllBlocks());

  // A writer that finished a version 2 container starts the next one at 1.
  ContainerWriter w(10, 1 << 20);
  std::string a = RandomBytes(100, 1), b = RandomBytes(200, 2);
  std::vector<FrameBlock> fbs = {{Fp(a), 100}, {Fp(b), 200}};
  std::string ab = a + b;
  w.AppendFrame(fbs, Compression::kNone, Bytes(ab));
  EXPECT_EQ(w.block_count(), 2u);
  EXPECT_EQ(w.record_count(), 1u);
  std::string v2 = w.Finish();
  EXPECT_EQ(DecodeU32(reinterpret_cast<const uint8_t*>(v2.data()) + 8), 2u);
  ASSERT_TRUE(ReadAll(v2, 10, {Fp(a), Fp(b)}, &plains).ok());
  EXPECT_EQ(plains, (std::vector<std::string>{a, b}));
  EXPECT_EQ(w.id(), 11u);
  EXPECT_EQ(w.block_count(), 0u);
  w.Append(Fp(a), 100, Compression::kNone, Bytes(a));
  std::string v1 = w.Finish();
  EXPECT_EQ(DecodeU32(reinterpret_cast<const uint8_t*>(v1.data()) + 8), 1u);
  ASSERT_TRUE(ReadAll(v1, 11, {Fp(a)}, &plains).ok());

  // The same through FinishInPlace and Reset.
  w.AppendFrame(fbs, Compression::kNone, Bytes(ab));
  std::string in_place(w.FinishInPlace());
  EXPECT_EQ(DecodeU32(reinterpret_cast<const uint8_t*>(in_place.data()) + 8), 2u);
  EXPECT_TRUE(Walk(in_place, 12).ok());
  w.Reset(13);
  w.Append(Fp(a), 100, Compression::kNone, Bytes(a));
  std::string_view after = w.FinishInPlace();
  EXPECT_EQ(DecodeU32(reinterpret_cast<const uint8_t*>(after.data()) + 8), 1u);
  EXPECT_TRUE(Walk(after, 13).ok());
}

TEST(FrameRecordTest, ByteLayoutIsAsDocumented) {
  Built c = MakeBigContainer();
  const auto* p = reinterpret_cast<const uint8_t*>(c.bytes.data());
  EXPECT_EQ(c.bytes.substr(0, 8), "VMDDCTR1");
  EXPECT_EQ(DecodeU32(p + 8), 2u);
  EXPECT_EQ(DecodeU32(p + 12), 0u);
  EXPECT_EQ(DecodeU64(p + 16), c.id);
  EXPECT_EQ(DecodeU32(p + 24), 0u);
  EXPECT_EQ(DecodeU32(p + 28), crc32c::Mask(crc32c::Value(p, 28)));

  // The block record before the frames keeps its own layout (kind 0).
  const uint8_t* b = p + c.records[0].info.offset;
  EXPECT_EQ(b[0], 1);
  EXPECT_EQ(b[1], 0);

  for (size_t r : {1, 2}) {
    const Rec& rec = c.records[r];
    const uint8_t* f = p + rec.info.offset;
    const uint32_t n = static_cast<uint32_t>(rec.blocks.size());
    const std::string plain = Concat(rec.blocks);
    SCOPED_TRACE("record " + std::to_string(r));
    EXPECT_EQ(f[0], r == 1 ? 1 : 0);  // zstd, none
    EXPECT_EQ(f[1], 1);               // kind: frame
    EXPECT_EQ(DecodeU16(f + 2), n);
    EXPECT_EQ(DecodeU32(f + 4), plain.size());
    const uint32_t payload_len = DecodeU32(f + 8);
    EXPECT_EQ(payload_len, rec.payload.size());
    EXPECT_EQ(rec.info.record_len, 16 + 36 * n + payload_len);
    uint32_t crc = crc32c::Extend(crc32c::Value(f, 12), f + 16, rec.info.record_len - 16);
    EXPECT_EQ(DecodeU32(f + 12), crc32c::Mask(crc));
    for (uint32_t i = 0; i < n; i++) {
      const uint8_t* e = f + 16 + 36 * i;
      Fingerprint fp = Fp(rec.blocks[i]);
      EXPECT_EQ(0, std::memcmp(e, fp.bytes.data(), 32)) << i;
      EXPECT_EQ(DecodeU32(e + 32), rec.blocks[i].size()) << i;
    }
    std::string payload(reinterpret_cast<const char*>(f + 16 + 36 * n), payload_len);
    EXPECT_EQ(payload, rec.payload);
    if (r == 2) {
      EXPECT_EQ(payload, plain);  // stored as is, back to back in table order
    } else {
      std::string back;
      ASSERT_TRUE(Decompress(Compression::kZstd, Bytes(payload),
                             static_cast<uint32_t>(plain.size()), &back, "t")
                      .ok());
      EXPECT_EQ(back, plain);  // one zstd frame of the blocks back to back
    }
    // The same bytes as a frame record built by hand from the document.
    std::vector<Entry> table;
    for (const std::string& blk : rec.blocks) {
      table.push_back({Fp(blk), static_cast<uint32_t>(blk.size())});
    }
    EXPECT_EQ(FrameRecordBytes(f[0], static_cast<uint16_t>(n), static_cast<uint32_t>(plain.size()),
                               table, rec.payload),
              c.bytes.substr(rec.info.offset, rec.info.record_len));
  }

  const uint8_t* t = p + c.bytes.size() - kContainerTrailerSize;
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(t), 8), "VMDDEND1");
  EXPECT_EQ(DecodeU32(t + 8), 3u);  // records, not blocks
  EXPECT_EQ(DecodeU64(t + 16), c.bytes.size() - kContainerTrailerSize);
  EXPECT_EQ(DecodeU32(t + 28), crc32c::Mask(crc32c::Value(t, 28)));

  // A container assembled by hand from the same records is the same object.
  std::vector<std::string> records;
  for (const Rec& rec : c.records)
    records.push_back(c.bytes.substr(rec.info.offset, rec.info.record_len));
  EXPECT_EQ(WrapContainer(c.id, 2, records), c.bytes);
}

TEST(FrameRecordTest, FindChecksFingerprintLengthAndIndex) {
  Built c = MakeBigContainer();
  const Rec& rec = c.records[1];
  std::string_view record = std::string_view(c.bytes).substr(rec.info.offset, rec.info.record_len);
  RecordView view;
  ASSERT_TRUE(RecordView::Parse(record, "container t @x", &view).ok());
  const uint32_t n = view.block_count();
  ASSERT_EQ(n, 16u);
  for (uint32_t i = 0; i < n; i++) {
    const Fingerprint fp = Fp(rec.blocks[i]);
    const Fingerprint other = Fp(rec.blocks[(i + 1) % n]);
    const uint32_t len = static_cast<uint32_t>(rec.blocks[i].size());
    ASSERT_TRUE(view.Find(i, &fp, len, "container t @x").ok());
    auto wrong_fp = view.Find(i, &other, len, "container t @x");
    ASSERT_TRUE(wrong_fp.status().IsCorruption()) << i;
    EXPECT_NE(wrong_fp.status().message().find("container t @x"), std::string::npos);
    EXPECT_NE(wrong_fp.status().message().find(other.Hex()), std::string::npos);
    Fingerprint flipped = fp;
    flipped.bytes[31] ^= 1;
    EXPECT_TRUE(view.Find(i, &flipped, len, "t").status().IsCorruption()) << i;
    EXPECT_TRUE(view.Find(i, &fp, len - 1, "t").status().IsCorruption()) << i;
    EXPECT_TRUE(view.Find(i, &fp, len + 1, "t").status().IsCorruption()) << i;
    EXPECT_TRUE(view.Find(i, nullptr, 0, "t").status().IsCorruption()) << i;
    // DecodeBlock against another block's fingerprint.
    std::string out;
    EXPECT_TRUE(DecodeBlock(record, i, &other, &out, "t").IsCorruption()) << i;
  }
  const Fingerprint fp0 = Fp(rec.blocks[0]);
  for (uint32_t index : {n, n + 1, kMaxFrameBlocks - 1, kMaxFrameBlocks, UINT32_MAX}) {
    auto r = view.Find(index, &fp0, 4096, "container t @x");
    EXPECT_TRUE(r.status().IsCorruption()) << index;
    EXPECT_TRUE(view.Find(index, nullptr, 4096, "t").status().IsCorruption()) << index;
    std::string out;
    EXPECT_TRUE(DecodeBlock(record, index, nullptr, &out, "t").IsCorruption()) << index;
  }

  // A block record has exactly one block, index 0.
  const Rec& single = c.records[0];
  std::string_view brecord =
      std::string_view(c.bytes).substr(single.info.offset, single.info.record_len);
  RecordView bview;
  ASSERT_TRUE(RecordView::Parse(brecord, "t", &bview).ok());
  EXPECT_FALSE(bview.is_frame());
  EXPECT_EQ(bview.block_count(), 1u);
  const Fingerprint bfp = Fp(single.blocks[0]);
  auto ok = bview.Find(0, &bfp, 4096, "t");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->plain_offset, 0u);
  EXPECT_TRUE(bview.Find(1, &bfp, 4096, "t").status().IsCorruption());
  EXPECT_TRUE(bview.Find(0, &fp0, 4096, "t").status().IsCorruption());
  EXPECT_TRUE(bview.Find(0, &bfp, 4095, "t").status().IsCorruption());
  std::string out;
  ASSERT_TRUE(DecodeBlock(brecord, 0, &bfp, &out, "t").ok());
  EXPECT_EQ(out, single.blocks[0]);
  EXPECT_TRUE(DecodeBlock(brecord, 1, &bfp, &out, "t").IsCorruption());
  // The single-block decoders refuse a frame record.
  EXPECT_TRUE(DecodeBlockRecord(record, nullptr, &out, "t").IsCorruption());
}

// Every byte of a container with frame records is under a checksum: any
// single-byte change is Corruption from the walk alone, and the walk plus
// decoding never delivers a wrong block.
TEST(FrameRecordTest, EverySingleByteChangeIsCorruption) {
  Built c = MakeSmallContainer();
  const std::vector<Fingerprint> fps = c.AllFingerprints();
  const std::vector<std::string> blocks = c.AllBlocks();
  std::vector<std::string> plains;
  ASSERT_TRUE(ReadAll(c.bytes, c.id, fps, &plains).ok());
  ASSERT_EQ(plains, blocks);
  for (size_t i = 0; i < c.bytes.size(); i++) {
    for (uint8_t x : {0x01, 0x02, 0x80, 0xff, 0x5a}) {
      std::string bad = c.bytes;
      bad[i] = static_cast<char>(bad[i] ^ x);
      Status walk = Walk(bad, c.id);
      ASSERT_TRUE(walk.IsCorruption())
          << "byte " << i << " ^ " << int(x) << ": " << walk.ToString();
      Status st = ReadAll(bad, c.id, fps, &plains);
      ASSERT_TRUE(st.IsCorruption()) << "byte " << i << " ^ " << int(x) << ": " << st.ToString();
      ASSERT_NE(st.message().find("container t"), std::string::npos) << st.ToString();
      ASSERT_LE(plains.size(), blocks.size());
      for (size_t k = 0; k < plains.size(); k++) ASSERT_EQ(plains[k], blocks[k]) << i;
    }
  }
}

TEST(FrameRecordTest, EveryTruncationAndExtensionIsCorruption) {
  Built c = MakeSmallContainer();
  for (size_t len = 0; len < c.bytes.size(); len++) {
    int calls = 0;
    Status st = ForEachBlockRecord(std::string_view(c.bytes).substr(0, len), c.id, "container t",
                                   [&](const BlockRecordInfo&, std::string_view) {
                                     calls++;
                                     return Status::OK();
                                   });
    ASSERT_TRUE(st.IsCorruption()) << "length " << len << ": " << st.ToString();
    ASSERT_EQ(calls, 0) << "length " << len;
  }
  for (std::string extra : {std::string(1, '\0'), std::string(16, '\0'), std::string("junk")}) {
    EXPECT_TRUE(Walk(c.bytes + extra, c.id).IsCorruption());
  }
  // A frame record cut short inside a container whose header and trailer
  // are rewritten to match (count and offset right) is still Corruption.
  std::vector<std::string> records;
  for (const Rec& r : c.records)
    records.push_back(c.bytes.substr(r.info.offset, r.info.record_len));
  ASSERT_EQ(WrapContainer(c.id, 2, records), c.bytes);
  for (size_t r : {1, 2}) {
    for (size_t cut = 1; cut < records[r].size(); cut++) {
      std::vector<std::string> cut_records = records;
      cut_records[r].resize(records[r].size() - cut);
      Status st = Walk(WrapContainer(c.id, 2, cut_records), c.id);
      ASSERT_TRUE(st.IsCorruption())
          << "record " << r << " cut by " << cut << ": " << st.ToString();
    }
  }
}

// A record read alone by (offset, record_len), as a restore reads it: any
// damage, truncation or extension is Corruption for every block it holds.
TEST(FrameRecordTest, EveryChangeAndTruncationOfARecordIsCorruption) {
  Built c = MakeSmallContainer();
  for (const Rec& rec : c.records) {
    const std::string record = c.bytes.substr(rec.info.offset, rec.info.record_len);
    SCOPED_TRACE("record at " + std::to_string(rec.info.offset));
    RecordView view;
    for (size_t i = 0; i < record.size(); i++) {
      for (uint8_t x : {0x01, 0x80, 0xff, 0x33}) {
        std::string bad = record;
        bad[i] = static_cast<char>(bad[i] ^ x);
        Status parse = RecordView::Parse(bad, "t", &view);
        ASSERT_TRUE(parse.IsCorruption())
            << "byte " << i << " ^ " << int(x) << ": " << parse.ToString();
        for (uint32_t k = 0; k < rec.blocks.size(); k++) {
          const Fingerprint fp = Fp(rec.blocks[k]);
          std::string out;
          Status st = DecodeBlock(bad, k, &fp, &out, "t");
          // Corruption, or (impossible with the checksum) the block itself.
          if (st.ok()) {
            ASSERT_EQ(out, rec.blocks[k]) << "byte " << i << ": wrong data returned as OK";
          }
          ASSERT_TRUE(st.IsCorruption()) << "byte " << i << " ^ " << int(x) << " block " << k;
          ASSERT_TRUE(DecodeBlock(bad, k, nullptr, &out, "t").IsCorruption());
        }
      }
    }
    for (size_t len = 0; len < record.size(); len++) {
      std::string_view cut = std::string_view(record).substr(0, len);
      ASSERT_TRUE(RecordView::Parse(cut, "t", &view).IsCorruption()) << len;
      std::string out;
      ASSERT_TRUE(DecodeBlock(cut, 0, nullptr, &out, "t").IsCorruption()) << len;
    }
    // Read with a length too long (the next record's bytes appended).
    std::string longer = c.bytes.substr(rec.info.offset, rec.info.record_len + 1);
    EXPECT_TRUE(RecordView::Parse(longer, "t", &view).IsCorruption());
    EXPECT_TRUE(RecordView::Parse(record + std::string(36, '\0'), "t", &view).IsCorruption());
  }
}

// Frame records a buggy or hostile writer could produce with a valid
// checksum: the fields themselves must be checked, each on its own.
TEST(FrameRecordTest, ChecksummedButInconsistentFrameRecordsAreCorruption) {
  const std::string a = RandomBytes(100, 1), b = RandomBytes(100, 2);
  const Entry ea{Fp(a), 100}, eb{Fp(b), 100};
  const std::string ab = a + b;
  Compressor compressor(1);

  // Controls: the hand builder makes records that pass, so each case below
  // fails for its one bad field.
  std::vector<std::pair<std::string, std::string>> good = {
      {"two stored blocks", FrameRecordBytes(0, 2, 200, {ea, eb}, ab)},
  };
  {
    std::string z;
    ASSERT_EQ(compressor.Compress(Bytes(std::string(200, 'z')), &z), Compression::kZstd);
    good.push_back(
        {"two zstd blocks",
         FrameRecordBytes(
             1, 2, 200, {{Fp(std::string(100, 'z')), 100}, {Fp(std::string(100, 'z')), 100}}, z)});
    std::vector<Entry> t256(256, Entry{Fp("q"), 1});
    good.push_back({"256 blocks", FrameRecordBytes(0, 256, 256, t256, std::string(256, 'q'))});
    std::string mib(kMaxBlockSize, '\0'), zmib;
    ASSERT_EQ(compressor.Compress(Bytes(mib), &zmib), Compression::kZstd);
    const Entry half{Fp(std::string(kMaxBlockSize / 2, '\0')), kMaxBlockSize / 2};
    good.push_back({"1 MiB", FrameRecordBytes(1, 2, kMaxBlockSize, {half, half}, zmib)});
  }
  for (const auto& [name, record] : good) {
    RecordView view;
    Status st = RecordView::Parse(record, "t", &view);
    ASSERT_TRUE(st.ok()) << name << ": " << st.ToString();
    for (uint32_t i = 0; i < view.block_count(); i++) {
      std::string out;
      const Fingerprint fp = view.block(i).fingerprint;
      ASSERT_TRUE(DecodeBlock(record, i, &fp, &out, "t").ok()) << name << " " << i;
      ASSERT_EQ(Fp(out), fp) << name << " " << i;
    }
    ASSERT_TRUE(Walk(WrapContainer(9, 2, {record}), 9).ok()) << name;
  }

  std::vector<std::pair<std::string, std::string>> bad;
  bad.push_back({"0 blocks", FrameRecordBytes(0, 0, 0, {}, "")});
  bad.push_back({"1 block", FrameRecordBytes(0, 1, 100, {ea}, a)});
  {
    std::vector<Entry> t257(257, Entry{Fp("q"), 1});
    bad.push_back({"257 blocks", FrameRecordBytes(0, 257, 257, t257, std::string(257, 'q'))});
    std::vector<Entry> t65535(65535, Entry{Fp("q"), 1});
    bad.push_back(
        {"65535 blocks", FrameRecordBytes(0, 65535, 65535, t65535, std::string(65535, 'q'))});
  }
  bad.push_back({"first length 0", FrameRecordBytes(0, 2, 100, {{ea.fp, 0}, eb}, b)});
  bad.push_back({"last length 0", FrameRecordBytes(0, 2, 100, {ea, {eb.fp, 0}}, a)});
  bad.push_back({"lengths add up to less", FrameRecordBytes(0, 2, 201, {ea, eb}, ab + "x")});
  bad.push_back(
      {"lengths add up to more", FrameRecordBytes(0, 2, 199, {ea, eb}, ab.substr(0, 199))});
  // Lengths whose 32-bit sum wraps around to the raw length.
  bad.push_back(
      {"lengths wrap to 0", FrameRecordBytes(0, 2, 0, {{ea.fp, UINT32_MAX}, {eb.fp, 1}}, "")});
  bad.push_back({"lengths wrap to 0 (halves)",
                 FrameRecordBytes(0, 2, 0, {{ea.fp, 0x80000000u}, {eb.fp, 0x80000000u}}, "")});
  bad.push_back({"lengths wrap to 200",
                 FrameRecordBytes(0, 2, 200, {{ea.fp, 0xFFFFFF9Cu}, {eb.fp, 300}}, ab)});
  bad.push_back({"stored, payload shorter than raw",
                 FrameRecordBytes(0, 2, 200, {ea, eb}, ab.substr(0, 150))});
  bad.push_back(
      {"stored, payload longer than raw", FrameRecordBytes(0, 2, 200, {ea, eb}, ab + ab)});
  bad.push_back({"compression 7", FrameRecordBytes(7, 2, 200, {ea, eb}, ab)});
  bad.push_back({"compression 2", FrameRecordBytes(2, 2, 200, {ea, eb}, ab)});
  bad.push_back({"compression 255", FrameRecordBytes(255, 2, 200, {ea, eb}, ab)});
  {
    // A raw length above 1 MiB whose zstd frame really holds that much.
    const uint32_t big = kMaxBlockSize + 4096;
    std::string plain(big, '\0'), z;
    ASSERT_EQ(compressor.Compress(Bytes(plain), &z), Compression::kZstd);
    const Entry half{Fp(std::string(big / 2, '\0')), big / 2};
    bad.push_back({"raw length 1 MiB + 4 KiB", FrameRecordBytes(1, 2, big, {half, half}, z)});
    const Entry over{Fp(std::string(kMaxBlockSize / 2 + 1, '\0')), kMaxBlockSize / 2 + 1};
    std::string plain2(kMaxBlockSize + 2, '\0'), z2;
    ASSERT_EQ(compressor.Compress(Bytes(plain2), &z2), Compression::kZstd);
    bad.push_back(
        {"raw length 1 MiB + 2", FrameRecordBytes(1, 2, kMaxBlockSize + 2, {over, over}, z2)});
    // A payload above 1 MiB (stored: the raw length too).
    const Entry pbig{Fp(""), kMaxBlockSize / 2 + 1};
    bad.push_back(
        {"payload 1 MiB + 2 stored", FrameRecordBytes(0, 2, kMaxBlockSize + 2, {pbig, pbig},
                                                      std::string(kMaxBlockSize + 2, 'p'))});
    bad.push_back({"payload 1 MiB + 1 zstd",
                   FrameRecordBytes(1, 2, 200, {ea, eb}, std::string(kMaxBlockSize + 1, 'p'))});
  }
  {
    // Kind 2 (unknown) on an otherwise good frame record.
    std::string k2 = FrameRecordBytes(0, 2, 200, {ea, eb}, ab);
    k2[1] = 2;
    ResealFrame(&k2);
    bad.push_back({"kind 2", k2});
    // Payload length field not matching the bytes that follow.
    bad.push_back({"payload length 1 short", FrameRecordBytes(0, 2, 200, {ea, eb}, ab, 199)});
    bad.push_back({"payload length 1 long", FrameRecordBytes(0, 2, 200, {ea, eb}, ab, 201)});
  }

  for (const auto& [name, record] : bad) {
    SCOPED_TRACE(name);
    RecordView view;
    Status parse = RecordView::Parse(record, "container t", &view);
    EXPECT_TRUE(parse.IsCorruption()) << parse.ToString();
    EXPECT_NE(parse.message().find("container t"), std::string::npos) << parse.ToString();
    for (uint32_t i = 0; i < 3; i++) {
      std::string out;
      EXPECT_TRUE(DecodeBlock(record, i, nullptr, &out, "t").IsCorruption()) << i;
    }
    Status walk = Walk(WrapContainer(9, 2, {record}), 9);
    EXPECT_TRUE(walk.IsCorruption()) << walk.ToString();
    // Behind a good frame record, too.
    std::string good_first = FrameRecordBytes(0, 2, 200, {ea, eb}, ab);
    walk = Walk(WrapContainer(9, 2, {good_first, record}), 9);
    EXPECT_TRUE(walk.IsCorruption()) << walk.ToString();
  }
}

// The payload's zstd frame must decode to exactly the raw length: Parse
// cannot see that (it does not decompress), decoding must.
TEST(FrameRecordTest, ZstdPayloadOfTheWrongSizeIsCorruptionOnDecode) {
  Compressor compressor(1);
  const std::string a(100, 'a'), b(100, 'b');
  const std::vector<Entry> table = {{Fp(a), 100}, {Fp(b), 100}};
  std::string z199, z201, z200;
  ASSERT_EQ(compressor.Compress(Bytes((a + b).substr(0, 199)), &z199), Compression::kZstd);
  ASSERT_EQ(compressor.Compress(Bytes(a + b + "c"), &z201), Compression::kZstd);
  ASSERT_EQ(compressor.Compress(Bytes(a + b), &z200), Compression::kZstd);
  for (const auto& [name, payload] :
       std::vector<std::pair<std::string, std::string>>{{"declares 199", z199},
                                                        {"declares 201", z201},
                                                        {"not zstd", std::string(50, 'n')},
                                                        {"two frames", z200 + z200},
                                                        {"trailing bytes", z200 + "junk"}}) {
    SCOPED_TRACE(name);
    std::string record = FrameRecordBytes(1, 2, 200, table, payload);
    std::string out;
    // The last block needs the whole frame: its end must be exact.
    Status st = DecodeBlock(record, 1, nullptr, &out, "t");
    EXPECT_TRUE(st.IsCorruption()) << st.ToString();
    RecordView view;
    if (RecordView::Parse(record, "t", &view).ok()) {
      std::string all(200, '\0');
      EXPECT_TRUE(view.DecodePrefix(MutableBytes(&all), "t").IsCorruption());
    }
  }
  std::string out;
  ASSERT_TRUE(DecodeBlock(FrameRecordBytes(1, 2, 200, table, z200), 1, nullptr, &out, "t").ok());
  EXPECT_EQ(out, b);
}

TEST(FrameRecordTest, FrameRecordInAVersion1ContainerIsCorruption) {
  Built c = MakeSmallContainer();
  auto with_version = [&](uint32_t version) {
    std::string bytes = c.bytes;
    auto* p = reinterpret_cast<uint8_t*>(bytes.data());
    EncodeU32(p + 8, version);
    EncodeU32(p + 28, crc32c::Mask(crc32c::Value(p, 28)));
    return bytes;
  };
  ASSERT_TRUE(Walk(with_version(2), c.id).ok());
  for (uint32_t version : {1u, 0u, 3u, UINT32_MAX}) {
    int calls = 0;
    Status st = ForEachBlockRecord(with_version(version), c.id, "container t",
                                   [&](const BlockRecordInfo&, std::string_view) {
                                     calls++;
                                     return Status::OK();
                                   });
    EXPECT_TRUE(st.IsCorruption()) << version << ": " << st.ToString();
    EXPECT_LE(calls, 1) << version;  // at most the block record before the first frame
  }
  // Built by hand: a version 1 container of block records only passes, with
  // a frame record it does not; version 2 takes both.
  const std::string a = RandomBytes(10, 1), b = RandomBytes(20, 2);
  std::string frame = FrameRecordBytes(0, 2, 30, {{Fp(a), 10}, {Fp(b), 20}}, a + b);
  std::string block = c.bytes.substr(c.records[3].info.offset, c.records[3].info.record_len);
  EXPECT_TRUE(Walk(WrapContainer(5, 1, {block, block}), 5).ok());
  EXPECT_TRUE(Walk(WrapContainer(5, 2, {block, block}), 5).ok());
  EXPECT_TRUE(Walk(WrapContainer(5, 2, {block, frame}), 5).ok());
  EXPECT_TRUE(Walk(WrapContainer(5, 1, {block, frame}), 5).IsCorruption());
  EXPECT_TRUE(Walk(WrapContainer(5, 1, {frame}), 5).IsCorruption());
}

// Bounded fuzzing of frame record headers under a recomputed checksum, and
// of random bytes: never a crash, never a wrong block returned as OK.
TEST(FrameRecordTest, FuzzedFrameHeadersNeverReturnWrongData) {
  std::mt19937_64 rng(4242);
  Built c = MakeSmallContainer();
  for (int iter = 0; iter < 4000; iter++) {
    const Rec& rec = c.records[1 + rng() % 2];
    std::string record = c.bytes.substr(rec.info.offset, rec.info.record_len);
    auto* r = reinterpret_cast<uint8_t*>(record.data());
    const int changes = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < changes; k++) r[rng() % 12] = static_cast<uint8_t>(rng());
    if (rng() % 4 == 0) EncodeU32(r + 4, static_cast<uint32_t>(rng() % 1000));
    ResealFrame(&record);
    RecordView view;
    Status parse = RecordView::Parse(record, "f", &view);
    if (!parse.ok()) {
      ASSERT_TRUE(parse.IsCorruption()) << parse.ToString();
    }
    for (uint32_t i = 0; i < rec.blocks.size(); i++) {
      const Fingerprint fp = Fp(rec.blocks[i]);
      std::string out;
      Status st = DecodeBlock(record, i, &fp, &out, "f");
      if (st.ok()) {
        ASSERT_EQ(out, rec.blocks[i]) << "wrong data returned as OK";
      } else {
        ASSERT_TRUE(st.IsCorruption()) << st.ToString();
      }
    }
  }
  for (int iter = 0; iter < 4000; iter++) {
    std::string garbage = RandomBytes(rng() % 600, rng());
    if (garbage.size() >= 2 && rng() % 2 == 0) garbage[1] = 1;  // claims to be a frame
    RecordView view;
    EXPECT_TRUE(RecordView::Parse(garbage, "f", &view).IsCorruption());
    std::string out;
    EXPECT_TRUE(DecodeBlock(garbage, 0, nullptr, &out, "f").IsCorruption());
    std::string behind_header = c.bytes.substr(0, kContainerHeaderSize) + garbage;
    EXPECT_TRUE(Walk(behind_header, c.id).IsCorruption());
  }
}

TEST(FrameRecordTest, SampledByteChangesOfABigContainer) {
  Built c = MakeBigContainer();
  const std::vector<Fingerprint> fps = c.AllFingerprints();
  const std::vector<std::string> blocks = c.AllBlocks();
  std::vector<std::string> plains;
  for (size_t i = 0; i < c.bytes.size(); i += 97) {
    std::string bad = c.bytes;
    bad[i] = static_cast<char>(bad[i] ^ 0x40);
    Status st = ReadAll(bad, c.id, fps, &plains);
    ASSERT_TRUE(st.IsCorruption()) << "byte " << i << ": " << st.ToString();
    for (size_t k = 0; k < plains.size(); k++) ASSERT_EQ(plains[k], blocks[k]) << i;
  }
}

TEST(DecompressPrefixTest, PrefixesOfZstdAndStoredPayloads) {
  std::vector<std::string> parts;
  for (int i = 0; i < 16; i++) {
    parts.push_back(i % 2 == 0 ? Compressible(4096, i) : RandomBytes(4096, 300 + i));
  }
  const std::string plain = Concat(parts);
  const uint32_t raw = static_cast<uint32_t>(plain.size());
  Compressor compressor(3);
  std::string z;
  ASSERT_EQ(compressor.Compress(Bytes(plain), &z), Compression::kZstd);
  std::vector<size_t> lengths = {0, 1, 2, 4095, 4096, 4097, raw / 2, raw - 4096, raw - 1, raw};
  for (size_t len : lengths) {
    for (Compression comp : {Compression::kZstd, Compression::kNone}) {
      std::string out(len, '\xee');
      Status st = DecompressPrefix(comp, Bytes(comp == Compression::kZstd ? z : plain), raw,
                                   MutableBytes(&out), "p");
      ASSERT_TRUE(st.ok()) << len << ": " << st.ToString();
      EXPECT_EQ(out, plain.substr(0, len)) << len;
    }
  }
  // More than the plaintext: the caller's mistake.
  for (Compression comp : {Compression::kZstd, Compression::kNone}) {
    std::string out(raw + 1, '\0');
    Status st = DecompressPrefix(comp, Bytes(comp == Compression::kZstd ? z : plain), raw,
                                 MutableBytes(&out), "p");
    EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  }
  std::string one(1, '\0');
  EXPECT_TRUE(
      DecompressPrefix(Compression::kNone, {}, 0, MutableBytes(&one), "p").IsInvalidArgument());
  std::string none;
  EXPECT_TRUE(DecompressPrefix(Compression::kNone, {}, 0, MutableBytes(&none), "p").ok());

  // The payload must hold exactly raw bytes, whatever is asked for.
  for (uint32_t wrong : {raw - 1, raw + 1}) {
    std::string out(10, '\0');
    EXPECT_TRUE(DecompressPrefix(Compression::kZstd, Bytes(z), wrong, MutableBytes(&out), "p")
                    .IsCorruption())
        << wrong;
    EXPECT_TRUE(DecompressPrefix(Compression::kNone, Bytes(plain), wrong, MutableBytes(&out), "p")
                    .IsCorruption())
        << wrong;
  }
  std::string out10(10, '\0');
  EXPECT_TRUE(
      DecompressPrefix(static_cast<Compression>(7), Bytes(plain), raw, MutableBytes(&out10), "p")
          .IsCorruption());

  // A truncated zstd payload cannot deliver what was asked.
  for (size_t cut : std::vector<size_t>{0, 1, 4, 8, z.size() / 2, z.size() - 1}) {
    for (size_t len : std::vector<size_t>{raw, raw - 1, raw / 2 + 1}) {
      std::string out(len, '\0');
      Status st = DecompressPrefix(Compression::kZstd, Bytes(z).first(cut), raw, MutableBytes(&out),
                                   "blk 3");
      EXPECT_TRUE(st.IsCorruption()) << "cut " << cut << " len " << len << ": " << st.ToString();
      EXPECT_NE(st.message().find("blk 3"), std::string::npos) << st.ToString();
    }
  }
  // A zstd frame that declares fewer bytes than the raw length.
  {
    std::string small = Compressible(1000, 1), zs;
    ASSERT_EQ(compressor.Compress(Bytes(small), &zs), Compression::kZstd);
    std::string out(999, '\0');
    EXPECT_TRUE(DecompressPrefix(Compression::kZstd, Bytes(zs), 1001, MutableBytes(&out), "p")
                    .IsCorruption());
  }
}

// DecompressPrefix stops inside the frame; the thread's decoder must be left
// clean for the next call, after a success or a failure.
TEST(DecompressPrefixTest, LeavesTheDecoderCleanForTheNextCall) {
  const std::string plain = Compressible(50000, 3) + RandomBytes(3000, 4) + Compressible(9000, 5);
  const uint32_t raw = static_cast<uint32_t>(plain.size());
  Compressor compressor(3);
  std::string z;
  ASSERT_EQ(compressor.Compress(Bytes(plain), &z), Compression::kZstd);
  std::mt19937_64 rng(7);
  for (int iter = 0; iter < 300; iter++) {
    // A prefix, a damaged or truncated payload, then whole and prefix decodes.
    std::string bad = z;
    if (iter % 2 == 0) {
      bad[6 + rng() % (bad.size() - 6)] ^= static_cast<char>(1 + rng() % 255);
    } else {
      bad.resize(6 + rng() % (bad.size() - 6));
    }
    std::string part(rng() % raw, '\0');
    (void)DecompressPrefix(Compression::kZstd, Bytes(bad), raw, MutableBytes(&part), "p");
    std::string whole;
    ASSERT_TRUE(Decompress(Compression::kZstd, Bytes(z), raw, &whole, "p").ok()) << iter;
    ASSERT_EQ(whole, plain);
    (void)DecompressPrefix(Compression::kZstd, Bytes(bad), raw, MutableBytes(&part), "p");
    std::string prefix(1 + rng() % raw, '\0');
    ASSERT_TRUE(
        DecompressPrefix(Compression::kZstd, Bytes(z), raw, MutableBytes(&prefix), "p").ok())
        << iter;
    ASSERT_EQ(prefix, plain.substr(0, prefix.size())) << iter;
  }
}

TEST(FitsFrameTest, BlockCountsPayloadsAndCapacity) {
  ContainerWriter w(1, 4u << 20);
  EXPECT_FALSE(w.FitsFrame(0, 100));
  EXPECT_FALSE(w.FitsFrame(1, 100));
  EXPECT_TRUE(w.FitsFrame(2, 100));
  EXPECT_TRUE(w.FitsFrame(kMaxFrameBlocks, 100));
  EXPECT_FALSE(w.FitsFrame(kMaxFrameBlocks + 1, 100));
  EXPECT_FALSE(w.FitsFrame(SIZE_MAX, 100));
  EXPECT_TRUE(w.FitsFrame(2, kMaxBlockSize));
  EXPECT_TRUE(w.FitsFrame(kMaxFrameBlocks, kMaxBlockSize));
  EXPECT_FALSE(w.FitsFrame(2, kMaxBlockSize + 1));
  EXPECT_FALSE(w.FitsFrame(2, SIZE_MAX));

  // The capacity bounds the finished object, trailer included.
  const size_t cap = 1000;
  ContainerWriter c(1, cap);
  const size_t fixed = kContainerHeaderSize + kContainerTrailerSize;
  const size_t max2 = cap - fixed - ContainerWriter::FrameRecordSize(2, 0);
  EXPECT_EQ(max2, 1000u - 64 - 16 - 72);
  EXPECT_TRUE(c.FitsFrame(2, max2));
  EXPECT_FALSE(c.FitsFrame(2, max2 + 1));
  EXPECT_TRUE(c.FitsFrame(3, max2 - 36));
  EXPECT_FALSE(c.FitsFrame(3, max2 - 35));
  // A first frame, then the rest of the room for a second one.
  std::string p1 = RandomBytes(300, 1);
  c.AppendFrame(std::vector<FrameBlock>{{Fp(p1.substr(0, 100)), 100}, {Fp(p1.substr(100)), 200}},
                Compression::kNone, Bytes(p1));
  const size_t left = cap - fixed - ContainerWriter::FrameRecordSize(2, 300);
  EXPECT_EQ(c.size(), kContainerHeaderSize + ContainerWriter::FrameRecordSize(2, 300));
  EXPECT_TRUE(c.FitsFrame(2, left - ContainerWriter::FrameRecordSize(2, 0)));
  EXPECT_FALSE(c.FitsFrame(2, left - ContainerWriter::FrameRecordSize(2, 0) + 1));
  EXPECT_FALSE(c.FitsFrame(kMaxFrameBlocks, 1));  // its table alone is too big
  // Block records and frames share the room.
  EXPECT_TRUE(c.Fits(left - kBlockRecordHeaderSize));
  EXPECT_FALSE(c.Fits(left - kBlockRecordHeaderSize + 1));
  const size_t last = left - ContainerWriter::FrameRecordSize(2, 0);
  std::string p2 = RandomBytes(last, 2);
  c.AppendFrame(std::vector<FrameBlock>{{Fp(p2.substr(0, 1)), 1},
                                        {Fp(p2.substr(1)), static_cast<uint32_t>(last - 1)}},
                Compression::kNone, Bytes(p2));
  EXPECT_FALSE(c.FitsFrame(2, 0));
  EXPECT_FALSE(c.FitsFrame(2, 1));
  EXPECT_FALSE(c.Fits(0));
  std::string bytes = c.Finish();
  EXPECT_EQ(bytes.size(), cap);
  std::vector<std::string> plains;
  ASSERT_TRUE(
      ReadAll(bytes, 1,
              {Fp(p1.substr(0, 100)), Fp(p1.substr(100)), Fp(p2.substr(0, 1)), Fp(p2.substr(1))},
              &plains)
          .ok());
  EXPECT_EQ(plains, (std::vector<std::string>{p1.substr(0, 100), p1.substr(100), p2.substr(0, 1),
                                              p2.substr(1)}));

  // 256 blocks: a table of 9216 bytes.
  const size_t cap256 = 10000;
  ContainerWriter d(1, cap256);
  const size_t max256 = cap256 - fixed - ContainerWriter::FrameRecordSize(kMaxFrameBlocks, 0);
  EXPECT_EQ(max256, 10000u - 64 - 16 - 36 * 256);
  EXPECT_TRUE(d.FitsFrame(kMaxFrameBlocks, max256));
  EXPECT_FALSE(d.FitsFrame(kMaxFrameBlocks, max256 + 1));

  ContainerWriter tiny(1, 150);  // header, trailer and a 2-block table: 152
  EXPECT_FALSE(tiny.FitsFrame(2, 0));
  ContainerWriter just(1, 152);
  EXPECT_TRUE(just.FitsFrame(2, 0));
  EXPECT_FALSE(just.FitsFrame(2, 1));
  ContainerWriter big(1, SIZE_MAX);  // clamped to kMaxContainerSize
  EXPECT_TRUE(big.FitsFrame(kMaxFrameBlocks, kMaxBlockSize));
  EXPECT_FALSE(big.FitsFrame(kMaxFrameBlocks, kMaxBlockSize + 1));
}

// A container filled with frames up to its capacity stays within it.
TEST(FitsFrameTest, FullContainerOfFramesStaysWithinCapacity) {
  const size_t cap = 1u << 20;
  ContainerWriter w(3, cap);
  std::vector<std::string> blocks;
  std::vector<Fingerprint> fps;
  uint64_t seed = 1;
  while (true) {
    std::string x = RandomBytes(20000, seed++), y = RandomBytes(12000, seed++);
    std::string xy = x + y;
    if (!w.FitsFrame(2, xy.size())) break;
    w.AppendFrame(std::vector<FrameBlock>{{Fp(x), 20000}, {Fp(y), 12000}}, Compression::kNone,
                  Bytes(xy));
    blocks.push_back(x);
    blocks.push_back(y);
    fps.push_back(Fp(x));
    fps.push_back(Fp(y));
  }
  const size_t record = ContainerWriter::FrameRecordSize(2, 32000);
  EXPECT_EQ(w.record_count(), (cap - 64) / record);
  EXPECT_EQ(w.block_count(), 2 * w.record_count());
  std::string bytes = w.Finish();
  EXPECT_LE(bytes.size(), cap);
  EXPECT_GT(bytes.size() + record, cap);
  std::vector<std::string> plains;
  ASSERT_TRUE(ReadAll(bytes, 3, fps, &plains).ok());
  EXPECT_EQ(plains, blocks);
}

}  // namespace
}  // namespace vmdedup
