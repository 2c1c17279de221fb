#include "base/priority.h"

#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

namespace vmdedup {
namespace {

// From linux/ioprio.h, which glibc does not wrap.
constexpr int kIoprioWhoProcess = 1;
constexpr int kIoprioClassShift = 13;
constexpr int kIoprioClassBestEffort = 2;
constexpr int kIoprioClassIdle = 3;

void SetIoPriority(int io_class, int level) {
  // Errors are ignored on purpose: see ApplyPriority.
  (void)syscall(SYS_ioprio_set, kIoprioWhoProcess, 0, (io_class << kIoprioClassShift) | level);
}

}  // namespace

Result<Priority> ParsePriority(const std::string& text) {
  if (text == "normal") return Priority::kNormal;
  if (text == "low") return Priority::kLow;
  if (text == "idle") return Priority::kIdle;
  return Status::InvalidArgument("--priority must be normal, low or idle, got '" + text + "'");
}

Status ApplyPriority(Priority p) {
  switch (p) {
    case Priority::kNormal:
      return Status::OK();
    case Priority::kLow: {
      // PRIO_PROCESS with who 0 is the calling thread on Linux. Never raise:
      // a caller that already runs nicer than 10 keeps its niceness.
      errno = 0;
      int now = getpriority(PRIO_PROCESS, 0);
      if (errno != 0) return Status::FromErrno(errno, "getpriority");
      if (now < 10 && setpriority(PRIO_PROCESS, 0, 10) != 0)
        return Status::FromErrno(errno, "setpriority(10)");
      SetIoPriority(kIoprioClassBestEffort, 7);
      return Status::OK();
    }
    case Priority::kIdle: {
      sched_param param{};
      if (sched_setscheduler(0, SCHED_IDLE, &param) != 0)
        return Status::FromErrno(errno, "sched_setscheduler(SCHED_IDLE)");
      SetIoPriority(kIoprioClassIdle, 0);
      return Status::OK();
    }
  }
  return Status::InvalidArgument("unknown priority");
}

}  // namespace vmdedup
