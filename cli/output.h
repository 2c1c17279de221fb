// Output helpers for the vmdedup command: human-readable sizes, a progress
// line on stderr when it is a terminal, JSON forms of records, and the exit
// codes every command shares. Single-threaded except ProgressLine::Update,
// which may be called from the thread running the work.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "base/human_size.h"
#include "base/status.h"
#include "store/records.h"
#include "store/repository.h"

namespace vmdedup::cli {

// Exit codes (documented in every --help).
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;     // the operation failed; nothing was lost
constexpr int kExitUsage = 2;       // bad command line
constexpr int kExitDamaged = 3;     // check found damage
constexpr int kExitBusy = 4;        // the VM or repository is locked by another vmdedup
constexpr int kExitIncomplete = 5;  // check found no damage but could not check everything
constexpr int kExitInterrupted = 130;

std::string Percent(uint64_t part, uint64_t whole);
// Prints "vmdedup: <status>" to stderr and returns the matching exit code.
int ReportError(const Status& st);
// Repository::Open, and on stderr the line it has when it read the
// configuration's copy (Repository::config_note).
Result<std::unique_ptr<Repository>> OpenRepository(const std::string& path);

nlohmann::json SnapshotJson(const SnapshotRecord& s);
// The one-line text of `j`; bytes that are not UTF-8 (a damaged file's
// name or content quoted in a message) become U+FFFD instead of throwing.
std::string JsonText(const nlohmann::json& j);
// JsonText(j) and a newline on stdout.
void PrintJson(const nlohmann::json& j);

class ProgressLine {
 public:
  explicit ProgressLine(bool enabled);
  ~ProgressLine();
  void Update(const std::string& what, uint64_t done, uint64_t total, const std::string& extra);
  void Finish();

 private:
  bool enabled_;
  bool drawn_ = false;
  std::mutex mu_;
  std::chrono::steady_clock::time_point start_;
};

bool StderrIsTerminal();

}  // namespace vmdedup::cli
