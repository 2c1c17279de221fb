// ScanLevelDbLog; see leveldb_log_scan.h.
#include "store/leveldb_log_scan.h"

#include <dirent.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <vector>

#include "base/crc32c.h"

namespace vmdedup {
namespace {

constexpr size_t kBlockSize = 32768;
constexpr size_t kHeaderSize = 7;  // masked crc (4), length (2), type (1)
constexpr uint8_t kFirstRecordType = 1, kLastRecordType = 4;  // full, first, middle, last

uint32_t Le32(const char* p) {
  const auto* u = reinterpret_cast<const uint8_t*>(p);
  return uint32_t{u[0]} | uint32_t{u[1]} << 8 | uint32_t{u[2]} << 16 | uint32_t{u[3]} << 24;
}

// True when a whole record starts at `offset`: its header fits in the
// block, its type is one of the four, its data fits in the block, and the
// CRC of its type and data matches. Sets `size` to the record's size.
bool WholeRecordAt(std::string_view log, size_t offset, size_t* size) {
  const size_t block_left = kBlockSize - offset % kBlockSize;
  const size_t left = std::min(block_left, log.size() - offset);
  if (left < kHeaderSize) return false;
  const char* h = log.data() + offset;
  const size_t length = static_cast<uint8_t>(h[4]) | static_cast<size_t>(static_cast<uint8_t>(h[5]))
                                                         << 8;
  const uint8_t type = static_cast<uint8_t>(h[6]);
  if (type < kFirstRecordType || type > kLastRecordType || kHeaderSize + length > left)
    return false;
  // The CRC covers the type byte and the data.
  const uint32_t crc = crc32c::Extend(crc32c::Value(h + 6, 1), h + kHeaderSize, length);
  if (crc32c::Unmask(Le32(h)) != crc) return false;
  *size = kHeaderSize + length;
  return true;
}

}  // namespace

LevelDbLogState ScanLevelDbLog(std::string_view log) {
  size_t offset = 0;
  while (offset < log.size()) {
    const size_t block_left = kBlockSize - offset % kBlockSize;
    if (block_left < kHeaderSize) {  // the writer's zero trailer of a block
      offset += block_left;
      continue;
    }
    size_t size = 0;
    if (WholeRecordAt(log, offset, &size)) {
      offset += size;
      continue;
    }
    // Damage. A damaged header says nothing reliable about where the next
    // record starts: look for a whole one at every later byte (a false
    // match in damaged bytes needs a 32-bit CRC to match by chance).
    for (size_t at = offset + 1; at < log.size(); at++)
      if (WholeRecordAt(log, at, &size)) return LevelDbLogState::kDamagedBody;
    return LevelDbLogState::kTornTail;
  }
  return LevelDbLogState::kWhole;
}

Result<LevelDbLogState> ScanLevelDbLogs(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return Status::FromErrno(errno, "list " + dir);
  std::vector<std::string> logs;
  while (struct dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".log") == 0) logs.push_back(name);
  }
  ::closedir(d);
  LevelDbLogState worst = LevelDbLogState::kWhole;
  for (const std::string& name : logs) {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    if (!in) return Status::IOError("read " + dir + "/" + name);
    const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) return Status::IOError("read " + dir + "/" + name);
    worst = std::max(worst, ScanLevelDbLog(data));
  }
  return worst;
}

}  // namespace vmdedup
