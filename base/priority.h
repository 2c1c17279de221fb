// The scheduling priority of work that must not slow the guests down.
//
// A backup shares the hypervisor with the guests it backs up, and the guests
// come first: `vmdedup backup` lowers its own CPU and I/O priority before it
// starts any thread or child process, which inherit it (on Linux nice and the
// I/O priority belong to a thread and are copied into the threads and
// processes it creates). Lowering is always allowed; raising is not, so a
// priority once lowered stays for the life of the process.
//
// Call ApplyPriority once, from the main thread, before starting threads.
#pragma once

#include <string>

#include "base/status.h"

namespace vmdedup {

enum class Priority {
  kNormal,  // unchanged
  kLow,     // nice 10 and I/O best-effort level 7: yields to busy guests
  kIdle,    // SCHED_IDLE and the idle I/O class: runs only on CPU nobody wants
};

// "normal", "low" or "idle"; anything else is InvalidArgument naming it.
Result<Priority> ParsePriority(const std::string& text);

// Lowers the calling thread's CPU and I/O priority to `p` (kNormal: does
// nothing). An I/O priority the kernel rejects is ignored (it only matters to
// schedulers that honour it); a CPU priority that cannot be set is an error.
Status ApplyPriority(Priority p);

}  // namespace vmdedup
