// Level 3 of the pipeline: lookup of a block fingerprint in the common data
// set (CDS), the small shared set of the most popular blocks across VMs.
//
// The CDS implementation is CdsIndex (engine/cds_index.h); EmptyCommonBlockIndex
// finds nothing (a repository without a CDS). Implementations are immutable
// once loaded and safe for concurrent Lookup from many threads.
#pragma once

#include <optional>

#include "base/fingerprint.h"
#include "store/records.h"

namespace vmdedup {

class CommonBlockIndex {
 public:
  virtual ~CommonBlockIndex() = default;
  // Where the CDS area holds the block whose fingerprint is `fp` (a BlockRef
  // of kind kCds), or nothing. Must be exact: never a prefix-only match.
  virtual std::optional<BlockRef> Lookup(const Fingerprint& fp) const = 0;
  // The CDS version looked up in, recorded in the snapshot (0: none).
  virtual uint64_t version() const { return 0; }
};

class EmptyCommonBlockIndex final : public CommonBlockIndex {
 public:
  std::optional<BlockRef> Lookup(const Fingerprint&) const override { return std::nullopt; }
};

}  // namespace vmdedup
