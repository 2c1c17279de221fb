// Chunker parameters and their validation; see chunker_params.h.
#include "store/chunker_params.h"

#include <bit>

namespace vmdedup {
namespace {

// Smallest CDC average: the easier mask (engine/chunker.cc) must keep a few
// bits.
constexpr uint32_t kMinCdcAverage = 64;

Status ValidateSize(const char* what, uint32_t v) {
  if (v == 0) return Status::InvalidArgument(std::string("chunker: ") + what + " is zero");
  if (v > kMaxBlockSize) {
    return Status::InvalidArgument(std::string("chunker: ") + what + " " + std::to_string(v) +
                                   " exceeds 1 MiB");
  }
  return Status::OK();
}

}  // namespace

Status ValidateChunkerParams(const ChunkerParams& params) {
  RETURN_IF_ERROR(ValidateSize("avg_size", params.avg_size));
  if (!std::has_single_bit(params.avg_size)) {
    return Status::InvalidArgument("chunker: avg_size " + std::to_string(params.avg_size) +
                                   " is not a power of two");
  }
  switch (params.kind) {
    case ChunkerKind::kFixed:
      // min_size and max_size are not used by the fixed chunker.
      return Status::OK();
    case ChunkerKind::kCdc:
      RETURN_IF_ERROR(ValidateSize("min_size", params.min_size));
      RETURN_IF_ERROR(ValidateSize("max_size", params.max_size));
      if (params.avg_size < kMinCdcAverage) {
        return Status::InvalidArgument("chunker: cdc avg_size " + std::to_string(params.avg_size) +
                                       " is below " + std::to_string(kMinCdcAverage));
      }
      if (params.min_size > params.avg_size || params.avg_size > params.max_size) {
        return Status::InvalidArgument("chunker: need min_size <= avg_size <= max_size, got " +
                                       std::to_string(params.min_size) + " / " +
                                       std::to_string(params.avg_size) + " / " +
                                       std::to_string(params.max_size));
      }
      return Status::OK();
  }
  return Status::InvalidArgument("chunker: unknown kind " +
                                 std::to_string(static_cast<int>(params.kind)));
}

const char* ChunkerKindName(ChunkerKind kind) {
  switch (kind) {
    case ChunkerKind::kFixed:
      return "fixed";
    case ChunkerKind::kCdc:
      return "cdc";
  }
  return "unknown";
}

Result<ChunkerKind> ParseChunkerKind(const std::string& name) {
  if (name == "fixed") return ChunkerKind::kFixed;
  if (name == "cdc") return ChunkerKind::kCdc;
  return Status::InvalidArgument("unknown chunker kind \"" + name + "\" (want fixed or cdc)");
}

}  // namespace vmdedup
