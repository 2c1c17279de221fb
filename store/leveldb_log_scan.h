// Where a LevelDB write-ahead log is damaged, read with LevelDB's documented
// log format (doc/log_format.md in LevelDB's sources: 32 KiB blocks of
// records, each with a masked CRC-32C of its type and data, a length and a
// type). The metadata store uses it to tell the tail an interrupted write
// leaves (damage with nothing readable after it: what a power cut does to
// batches written after the last sync) from damage before records that are
// still whole (the medium failed under data that was synced: never to be
// dropped silently).
//
// Pure functions of a file's bytes; thread-safe.
#pragma once

#include <string>
#include <string_view>

#include "base/status.h"

namespace vmdedup {

enum class LevelDbLogState {
  kWhole,        // every record is whole
  kTornTail,     // damage, and no whole record after it
  kDamagedBody,  // damage followed by at least one whole record
};

LevelDbLogState ScanLevelDbLog(std::string_view log);
// The state of every *.log file in LevelDB directory `dir` together: the
// worst of them. IOError when a log cannot be read.
Result<LevelDbLogState> ScanLevelDbLogs(const std::string& dir);

}  // namespace vmdedup
