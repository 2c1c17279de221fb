// Command-line parsing for the vmdedup subcommands: long and short options
// with or without a value ("--repo R", "--repo=R", "-r R"), positionals, and
// the repository from -r/--repo or $VMDEDUP_REPO. Single-threaded.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"

namespace vmdedup::cli {

struct OptionSpec {
  std::string long_name;  // without "--"
  char short_name = 0;    // 0: none
  bool takes_value = false;
};

class Args {
 public:
  // Parses argv[first..]; InvalidArgument naming the bad option.
  static Result<Args> Parse(int argc, char** argv, int first, const std::vector<OptionSpec>& specs);
  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::optional<std::string> Get(const std::string& name) const;
  std::vector<std::string> GetAll(const std::string& name) const;
  const std::vector<std::string>& positionals() const { return positionals_; }
  // -r/--repo, else $VMDEDUP_REPO; InvalidArgument when neither is set.
  Result<std::string> Repo() const;
  Result<unsigned> Threads() const;  // --threads, default: number of cores
  // --lock-wait SECONDS (0 to 604800), 0 when absent.
  Result<double> LockWaitSeconds() const;

 private:
  std::multimap<std::string, std::string> values_;
  std::vector<std::string> positionals_;
};

// Parses sizes such as "2M", "2MiB", "65536", "4k".
Result<uint64_t> ParseSize(const std::string& text);

}  // namespace vmdedup::cli
