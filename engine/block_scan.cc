// IsAllZero; see block_scan.h.
#include "engine/block_scan.h"

#include <cstddef>
#include <cstring>

namespace vmdedup {
namespace {

// memcpy keeps the word loads free of alignment and aliasing problems; it
// compiles to plain (vector) loads.
inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

}  // namespace

bool IsAllZero(std::span<const uint8_t> data) {
  const uint8_t* p = data.data();
  size_t n = data.size();
  // Unaligned head, byte by byte, up to a word boundary.
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & (sizeof(uint64_t) - 1)) != 0) {
    if (*p != 0) return false;
    ++p;
    --n;
  }
  // 64 bytes per step: OR eight words, one branch.
  while (n >= 64) {
    uint64_t acc = 0;
    for (size_t i = 0; i < 64; i += 8) acc |= Load64(p + i);
    if (acc != 0) return false;
    p += 64;
    n -= 64;
  }
  uint64_t acc = 0;
  for (; n >= 8; p += 8, n -= 8) acc |= Load64(p);
  for (; n > 0; ++p, --n) acc |= *p;
  return acc == 0;
}

}  // namespace vmdedup
