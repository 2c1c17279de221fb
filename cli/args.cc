#include "cli/args.h"

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <thread>

namespace vmdedup::cli {

Result<Args> Args::Parse(int argc, char** argv, int first, const std::vector<OptionSpec>& specs) {
  Args a;
  bool only_positionals = false;
  for (int i = first; i < argc; i++) {
    std::string arg = argv[i];
    if (only_positionals || arg.size() < 2 || arg[0] != '-') {
      a.positionals_.push_back(arg);
      continue;
    }
    if (arg == "--") {
      only_positionals = true;
      continue;
    }
    const OptionSpec* spec = nullptr;
    std::optional<std::string> inline_value;
    if (arg.rfind("--", 0) == 0) {
      std::string name = arg.substr(2);
      size_t eq = name.find('=');
      if (eq != std::string::npos) {
        inline_value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      for (const auto& s : specs)
        if (s.long_name == name) spec = &s;
      if (!spec) return Status::InvalidArgument("unknown option --" + name);
    } else {
      if (arg.size() != 2) return Status::InvalidArgument("unknown option " + arg);
      for (const auto& s : specs)
        if (s.short_name == arg[1]) spec = &s;
      if (!spec) return Status::InvalidArgument("unknown option " + arg);
    }
    if (spec->takes_value) {
      if (!inline_value) {
        if (i + 1 >= argc)
          return Status::InvalidArgument("option --" + spec->long_name + " needs a value");
        inline_value = argv[++i];
      }
      a.values_.emplace(spec->long_name, *inline_value);
    } else {
      if (inline_value)
        return Status::InvalidArgument("option --" + spec->long_name + " takes no value");
      a.values_.emplace(spec->long_name, "");
    }
  }
  return a;
}

std::optional<std::string> Args::Get(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> Args::GetAll(const std::string& name) const {
  std::vector<std::string> out;
  auto [b, e] = values_.equal_range(name);
  for (auto it = b; it != e; ++it) out.push_back(it->second);
  return out;
}

Result<std::string> Args::Repo() const {
  if (auto r = Get("repo")) return *r;
  const char* env = std::getenv("VMDEDUP_REPO");
  if (env && *env) return std::string(env);
  return Status::InvalidArgument("no repository given: use -r REPO or set VMDEDUP_REPO");
}

Result<unsigned> Args::Threads() const {
  auto t = Get("threads");
  if (!t) return std::max(1u, std::thread::hardware_concurrency());
  char* end = nullptr;
  unsigned long v = std::strtoul(t->c_str(), &end, 10);
  if (end == t->c_str() || *end != '\0' || v == 0 || v > 256)
    return Status::InvalidArgument("--threads must be a number from 1 to 256, got '" + *t + "'");
  return static_cast<unsigned>(v);
}

Result<double> Args::LockWaitSeconds() const {
  auto wait = Get("lock-wait");
  if (!wait) return 0.0;
  char* end = nullptr;
  const double v = std::strtod(wait->c_str(), &end);
  if (wait->empty() || *end != '\0' || !(v >= 0) || v > 7 * 24 * 3600)
    return Status::InvalidArgument("--lock-wait takes seconds from 0 to 604800, not '" + *wait +
                                   "'");
  return v;
}

Result<uint64_t> ParseSize(const std::string& text) {
  // strtoull would take "-5" as 2^64 - 5 and skip leading blanks: only
  // digits may start a size.
  if (text.empty() || text[0] < '0' || text[0] > '9')
    return Status::InvalidArgument("'" + text +
                                   "' is not a size (a number of bytes, K, M, G or T)");
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (errno == ERANGE) return Status::InvalidArgument("'" + text + "' is too large a size");
  std::string unit(end);
  uint64_t mult = 1;
  if (unit.empty() || unit == "B")
    mult = 1;
  else if (unit == "k" || unit == "K" || unit == "KiB")
    mult = 1ull << 10;
  else if (unit == "M" || unit == "MiB")
    mult = 1ull << 20;
  else if (unit == "G" || unit == "GiB")
    mult = 1ull << 30;
  else if (unit == "T" || unit == "TiB")
    mult = 1ull << 40;
  else
    return Status::InvalidArgument("'" + text + "': unknown size unit '" + unit +
                                   "' (use K, M, G, T)");
  if (v > UINT64_MAX / mult) return Status::InvalidArgument("'" + text + "' is too large a size");
  return static_cast<uint64_t>(v) * mult;
}

}  // namespace vmdedup::cli
