// Tests for the fixed and content-defined chunkers (engine/chunker.h) and
// their parameters' validation (store/chunker_params.h).
#include "engine/chunker.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <set>
#include <vector>

#include "store/chunker_params.h"

namespace vmdedup {
namespace {

// Own generator (not tests/test_util) so the golden cut points below depend
// on nothing outside this file and the chunker.
std::vector<uint8_t> Random(size_t n, uint64_t seed) {
  std::vector<uint8_t> out(n);
  uint64_t s = seed;
  for (size_t i = 0; i < n; i += 8) {
    s += 0x9e3779b97f4a7c15ULL;
    uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    for (size_t j = 0; j < 8 && i + j < n; ++j) out[i + j] = static_cast<uint8_t>(z >> (8 * j));
  }
  return out;
}

std::unique_ptr<Chunker> Make(ChunkerParams p) {
  auto c = NewChunker(p);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return std::move(c).value();
}

ChunkerParams Cdc(uint32_t min, uint32_t avg, uint32_t max) {
  return ChunkerParams{ChunkerKind::kCdc, avg, min, max};
}

ChunkerParams Fixed(uint32_t size) {
  ChunkerParams p;
  p.kind = ChunkerKind::kFixed;
  p.avg_size = size;
  return p;
}

std::vector<uint32_t> CutAll(const Chunker& c, std::span<const uint8_t> data) {
  std::vector<uint32_t> lengths;
  c.Cut(data, &lengths);
  return lengths;
}

// Absolute end offsets of the blocks.
std::vector<uint64_t> Ends(const std::vector<uint32_t>& lengths) {
  std::vector<uint64_t> ends;
  uint64_t off = 0;
  for (uint32_t l : lengths) ends.push_back(off += l);
  return ends;
}

uint64_t Sum(const std::vector<uint32_t>& lengths) {
  return std::accumulate(lengths.begin(), lengths.end(), uint64_t{0});
}

TEST(ChunkerTest, FixedGivesExactBlocks) {
  auto c = Make(Fixed(4096));
  auto data = Random(10 * 4096, 1);
  EXPECT_EQ(CutAll(*c, data), std::vector<uint32_t>(10, 4096));
  data.resize(10 * 4096 + 100);
  auto lengths = CutAll(*c, data);
  ASSERT_EQ(lengths.size(), 11u);
  EXPECT_EQ(lengths.back(), 100u);
  lengths.pop_back();
  EXPECT_EQ(lengths, std::vector<uint32_t>(10, 4096));
  EXPECT_EQ(CutAll(*c, std::span(data).first(17)), std::vector<uint32_t>{17});
}

TEST(ChunkerTest, EmptyInputGivesNoBlocks) {
  for (auto p : {Fixed(4096), ChunkerParams{}}) {
    auto c = Make(p);
    EXPECT_TRUE(CutAll(*c, {}).empty()) << ChunkerKindName(p.kind);
  }
}

TEST(ChunkerTest, AppendsToExistingLengths) {
  for (auto p : {Fixed(4096), ChunkerParams{}}) {
    auto c = Make(p);
    auto data = Random(100000, 2);
    std::vector<uint32_t> lengths = {7};
    c->Cut(data, &lengths);
    ASSERT_GT(lengths.size(), 1u);
    EXPECT_EQ(lengths[0], 7u);
    EXPECT_EQ(Sum(lengths), 7u + data.size());
  }
}

TEST(ChunkerTest, LengthsSumToInput) {
  for (auto p : {Fixed(4096), ChunkerParams{}, Cdc(2048, 8192, 65536), Cdc(64, 64, 64)}) {
    auto c = Make(p);
    for (size_t n : {size_t{1}, size_t{63}, size_t{1023}, size_t{1024}, size_t{1025}, size_t{4096},
                     size_t{5000}, size_t{16384}, size_t{16385}, size_t{(1 << 20) + 7}}) {
      auto data = Random(n, n);
      auto lengths = CutAll(*c, data);
      EXPECT_EQ(Sum(lengths), n) << ChunkerKindName(p.kind) << " n=" << n;
      for (uint32_t l : lengths) EXPECT_GT(l, 0u);
    }
  }
}

// Every block but the last is within [min, max]; the last is within (0, max].
void ExpectBounds(const ChunkerParams& p, std::span<const uint8_t> data, const char* what) {
  auto c = Make(p);
  auto lengths = CutAll(*c, data);
  ASSERT_EQ(Sum(lengths), data.size()) << what;
  ASSERT_FALSE(lengths.empty()) << what;
  for (size_t i = 0; i + 1 < lengths.size(); ++i) {
    ASSERT_GE(lengths[i], p.min_size) << what << " block " << i;
    ASSERT_LE(lengths[i], p.max_size) << what << " block " << i;
  }
  EXPECT_GT(lengths.back(), 0u) << what;
  EXPECT_LE(lengths.back(), p.max_size) << what;
}

TEST(ChunkerTest, CdcRespectsMinAndMax) {
  const auto random = Random(8 << 20, 3);
  const std::vector<uint8_t> zeros(1 << 20, 0);
  std::vector<uint8_t> pattern(1 << 20);  // low entropy: period 7
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(i % 7);
  for (auto p : {ChunkerParams{}, Cdc(2048, 8192, 65536), Cdc(4096, 4096, 4096),
                 Cdc(64, 1024, 1 << 20), Cdc(1 << 20, 1 << 20, 1 << 20)}) {
    ExpectBounds(p, random, "random");
    ExpectBounds(p, zeros, "zeros");
    ExpectBounds(p, pattern, "pattern");
  }
  // Data with no natural cut (zeros) is cut at max_size exactly.
  auto lengths = CutAll(*Make(ChunkerParams{}), zeros);
  for (size_t i = 0; i + 1 < lengths.size(); ++i) EXPECT_EQ(lengths[i], 16384u);
}

TEST(ChunkerTest, CdcLastBlockMayBeShorterThanMin) {
  auto c = Make(ChunkerParams{});
  auto data = Random(100, 4);
  EXPECT_EQ(CutAll(*c, data), std::vector<uint32_t>{100});
  // Zeros have no natural cut: one block at max, then 10 bytes.
  auto zeros = std::vector<uint8_t>(16384 + 10, 0);
  EXPECT_EQ(CutAll(*c, zeros), (std::vector<uint32_t>{16384, 10}));
}

TEST(ChunkerTest, Deterministic) {
  auto data = Random(4 << 20, 5);
  for (auto p : {Fixed(4096), ChunkerParams{}}) {
    auto a = Make(p);
    auto b = Make(p);
    auto first = CutAll(*a, data);
    EXPECT_EQ(first, CutAll(*a, data));
    EXPECT_EQ(first, CutAll(*b, data));
  }
}

// No state carries over from one block to the next: the data after a cut
// point is cut the same way whether it is chunked alone or in context.
TEST(ChunkerTest, CdcCutsDependOnContentNotOffset) {
  auto c = Make(ChunkerParams{});
  auto data = Random(1 << 20, 6);
  auto lengths = CutAll(*c, data);
  ASSERT_GT(lengths.size(), 20u);
  size_t start = lengths[0] + lengths[1] + lengths[2];
  auto tail = CutAll(*c, std::span(data).subspan(start));
  EXPECT_EQ(tail, std::vector<uint32_t>(lengths.begin() + 3, lengths.end()));
}

// Fraction of the original block ends at or after `from` that reappear, moved
// by `shift`, in `edited`.
double Resynced(const std::vector<uint64_t>& original, const std::vector<uint64_t>& edited,
                uint64_t from, int64_t shift) {
  std::set<uint64_t> edited_set(edited.begin(), edited.end());
  size_t total = 0, found = 0;
  for (uint64_t e : original) {
    if (e < from) continue;
    ++total;
    found += edited_set.count(static_cast<uint64_t>(static_cast<int64_t>(e) + shift));
  }
  return total ? static_cast<double>(found) / static_cast<double>(total) : 0.0;
}

TEST(ChunkerTest, CdcResynchronizesAfterInsertAndDelete) {
  auto c = Make(ChunkerParams{});
  const auto data = Random(8 << 20, 7);
  const size_t edit = 4 << 20;
  const auto before = Ends(CutAll(*c, data));

  for (size_t n : {size_t{1}, size_t{100}, size_t{5000}}) {
    auto inserted = data;
    auto extra = Random(n, 100 + n);
    inserted.insert(inserted.begin() + edit, extra.begin(), extra.end());
    const auto after = Ends(CutAll(*c, inserted));
    // Before the edit: identical up to the block containing it.
    std::set<uint64_t> after_set(after.begin(), after.end());
    for (uint64_t e : before) {
      if (e <= edit) {
        EXPECT_TRUE(after_set.count(e)) << "end " << e;
      }
    }
    // After the edit: nearly every cut comes back, shifted by n.
    EXPECT_GT(Resynced(before, after, edit + 16384 * 2, static_cast<int64_t>(n)), 0.99)
        << "insert " << n;
    // Almost all cut points after the edit coincide, counting from the edit itself.
    EXPECT_GT(Resynced(before, after, edit, static_cast<int64_t>(n)), 0.98) << "insert " << n;

    auto removed = data;
    removed.erase(removed.begin() + edit, removed.begin() + edit + n);
    const auto after_rm = Ends(CutAll(*c, removed));
    EXPECT_GT(Resynced(before, after_rm, edit + n + 16384 * 2, -static_cast<int64_t>(n)), 0.99)
        << "delete " << n;
  }

  // The same insertion shifts every later fixed-size block: no resync at all.
  auto f = Make(Fixed(4096));
  auto inserted = data;
  inserted.insert(inserted.begin() + edit, 100, 0xab);
  EXPECT_LT(Resynced(Ends(CutAll(*f, data)), Ends(CutAll(*f, inserted)), edit + 4096, 100), 0.01);
}

void ExpectAverage(const ChunkerParams& p, uint64_t seed) {
  auto c = Make(p);
  auto data = Random(32 << 20, seed);
  auto lengths = CutAll(*c, data);
  double avg = static_cast<double>(data.size()) / static_cast<double>(lengths.size());
  EXPECT_GT(avg, 0.75 * p.avg_size) << "avg_size " << p.avg_size;
  EXPECT_LT(avg, 1.25 * p.avg_size) << "avg_size " << p.avg_size;
}

TEST(ChunkerTest, CdcAverageNearTarget) {
  ExpectAverage(ChunkerParams{}, 8);
  ExpectAverage(Cdc(2048, 8192, 65536), 9);
  ExpectAverage(Cdc(16384, 65536, 262144), 10);
}

// Pins the cut points: any change to the Gear table, masks or cut rule moves
// block boundaries and loses dedup against blocks stored by older versions.
// Update these numbers only for a deliberate, documented format change.
TEST(ChunkerTest, CdcGoldenCutPoints) {
  auto c = Make(ChunkerParams{});
  auto lengths = CutAll(*c, Random(1 << 20, 42));
  uint64_t h = 1469598103934665603ULL;  // FNV-1a over the lengths
  for (uint32_t l : lengths) h = (h ^ l) * 1099511628211ULL;
  std::vector<uint32_t> first(lengths.begin(), lengths.begin() + 8);
  EXPECT_EQ(first, (std::vector<uint32_t>{4385, 1890, 2564, 4529, 1181, 4546, 5097, 4649}));
  EXPECT_EQ(lengths.size(), 230u);
  EXPECT_EQ(h, 1842037739140225681ULL);
}

TEST(ChunkerTest, RejectsBadParams) {
  const std::vector<ChunkerParams> bad = {
      Fixed(0),
      Fixed(3000),
      Fixed(2u << 20),
      Cdc(1024, 0, 16384),
      Cdc(0, 4096, 16384),
      Cdc(1024, 4096, 0),
      Cdc(1024, 3000, 16384),           // avg not a power of two
      Cdc(8192, 4096, 16384),           // min > avg
      Cdc(1024, 4096, 2048),            // avg > max
      Cdc(1024, 4096, (1u << 20) + 1),  // max > 1 MiB
      Cdc(1024, 2u << 20, 4u << 20),
      Cdc(16, 32, 64),  // avg too small for the masks
      ChunkerParams{static_cast<ChunkerKind>(7), 4096, 1024, 16384},
  };
  for (const auto& p : bad) {
    // The repository's configuration checks them without a chunker
    // (ValidateChunkerParams); NewChunker refuses them with the same status.
    Status st = ValidateChunkerParams(p);
    EXPECT_TRUE(st.IsInvalidArgument())
        << p.min_size << "/" << p.avg_size << "/" << p.max_size << ": " << st.ToString();
    auto c = NewChunker(p);
    EXPECT_FALSE(c.ok()) << p.min_size << "/" << p.avg_size << "/" << p.max_size;
    if (!c.ok()) {
      EXPECT_TRUE(c.status().IsInvalidArgument()) << c.status().ToString();
      EXPECT_EQ(c.status().message(), st.message());
    }
  }
  // Limits themselves are fine; fixed ignores min and max.
  const std::vector<ChunkerParams> good = {
      Cdc(1 << 20, 1 << 20, 1 << 20),
      Cdc(64, 64, 64),
      Fixed(1 << 20),
      ChunkerParams{ChunkerKind::kFixed, 65536, 0, 0},
      ChunkerParams{},
  };
  for (const auto& p : good) {
    Status st = ValidateChunkerParams(p);
    EXPECT_TRUE(st.ok()) << p.min_size << "/" << p.avg_size << "/" << p.max_size << ": "
                         << st.ToString();
    EXPECT_TRUE(NewChunker(p).ok()) << p.min_size << "/" << p.avg_size << "/" << p.max_size;
  }
}

TEST(ChunkerTest, ValidationMessages) {
  EXPECT_EQ(ValidateChunkerParams(Fixed(0)).message(), "chunker: avg_size is zero");
  EXPECT_EQ(ValidateChunkerParams(Fixed(2u << 20)).message(),
            "chunker: avg_size 2097152 exceeds 1 MiB");
  EXPECT_EQ(ValidateChunkerParams(Fixed(3000)).message(),
            "chunker: avg_size 3000 is not a power of two");
  EXPECT_EQ(ValidateChunkerParams(Cdc(1024, 4096, 0)).message(), "chunker: max_size is zero");
  EXPECT_EQ(ValidateChunkerParams(Cdc(16, 32, 64)).message(),
            "chunker: cdc avg_size 32 is below 64");
  EXPECT_EQ(ValidateChunkerParams(Cdc(8192, 4096, 16384)).message(),
            "chunker: need min_size <= avg_size <= max_size, got 8192 / 4096 / 16384");
  EXPECT_EQ(ValidateChunkerParams(ChunkerParams{static_cast<ChunkerKind>(7), 4096, 1024, 16384})
                .message(),
            "chunker: unknown kind 7");
  EXPECT_EQ(kMaxBlockSize, 1u << 20);
}

TEST(ChunkerTest, ParamsAreKept) {
  auto c = Make(Cdc(2048, 8192, 65536));
  EXPECT_EQ(c->params().kind, ChunkerKind::kCdc);
  EXPECT_EQ(c->params().min_size, 2048u);
  EXPECT_EQ(c->params().avg_size, 8192u);
  EXPECT_EQ(c->params().max_size, 65536u);
}

TEST(ChunkerTest, KindNames) {
  for (auto kind : {ChunkerKind::kFixed, ChunkerKind::kCdc}) {
    auto parsed = ParseChunkerKind(ChunkerKindName(kind));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, kind);
  }
  EXPECT_STREQ(ChunkerKindName(ChunkerKind::kFixed), "fixed");
  EXPECT_STREQ(ChunkerKindName(ChunkerKind::kCdc), "cdc");
  for (const char* bad : {"", "CDC", "fastcdc", "fixed "}) {
    auto parsed = ParseChunkerKind(bad);
    EXPECT_FALSE(parsed.ok()) << bad;
    if (!parsed.ok()) {
      EXPECT_TRUE(parsed.status().IsInvalidArgument());
    }
  }
}

}  // namespace
}  // namespace vmdedup
