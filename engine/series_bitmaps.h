// The names of the dirty bitmaps vmdedup keeps for a disk series, in qcow2
// images and in QEMU (docs/format.md, "Dirty bitmap names"):
// vmdedup.SERIES.SEQ.NONCE. SERIES is derived from the repository id, the
// VM and the disk without ambiguity (two series never share it), NONCE is
// drawn at each backup, and a snapshot records the whole name it continues
// with: a bitmap made by another series, another copy of the repository or
// another tool is never taken for it.
//
// Pure functions (NewSeriesBitmapName draws from std::random_device);
// thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace vmdedup {

// "vmdedup.SERIES.", SERIES the first 16 hex digits of SHA-256(repo id,
// 0x00, VM, 0x00, disk).
std::string SeriesBitmapPrefix(const std::string& repo_id, const std::string& vm,
                               const std::string& disk);
// PREFIX + SEQ + "." + 8 random hex digits.
std::string NewSeriesBitmapName(const std::string& prefix, uint64_t seq);
// The SEQ of a name NewSeriesBitmapName makes with this prefix; nullopt for
// every other name (another series', another tool's, the older scheme's).
std::optional<uint64_t> SeriesBitmapSeq(const std::string& name, const std::string& prefix);

}  // namespace vmdedup
