// Level 3 of the pipeline: lookup of a block fingerprint in the common data
// set (CDS), the small shared set of the most popular blocks across VMs.
//
// The CDS implementation (index, build, shared area) comes with its own
// issue; until then EmptyCommonBlockIndex finds nothing. Implementations are
// immutable once published and safe for concurrent Lookup from many threads.
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
};

class EmptyCommonBlockIndex final : public CommonBlockIndex {
 public:
  std::optional<BlockRef> Lookup(const Fingerprint&) const override { return std::nullopt; }
};

}  // namespace vmdedup
