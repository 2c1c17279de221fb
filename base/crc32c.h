// CRC-32C (Castagnoli), the checksum on every stored record.
//
// Uses the SSE4.2 instruction when the CPU has it, a table otherwise. Masked
// values (as LevelDB does) are what is stored, so that a CRC of data that
// itself embeds CRCs does not degenerate. Pure functions; thread-safe.
// Both code paths are reachable by name (ExtendTable, ExtendSse42) so that
// tests check each against known answers, whichever Extend picks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace vmdedup::crc32c {

// Extends `crc` (the CRC of some preceding bytes, 0 for none) with `data`.
uint32_t Extend(uint32_t crc, const void* data, size_t n);
inline uint32_t Value(const void* data, size_t n) { return Extend(0, data, n); }
inline uint32_t Value(std::span<const uint8_t> data) { return Extend(0, data.data(), data.size()); }

// The table-driven path (any CPU).
uint32_t ExtendTable(uint32_t crc, const void* data, size_t n);
// True when this CPU has SSE4.2's CRC32 instruction; only then may
// ExtendSse42 be called.
bool HaveSse42();
uint32_t ExtendSse42(uint32_t crc, const void* data, size_t n);

constexpr uint32_t kMaskDelta = 0xa282ead8u;
inline uint32_t Mask(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + kMaskDelta; }
inline uint32_t Unmask(uint32_t masked) {
  uint32_t rot = masked - kMaskDelta;
  return ((rot >> 17) | (rot << 15));
}

}  // namespace vmdedup::crc32c
