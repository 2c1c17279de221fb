// Running helper programs (qemu-img, qemu-nbd, ...) as child processes,
// without a shell: fork + execv of the program found in PATH, stdin from
// /dev/null, stdout and stderr captured through pipes drained with poll so
// that neither can fill up and block the child.
//
// Every function is safe to call from any thread at the same time: the child
// only calls async-signal-safe functions between fork and exec, and every
// descriptor the parent opens is close-on-exec, so concurrent children do not
// inherit each other's pipes.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "base/status.h"

namespace vmdedup {

struct ProcessOutput {
  int exit_code = -1;   // exit status, or 128+N when killed by signal N
  int term_signal = 0;  // N when killed by signal N, else 0
  std::string out;      // everything written to stdout
  std::string err;      // everything written to stderr
  bool success() const { return exit_code == 0 && term_signal == 0; }
  // stderr on one line (lines trimmed and joined by spaces, capped at 2000
  // characters) for error messages; "exit status N" when stderr is empty.
  std::string ErrorSummary() const;
};

struct ProcessOptions {
  // Killed (SIGKILL) and reported as IOError after this many milliseconds;
  // negative waits forever.
  int timeout_ms = -1;
};

// Runs argv[0] (searched in PATH unless it contains '/') with the arguments
// and waits for it. A non-zero exit is not an error here: it is reported in
// ProcessOutput for the caller to interpret. Errors: InvalidArgument for an
// empty argv; NotFound when the program is not installed, with a hint of the
// package for the programs vmdedup uses ("qemu-img not found: install
// qemu-utils"); IOError when the process cannot be started or times out.
Result<ProcessOutput> RunProcess(const std::vector<std::string>& argv,
                                 const ProcessOptions& options = {});

// The full path of an executable `name` from PATH (or `name` itself when it
// contains '/' and is executable); nullopt when there is none.
std::optional<std::string> FindProgram(const std::string& name);

// NotFound "NAME not found: install PACKAGE" (or "... not found in PATH").
Status ProgramNotFound(const std::string& name);

}  // namespace vmdedup
