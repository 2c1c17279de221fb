// Tests for base/priority.h. Each case runs in a forked child, because a
// lowered priority cannot be raised again and must not slow the other tests.
#include "base/priority.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>

namespace vmdedup {
namespace {

// Runs `body` in a forked child; the child's exit code (0: passed, else the
// number of the check that failed) is returned.
int InChild(const std::function<int()>& body) {
  fflush(nullptr);
  pid_t pid = fork();
  if (pid == 0) _exit(body());
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 100;
}

// The nice value of the calling thread.
int Nice() {
  errno = 0;
  return getpriority(PRIO_PROCESS, 0);
}

// The nice value of a child process started now (field 19 of /proc/PID/stat).
int NiceOfChildProcess() {
  FILE* f = popen("cat /proc/self/stat", "r");
  if (!f) return -100;
  char buf[1024] = {};
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  pclose(f);
  std::string stat(buf, n);
  std::istringstream rest(stat.substr(stat.rfind(')') + 2));  // after "(comm) "
  std::string field;
  for (int i = 3; i <= 19; ++i) rest >> field;
  return std::stoi(field);
}

TEST(PriorityTest, ParsesTheThreeNamesAndNamesABadOne) {
  EXPECT_EQ(*ParsePriority("normal"), Priority::kNormal);
  EXPECT_EQ(*ParsePriority("low"), Priority::kLow);
  EXPECT_EQ(*ParsePriority("idle"), Priority::kIdle);
  auto bad = ParsePriority("Low");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(bad.status().IsInvalidArgument());
  EXPECT_NE(bad.status().message().find("'Low'"), std::string::npos);
}

TEST(PriorityTest, LowIsInheritedByLaterThreadsAndChildProcesses) {
  EXPECT_EQ(InChild([] {
              const int want = std::max(Nice(), 10);  // whatever nice ctest runs at
              if (!ApplyPriority(Priority::kLow).ok()) return 2;
              if (Nice() != want) return 3;
              int in_thread = -100;
              std::thread([&] { in_thread = Nice(); }).join();
              if (in_thread != want) return 4;
              if (NiceOfChildProcess() != want) return 5;
              return 0;
            }),
            0);
}

TEST(PriorityTest, LowNeverRaisesANicerProcess) {
  EXPECT_EQ(InChild([] {
              if (setpriority(PRIO_PROCESS, 0, 15) != 0) return 1;
              if (!ApplyPriority(Priority::kLow).ok()) return 2;
              return Nice() == 15 ? 0 : 3;
            }),
            0);
}

TEST(PriorityTest, IdleUsesSchedIdleInLaterThreads) {
  EXPECT_EQ(InChild([] {
              if (!ApplyPriority(Priority::kIdle).ok()) return 1;
              if (sched_getscheduler(0) != SCHED_IDLE) return 2;
              int policy = -1;
              std::thread([&] { policy = sched_getscheduler(0); }).join();
              return policy == SCHED_IDLE ? 0 : 3;
            }),
            0);
}

TEST(PriorityTest, NormalChangesNothing) {
  EXPECT_EQ(InChild([] {
              int before = Nice();
              if (!ApplyPriority(Priority::kNormal).ok()) return 1;
              if (Nice() != before) return 2;
              return sched_getscheduler(0) == SCHED_OTHER ? 0 : 3;
            }),
            0);
}

}  // namespace
}  // namespace vmdedup
