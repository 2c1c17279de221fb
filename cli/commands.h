// The vmdedup subcommands. Each takes the whole argv (its name at argv[1]),
// prints its own --help, and returns a process exit code (cli/output.h).
// Commands run on the main thread; SIGINT/SIGTERM set CancelFlag().
#pragma once

#include <atomic>

namespace vmdedup::cli {

int InitCommand(int argc, char** argv);
int BackupCommand(int argc, char** argv);
int SnapshotsCommand(int argc, char** argv);
int RestoreCommand(int argc, char** argv);
int CheckCommand(int argc, char** argv);
int RepairCommand(int argc, char** argv);
int ForgetCommand(int argc, char** argv);
int GcCommand(int argc, char** argv);
int StatsCommand(int argc, char** argv);
int StatusCommand(int argc, char** argv);
int ServeCommand(int argc, char** argv);
int CdsCommand(int argc, char** argv);

// Set by SIGINT/SIGTERM; long-running work stops at the next segment.
std::atomic<bool>& CancelFlag();

}  // namespace vmdedup::cli
