// Chunkers cut a range of a segment into blocks, the unit of levels 2 and 3.
//
// Two kinds: fixed-size (4 KiB) and content-defined (a Gear-hash FastCDC
// variant with normalized chunking: ~4 KiB average, 1 KiB min, 16 KiB max).
// A chunker always ends its last block at the end of the range it is given,
// so blocks never cross a segment boundary (the caller passes at most one
// segment). Chunkers are immutable after construction and thread-safe.
//
// The parameters (ChunkerParams), their validation and kMaxBlockSize belong to
// the repository's configuration and live in store/chunker_params.h; this
// file owns only the chunkers that apply them.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "base/status.h"
#include "store/chunker_params.h"

namespace vmdedup {

class Chunker {
 public:
  virtual ~Chunker() = default;
  // Appends the lengths of consecutive blocks covering all of `data` to
  // `lengths` (their sum equals data.size()).
  virtual void Cut(std::span<const uint8_t> data, std::vector<uint32_t>* lengths) const = 0;
  virtual const ChunkerParams& params() const = 0;
};

// A chunker for `params`; InvalidArgument when ValidateChunkerParams rejects
// them.
Result<std::unique_ptr<Chunker>> NewChunker(const ChunkerParams& params);

}  // namespace vmdedup
