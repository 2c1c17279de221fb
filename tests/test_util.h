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
// Starts argv[0] (searched in PATH) in the background, its stdout and stderr
// appended to `log_path`; the child is killed when the test process dies.
// Returns its pid (the caller kills and reaps it), or -1 when fork failed.
int SpawnLogged(const std::vector<std::string>& argv, const std::string& log_path);

// The whole content of a file ("" when it cannot be read).
std::string ReadFileBytes(const std::string& path);
// Replaces a file's content (creating it); false when it cannot be written.
bool WriteFileBytes(const std::string& path, const std::string& data);
// Hex SHA-256 of a whole file's content ("" when it cannot be read).
std::string FileSha256(const std::string& path);
// Deterministic pseudo-random bytes.
std::string RandomBytes(size_t n, uint64_t seed);
// The path of the built vmdedup binary.
std::string VmdedupBinary();
// Flips one bit in the middle of snapshot record `disk`/`seq` of `vm` in the
// repository at `repo`, keeping its key: the record's checksum then fails.
// Returns "" or what went wrong (for an ASSERT_EQ(..., "")).
std::string DamageSnapshotRecord(const std::string& repo, const std::string& vm,
                                 const std::string& disk, uint64_t seq);

// An nbdkit server of a raw image on a unix socket (`socket_path`) that
// serves one read at a time, each after `delay` ("0.3" seconds), and appends
// a line to `marker_path` when a read starts: tests wait for reads to start
// instead of guessing how long a backup takes. Killed (SIGKILL) and reaped
// on destruction unless Kill was called; either way with its process group,
// so that no plugin shell or `sleep` outlives it.
class SlowNbdServer {
 public:
  SlowNbdServer(const std::string& image, uint64_t size, const std::string& delay,
                const std::string& socket_path, const std::string& marker_path);
  ~SlowNbdServer();
  SlowNbdServer(const SlowNbdServer&) = delete;
  SlowNbdServer& operator=(const SlowNbdServer&) = delete;
  bool Listening() const;  // the socket appeared (waited up to 10 s)
  std::string Uri() const { return "nbd+unix:///?socket=" + socket_; }
  int ReadsStarted() const;
  // Waits (up to `timeout_ms`) until `n` reads have started.
  bool WaitForReads(int n, int timeout_ms) const;
  // Sends `sig` and reaps the server; true when it was still there.
  bool Kill(int sig);

 private:
  std::string socket_, marker_;
  int pid_ = -1;
};

}  // namespace vmdedup::testing
