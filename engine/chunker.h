// Chunkers cut a range of a segment into blocks, the unit of levels 2 and 3.
//
// Two kinds: fixed-size (4 KiB) and content-defined (a Gear-hash FastCDC
// variant with normalized chunking: ~4 KiB average, 1 KiB min, 16 KiB max).
// A chunker always ends its last block at the end of the range it is given,
// so blocks never cross a segment boundary (the caller passes at most one
// segment). Chunkers are immutable after construction and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace vmdedup {

enum class ChunkerKind : uint8_t { kFixed = 0, kCdc = 1 };

struct ChunkerParams {
  ChunkerKind kind = ChunkerKind::kCdc;
  uint32_t avg_size = 4096;   // fixed: the block size
  uint32_t min_size = 1024;   // cdc only
  uint32_t max_size = 16384;  // cdc only
};

class Chunker {
 public:
  virtual ~Chunker() = default;
  // Appends the lengths of consecutive blocks covering all of `data` to
  // `lengths` (their sum equals data.size()).
  virtual void Cut(std::span<const uint8_t> data, std::vector<uint32_t>* lengths) const = 0;
  virtual const ChunkerParams& params() const = 0;
};

Result<std::unique_ptr<Chunker>> NewChunker(const ChunkerParams& params);
const char* ChunkerKindName(ChunkerKind kind);
Result<ChunkerKind> ParseChunkerKind(const std::string& name);

}  // namespace vmdedup
