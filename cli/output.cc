#include "cli/output.h"

#include <unistd.h>

#include <cstdio>

namespace vmdedup::cli {

std::string Percent(uint64_t part, uint64_t whole) {
  if (whole == 0) return "-";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f%%",
                100.0 * static_cast<double>(part) / static_cast<double>(whole));
  return buf;
}

int ReportError(const Status& st) {
  std::fprintf(stderr, "vmdedup: %s\n", st.ToString().c_str());
  if (st.IsInvalidArgument()) return kExitUsage;
  if (st.IsBusy()) return kExitBusy;
  if (st.IsAborted()) return kExitInterrupted;
  return kExitFailure;
}

Result<std::unique_ptr<Repository>> OpenRepository(const std::string& path) {
  auto repo = Repository::Open(path);
  if (repo.ok() && !(*repo)->config_note().empty())
    std::fprintf(stderr, "vmdedup: %s\n", (*repo)->config_note().c_str());
  return repo;
}

nlohmann::json SnapshotJson(const SnapshotRecord& s) {
  return {
      {"id", s.Id()},
      {"vm", s.vm},
      {"disk", s.disk},
      {"seq", s.seq},
      {"parent", s.parent_seq
                     ? nlohmann::json(s.vm + "/" + s.disk + "/" + std::to_string(s.parent_seq))
                     : nlohmann::json(nullptr)},
      {"time", s.time},
      {"size", s.size},
      {"read_bytes", s.stats.read_bytes},
      {"zero", s.stats.zero},
      {"segment", s.stats.segment},
      {"block", s.stats.block},
      {"cds", s.stats.cds},
      {"cds_version", s.cds_version},
      {"new", s.stats.new_bytes},
      {"new_blocks", s.stats.new_blocks},
      {"stored", s.stats.stored},
      {"metadata", s.stats.metadata},
      {"duration_ms", s.duration_ms},
      {"read_mode", s.read_mode},
      {"source", s.source},
      {"bitmap", s.bitmap},
      {"source_format", s.source_format},
      {"image_bytes", s.image_bytes != 0 ? s.image_bytes : s.size},
      {"segment_size", s.segment_size},
      {"chunker", ChunkerKindName(s.chunker.kind)},
      {"tags", s.tags},
  };
}

bool StderrIsTerminal() { return isatty(STDERR_FILENO) == 1; }

ProgressLine::ProgressLine(bool enabled)
    : enabled_(enabled), start_(std::chrono::steady_clock::now()) {}
ProgressLine::~ProgressLine() { Finish(); }

void ProgressLine::Update(const std::string& what, uint64_t done, uint64_t total,
                          const std::string& extra) {
  if (!enabled_) return;
  std::lock_guard<std::mutex> lock(mu_);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
  std::fprintf(stderr, "\r\033[K%s %5s  %s / %s  %s/s  %s", what.c_str(),
               Percent(done, total).c_str(), HumanSize(done).c_str(), HumanSize(total).c_str(),
               HumanSize(static_cast<uint64_t>(rate)).c_str(), extra.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void ProgressLine::Finish() {
  std::lock_guard<std::mutex> lock(mu_);
  if (drawn_) std::fprintf(stderr, "\r\033[K");
  drawn_ = false;
}

std::string JsonText(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void PrintJson(const nlohmann::json& j) { std::puts(JsonText(j).c_str()); }

}  // namespace vmdedup::cli
