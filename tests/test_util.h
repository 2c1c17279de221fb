// Helpers shared by the tests: scratch directories that clean up after
// themselves, running commands, hashing files, deterministic data.
// Not thread-safe; used from the test's main thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vmdedup::testing {

// A fresh directory under $TMPDIR (or /tmp), removed with its content on
// destruction unless VMDEDUP_KEEP_TEST_DIRS is set.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = -1;  // 128+N when killed by signal N
  std::string out;     // stdout
  std::string err;     // stderr
};

// Runs argv[0] (searched in PATH) with the arguments, capturing both outputs.
CommandResult RunCommand(const std::vector<std::string>& argv);
// Runs through /bin/sh -c.
CommandResult RunShell(const std::string& script);

// Hex SHA-256 of a whole file's content ("" when it cannot be read).
std::string FileSha256(const std::string& path);
// Deterministic pseudo-random bytes.
std::string RandomBytes(size_t n, uint64_t seed);
// The path of the built vmdedup binary.
std::string VmdedupBinary();

}  // namespace vmdedup::testing
