#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "dirty-bitmap/live_fleece.h"
#include "dirty-bitmap/qmp_client.h"
#include "engine/backup_job.h"
#include "engine/series_bitmaps.h"
#include "store/repository.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] = R"(usage: vmdedup status [-r REPO] [--vm VM] [--json] qemu:QMP_SOCKET

Shows a running QEMU guest as vmdedup sees it: its disks, the dirty bitmaps
vmdedup keeps on them (with the bytes written since the bitmap's backup) and
whether fleecing objects of an interrupted backup are left. With a
repository (-r or $VMDEDUP_REPO), also the latest snapshot of each disk
series (of VM, or of every VM of the repository whose bitmaps are on the
disks). Bitmaps of other tools are listed but marked as not vmdedup's.

Options:
  -r, --repo REPO     repository (optional)
  --vm VM             the VM's name in the repository
  --json              one JSON object on stdout
  -h, --help          this text

A series of a disk (its bitmap is on the disk, or its VM is the one named
with --vm) whose snapshots the repository cannot read (damaged or unreadable
metadata) is shown with the error; in --json output it has an "error"
member and "last_snapshot": null. 'vmdedup check' says what is damaged.

Exit codes: 0 success, 1 failure (QEMU unreachable, or such a series could
not be read), 2 bad usage.
)";

struct Series {
  std::string vm;
  std::string prefix;
};

}  // namespace

