// Chunker parameters: which chunker cuts a repository's blocks and with what
// sizes, the rules a valid choice obeys, and kMaxBlockSize, the bound on a
// block (and on one record's plaintext).
//
// The repository's configuration owns these values: they are chosen at init,
// stored in the configuration record (RepoConfig, and each snapshot record
// names the parameters it was cut with) and checked by ValidateRepoConfig at
// init and open. engine/chunker.h owns the chunkers that apply them;
// NewChunker builds one only from parameters that pass
// ValidateChunkerParams. Keeping them here lets store/ validate a
// configuration without depending on engine/.
//
// Pure values and functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"

namespace vmdedup {

// The most plaintext one block or one record holds (a block, or a frame's
// blocks together).
constexpr uint32_t kMaxBlockSize = 1u << 20;  // 1 MiB

enum class ChunkerKind : uint8_t { kFixed = 0, kCdc = 1 };

struct ChunkerParams {
  ChunkerKind kind = ChunkerKind::kCdc;
  uint32_t avg_size = 4096;   // fixed: the block size
  uint32_t min_size = 1024;   // cdc only
  uint32_t max_size = 16384;  // cdc only
};

// OK when a chunker can be built from `params`: avg_size a power of two from
// 1 to kMaxBlockSize bytes; for cdc also min_size and max_size from 1 to
// kMaxBlockSize, avg_size at least 64 and min_size <= avg_size <= max_size
// (fixed ignores min_size and max_size). InvalidArgument otherwise, and for
// an unknown kind.
Status ValidateChunkerParams(const ChunkerParams& params);

const char* ChunkerKindName(ChunkerKind kind);
Result<ChunkerKind> ParseChunkerKind(const std::string& name);

}  // namespace vmdedup
