// Fixed-size and content-defined (FastCDC) chunkers; see chunker.h.
//
// The CDC cut points are part of the repository's long-term behaviour: a
// change to the Gear table, its seed, the masks or the cut rule does not break
// correctness, but blocks cut by the new rule no longer match those stored by
// the old one, so dedup against older snapshots is lost. The golden test in
// tests/chunker_test.cc pins them.
#include "engine/chunker.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <string>

namespace vmdedup {
namespace {

// Normalization level: the harder mask has log2(avg) + kNormalization bits,
// the easier one log2(avg) - kNormalization (ValidateChunkerParams keeps a cdc
// average at 64 or more, so the easier mask keeps at least 4 bits).
constexpr int kNormalization = 2;
// A Gear hash depends on the last 64 bytes only (each step shifts one bit
// out). Hashing starts this many bytes before the first eligible cut, so every
// cut decision is a function of the content alone, not of where the block
// began; boundaries resynchronize sooner after an edit.
constexpr uint32_t kWarmup = 64;

// splitmix64 (Steele, Lea, Flood 2014): a fixed-seed generator for the table.
constexpr uint64_t SplitMix64(uint64_t& state) {
  state += 0x9e3779b97f4a7c15ULL;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr std::array<uint64_t, 256> MakeGearTable() {
  std::array<uint64_t, 256> table{};
  uint64_t state = 0x766d64656475702dULL;  // "vmdedup-": never change it
  for (auto& v : table) v = SplitMix64(state);
  return table;
}

constexpr std::array<uint64_t, 256> kGear = MakeGearTable();

// A mask of the `bits` most significant bits. The top bits of a Gear hash mix
// the most bytes (bit j depends on the last j + 1 bytes), so masks use them.
constexpr uint64_t TopBitsMask(int bits) { return ~uint64_t{0} << (64 - bits); }

class FixedChunker final : public Chunker {
 public:
  explicit FixedChunker(const ChunkerParams& params) : params_(params) {}

  void Cut(std::span<const uint8_t> data, std::vector<uint32_t>* lengths) const override {
    const size_t block = params_.avg_size;
    const size_t full = data.size() / block;
    const size_t rest = data.size() % block;
    lengths->reserve(lengths->size() + full + (rest ? 1 : 0));
    lengths->insert(lengths->end(), full, params_.avg_size);
    if (rest) lengths->push_back(static_cast<uint32_t>(rest));
  }
  const ChunkerParams& params() const override { return params_; }

 private:
  ChunkerParams params_;
};

class CdcChunker final : public Chunker {
 public:
  explicit CdcChunker(const ChunkerParams& params)
      : params_(params),
        mask_hard_(TopBitsMask(std::countr_zero(params.avg_size) + kNormalization)),
        mask_easy_(TopBitsMask(std::countr_zero(params.avg_size) - kNormalization)) {}

  void Cut(std::span<const uint8_t> data, std::vector<uint32_t>* lengths) const override {
    lengths->reserve(lengths->size() + data.size() / params_.avg_size + 1);
    const uint8_t* p = data.data();
    size_t left = data.size();
    while (left > 0) {
      const size_t len = NextCut(p, left);
      lengths->push_back(static_cast<uint32_t>(len));
      p += len;
      left -= len;
    }
  }
  const ChunkerParams& params() const override { return params_; }

 private:
  // Rolls the Gear hash over p[*i, end) and returns true with *i = the cut
  // length when a position matches `mask`; otherwise *i = end. Two bytes a
  // step: the 2-step hash 4h + (2g0 + g1) keeps the dependency chain at one
  // shift-add for two bytes; h1 (after the first byte) is tested off-chain.
  static bool Scan(const uint8_t* p, size_t* i, size_t end, uint64_t mask, uint64_t* hash) {
    uint64_t h = *hash;
    size_t j = *i;
    for (; j + 2 <= end; j += 2) {
      const uint64_t g0 = kGear[p[j]];
      const uint64_t g1 = kGear[p[j + 1]];
      const uint64_t h1 = (h << 1) + g0;
      h = (h << 2) + ((g0 << 1) + g1);
      if (((h1 & mask) == 0) | ((h & mask) == 0)) [[unlikely]] {
        *i = (h1 & mask) == 0 ? j + 1 : j + 2;
        return true;
      }
    }
    for (; j < end; ++j) {
      h = (h << 1) + kGear[p[j]];
      if ((h & mask) == 0) {
        *i = j + 1;
        return true;
      }
    }
    *i = end;
    *hash = h;
    return false;
  }

  // The length of the block starting at p, of the n bytes left (n > 0).
  // Byte j is hashed, then the cut "after byte j" (length j + 1) is tested.
  size_t NextCut(const uint8_t* p, size_t n) const {
    const size_t min = params_.min_size;
    if (n <= min) return n;
    if (n > params_.max_size) n = params_.max_size;
    // Lengths [min, normal) use the harder mask, [normal, n] the easier one.
    const size_t normal = std::min<size_t>(params_.avg_size, n);
    uint64_t h = 0;
    size_t i = min > kWarmup ? min - kWarmup : 0;
    for (; i + 1 < min; ++i) h = (h << 1) + kGear[p[i]];
    // Here i = min - 1: testing after byte j gives length j + 1 >= min.
    if (Scan(p, &i, normal - 1, mask_hard_, &h)) return i;
    if (Scan(p, &i, n, mask_easy_, &h)) return i;
    return n;
  }

  ChunkerParams params_;
  uint64_t mask_hard_;
  uint64_t mask_easy_;
};

}  // namespace

Result<std::unique_ptr<Chunker>> NewChunker(const ChunkerParams& params) {
  RETURN_IF_ERROR(ValidateChunkerParams(params));
  switch (params.kind) {
    case ChunkerKind::kFixed:
      return std::unique_ptr<Chunker>(new FixedChunker(params));
    case ChunkerKind::kCdc:
      return std::unique_ptr<Chunker>(new CdcChunker(params));
  }
  // Not reached: ValidateChunkerParams rejects an unknown kind.
  return Status::InvalidArgument("chunker: unknown kind " +
                                 std::to_string(static_cast<int>(params.kind)));
}

}  // namespace vmdedup
