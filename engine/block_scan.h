// Block scanning helpers for level 0: finding all-zero blocks without hashing
// them.
//
// Pure functions over caller-owned memory; they keep no state and are safe to
// call from any thread.
#pragma once

#include <cstdint>
#include <span>

namespace vmdedup {

// True when every byte of `data` is zero (also for an empty span). Reads a
// machine word at a time after an unaligned head and stops at the first
// nonzero 64-byte group, so a typical nonzero block costs a few loads.
bool IsAllZero(std::span<const uint8_t> data);

}  // namespace vmdedup