int StatusCommand(int argc, char** argv) {
  auto args =
      Args::Parse(argc, argv, 2,
                  {{"repo", 'r', true}, {"vm", 0, true}, {"json", 0, false}, {"help", 'h', false}});
  if (!args.ok()) return ReportError(args.status());
  if (args->Has("help")) {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  if (args->positionals().size() != 1 || args->positionals()[0].rfind("qemu:", 0) != 0) {
    std::fputs(kHelp, stderr);
    return kExitUsage;
  }
  const std::string socket = args->positionals()[0].substr(5);
  const bool json = args->Has("json");

  std::unique_ptr<Repository> repo;
  std::vector<std::string> vms;
  const bool named_vm = args->Has("vm");
  if (args->Has("repo") || std::getenv("VMDEDUP_REPO")) {
    auto path = args->Repo();
    if (!path.ok()) return ReportError(path.status());
    auto r = OpenRepository(*path);
    if (!r.ok()) return ReportError(r.status());
    repo = std::move(r).value();
    if (auto vm = args->Get("vm")) {
      vms.push_back(*vm);
    } else {
      auto list = repo->ListVms();
      if (!list.ok()) return ReportError(list.status());
      vms = *list;
    }
  }

  auto qmp = QmpClient::Connect(socket);
  if (!qmp.ok()) return ReportError(qmp.status().WithContext("connecting to QEMU"));
  auto disks = QueryDisks(**qmp);
  if (!disks.ok()) return ReportError(disks.status());
  auto leftovers = QueryFleeceObjects(**qmp);
  if (!leftovers.ok()) return ReportError(leftovers.status());

  int repo_errors = 0;  // series whose snapshots could not be read
  nlohmann::json out = {{"qemu", socket},
                        {"qemu_version", (*qmp)->qemu_version()},
                        {"disks", nlohmann::json::array()}};
  for (const LiveDisk& d : *disks) {
    nlohmann::json jd = {{"name", d.name},
                         {"qdev", d.qdev},
                         {"device", d.device},
                         {"node", d.root_node},
                         {"bitmap_node", d.bitmap_node},
                         {"format", d.format},
                         {"size", d.size},
                         {"read_only", d.read_only},
                         {"bitmaps", nlohmann::json::array()},
                         {"series", nlohmann::json::array()}};
    for (const LiveBitmap& b : d.bitmaps) {
      bool ours = b.name.rfind("vmdedup.", 0) == 0;
      jd["bitmaps"].push_back({{"name", b.name},
                               {"vmdedup", ours},
                               {"dirty_bytes", b.count},
                               {"granularity", b.granularity},
                               {"recording", b.recording},
                               {"persistent", b.persistent},
                               {"inconsistent", b.inconsistent},
                               {"busy", b.busy}});
    }
    if (repo && !d.name.empty()) {
      for (const std::string& vm : vms) {
        if (!ValidateName("VM", vm).ok() || !ValidateName("disk", d.name).ok()) continue;
        const std::string prefix = SeriesBitmapPrefix(repo->config().repo_id, vm, d.name);
        auto store = repo->OpenVm(vm, Repository::Access::kRead);
        nlohmann::json js = {{"series", vm + "/" + d.name}, {"last_snapshot", nullptr}};
        bool has_bitmap = false;
        for (const LiveBitmap& b : d.bitmaps)
          has_bitmap = has_bitmap || SeriesBitmapSeq(b.name, prefix).has_value();
        // Not found: the VM or the series has no snapshot (shown only when
        // its bitmap is on the disk). Any other error is the repository's,
        // and is shown rather than hidden for a series of this disk: one
        // whose bitmap is on it, or of the VM named with --vm.
        Status unreadable;
        if (store.ok()) {
          auto latest = (*store)->LatestSnapshot(d.name);
          if (latest.ok()) {
            js["last_snapshot"] = latest->Id();
            js["last_time"] = latest->time;
            js["last_bitmap"] = latest->bitmap;
            js["bitmap_present"] = d.FindBitmap(latest->bitmap) != nullptr;
          } else if (!latest.status().IsNotFound()) {
            unreadable = latest.status();
          } else if (!has_bitmap) {
            continue;
          }
        } else if (store.status().IsBusy()) {
          js["last_snapshot"] = "(a backup of " + vm + " is running)";
        } else if (!store.status().IsNotFound()) {
          unreadable = store.status();
        } else if (!has_bitmap) {
          continue;
        }
        if (!unreadable.ok()) {
          if (!has_bitmap && !named_vm) continue;  // not this disk's series, as far as we know
          js["error"] = unreadable.ToString();
          repo_errors++;
        }
        jd["series"].push_back(js);
      }
    }
    out["disks"].push_back(jd);
  }
  nlohmann::json left = nlohmann::json::array();
  for (const auto& v : {leftovers->exports, leftovers->jobs, leftovers->nodes})
    for (const auto& x : v) left.push_back(x);
  out["leftovers"] = left;

  const int exit_code = repo_errors == 0 ? kExitOk : kExitFailure;
  if (json) {
    PrintJson(out);
    return exit_code;
  }
  std::printf("QEMU %s at %s\n", (*qmp)->qemu_version().c_str(), socket.c_str());
  for (const auto& jd : out["disks"]) {
    std::printf(
        "disk %s  node %s (%s)  %s%s\n",
        jd["name"].get<std::string>().empty() ? "(unnamed)" : jd["name"].get<std::string>().c_str(),
        jd["bitmap_node"].get<std::string>().c_str(), jd["format"].get<std::string>().c_str(),
        HumanSize(jd["size"].get<uint64_t>()).c_str(),
        jd["read_only"].get<bool>() ? "  read-only" : "");
    for (const auto& b : jd["bitmaps"]) {
      std::string flags;
      if (!b["vmdedup"].get<bool>()) flags += " (not vmdedup's)";
      if (!b["recording"].get<bool>()) flags += " disabled";
      if (b["inconsistent"].get<bool>()) flags += " INCONSISTENT";
      if (b["busy"].get<bool>()) flags += " busy";
      if (!b["persistent"].get<bool>()) flags += " transient";
      std::printf("  bitmap %s  dirty %s%s\n", b["name"].get<std::string>().c_str(),
                  HumanSize(b["dirty_bytes"].get<uint64_t>()).c_str(), flags.c_str());
    }
    for (const auto& s : jd["series"]) {
      std::string last =
          s["last_snapshot"].is_null() ? "none" : s["last_snapshot"].get<std::string>();
      std::string extra;
      if (s.contains("bitmap_present") && !s["bitmap_present"].get<bool>())
        extra = "  (its bitmap is gone: the next backup reads everything)";
      if (s.contains("error")) {
        std::printf("  series %s  cannot be read: %s\n", s["series"].get<std::string>().c_str(),
                    s["error"].get<std::string>().c_str());
        continue;
      }
      std::printf("  series %s  last snapshot %s%s\n", s["series"].get<std::string>().c_str(),
                  last.c_str(), extra.c_str());
    }
  }
  if (!left.empty())
    std::printf("left by an interrupted backup (removed by the next one): %s\n",
                JsonText(left).c_str());
  if (repo_errors > 0)
    std::fprintf(stderr,
                 "vmdedup: %d disk series of the repository could not be read (shown above); "
                 "'vmdedup check' names what is damaged\n",
                 repo_errors);
  return exit_code;
}

}  // namespace vmdedup::cli
