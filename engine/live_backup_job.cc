#include "engine/live_backup_job.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <set>

#include "base/human_size.h"
#include "dirty-bitmap/guest_agent.h"
#include "dirty-bitmap/live_fleece.h"
#include "dirty-bitmap/qmp_client.h"
#include "engine/backup_job.h"
#include "engine/series_bitmaps.h"
#include "nbd-client/block_source.h"

namespace vmdedup {
namespace {

using nlohmann::json;

json BitmapAction(const std::string& type, const std::string& node, const std::string& name) {
  return {{"type", type}, {"data", {{"node", node}, {"name", name}}}};
}

// The NBD view of one fleeced disk, described for humans as the QEMU disk.
class LiveDiskSource : public BlockSource {
 public:
  LiveDiskSource(std::unique_ptr<BlockSource> inner, std::string description)
      : inner_(std::move(inner)), description_(std::move(description)) {}
  uint64_t size() const override { return inner_->size(); }
  Status Allocation(uint64_t offset, uint64_t length, std::vector<Extent>* out) override {
    return inner_->Allocation(offset, length, out);
  }
  bool has_dirty_map() const override { return inner_->has_dirty_map(); }
  Status Dirty(uint64_t offset, uint64_t length, std::vector<Extent>* out) override {
    return inner_->Dirty(offset, length, out);
  }
  Status ReadMany(std::span<const ReadRequest> requests) override {
    return inner_->ReadMany(requests);
  }
  std::string Describe() const override { return description_; }

 private:
  std::unique_ptr<BlockSource> inner_;
  std::string description_;
};

struct DiskPlan {
  LiveDisk disk;
  std::optional<SnapshotRecord> parent;
  std::string prefix;
  std::string old_bitmap;  // rotated: disabled at the cut, merged back into on failure
  bool use_dirty_map = false;
  std::string reason;
  std::string new_bitmap;
  bool persistent = false;
  bool added = false;  // NEW exists in QEMU
  bool committed = false;
};

class LiveBackup {
 public:
  LiveBackup(Repository& repo, const LiveBackupOptions& o) : repo_(repo), o_(o) {}
  Result<std::vector<SnapshotRecord>> Run();

 private:
  Result<std::vector<SnapshotRecord>> RunInScratchArea(ScratchArea& area);
  void Note(const std::string& line) const {
    if (o_.note) o_.note(line);
  }
  bool Cancelled() const { return o_.cancel && o_.cancel->load(); }
  Status SelectDisks(const std::vector<LiveDisk>& all);
  Status PlanBitmaps(DiskPlan& p, uint64_t next_seq);
  Status RemoveBitmap(const DiskPlan& p, const std::string& name, const char* why);
  Result<int64_t> CutWithFreeze(FleeceSession& fleece, const std::vector<json>& actions);
  Status BackUpDisk(DiskPlan& p, const std::string& uri, int64_t instant);
  void FinishBitmaps();

  Repository& repo_;
  const LiveBackupOptions& o_;
  std::unique_ptr<QmpClient> qmp_;
  std::unique_ptr<VmStore> vm_;
  std::vector<DiskPlan> plans_;
  std::vector<SnapshotRecord> snapshots_;  // read and stored; committed by commit_
  WriteBatch commit_;                      // every disk's final batch
  bool area_clean_ = false;                // nothing of this run is left in the scratch area
};

Status LiveBackup::SelectDisks(const std::vector<LiveDisk>& all) {
  auto describe = [&] {
    std::string s;
    for (const auto& d : all)
      s += (s.empty() ? "" : ", ") + (d.name.empty() ? d.root_node : d.name) +
           (d.read_only ? " (read-only)" : "");
    return s.empty() ? std::string("none") : s;
  };
  std::vector<const LiveDisk*> chosen;
  if (o_.disks.empty()) {
    for (const auto& d : all)
      if (!d.read_only) chosen.push_back(&d);
    if (chosen.empty())
      return Status::NotFound("the guest at " + o_.qmp_socket +
                              " has no writable disk (disks: " + describe() + ")");
  } else {
    for (const auto& sel : o_.disks) {
      const LiveDisk* found = nullptr;
      for (const auto& d : all)
        if (d.Matches(sel)) {
          if (found && found != &d)
            return Status::InvalidArgument("--disk " + sel + " names more than one disk");
          found = &d;
        }
      if (!found)
        return Status::InvalidArgument("--disk " + sel +
                                       ": the guest has no such disk (disks: " + describe() + ")");
      if (found->read_only)
        return Status::InvalidArgument("--disk " + sel +
                                       " is read-only; vmdedup backs up "
                                       "writable disks");
      if (std::find(chosen.begin(), chosen.end(), found) == chosen.end()) chosen.push_back(found);
    }
  }
  std::set<std::string> names;
  for (const LiveDisk* d : chosen) {
    if (d->name.empty())
      return Status::InvalidArgument(
          "the disk on node " + d->root_node +
          " has no usable name: give its device an id (-device ...,id=NAME)");
    RETURN_IF_ERROR(ValidateName("disk", d->name));
    if (!names.insert(d->name).second)
      return Status::InvalidArgument("two disks are both named " + d->name);
    DiskPlan p;
    p.disk = *d;
    plans_.push_back(std::move(p));
  }
  return Status::OK();
}

Status LiveBackup::RemoveBitmap(const DiskPlan& p, const std::string& name, const char* why) {
  auto r =
      qmp_->Execute("block-dirty-bitmap-remove", {{"node", p.disk.bitmap_node}, {"name", name}});
  if (!r.ok()) {
    Note("warning: could not remove " + std::string(why) + " bitmap " + name + ": " +
         r.status().ToString());
    return r.status();
  }
  return Status::OK();
}

Status LiveBackup::PlanBitmaps(DiskPlan& p, uint64_t next_seq) {
  const LiveDisk& d = p.disk;
  p.prefix = SeriesBitmapPrefix(repo_.config().repo_id, o_.vm, d.name);
  const std::string series = o_.vm + "/" + d.name;
  const std::string parent_bitmap = p.parent ? p.parent->bitmap : "";
  // Bitmaps of the series: the parent's (OLD); newer ones, left by an
  // interrupted run, that hold writes since the parent too; older ones,
  // stale. Bitmaps of anybody else are never touched.
  const LiveBitmap* old = nullptr;
  std::vector<const LiveBitmap*> newer, older;
  for (const auto& b : d.bitmaps) {
    auto seq = SeriesBitmapSeq(b.name, p.prefix);
    if (!seq) continue;
    if (b.name == parent_bitmap)
      old = &b;
    else if (p.parent && *seq > p.parent->seq)
      newer.push_back(&b);
    else
      older.push_back(&b);
  }
  bool newer_ok = true;
  for (const LiveBitmap* b : newer) newer_ok = newer_ok && !b->inconsistent && !b->busy;
  bool recovered = false;
  if (old && !old->inconsistent && !old->busy && newer_ok && !newer.empty()) {
    // One transaction: a crash in between can lose nothing.
    json actions = json::array();
    if (!old->recording)
      actions.push_back(BitmapAction("block-dirty-bitmap-enable", d.bitmap_node, old->name));
    json names = json::array();
    for (const LiveBitmap* b : newer) names.push_back(b->name);
    actions.push_back(
        {{"type", "block-dirty-bitmap-merge"},
         {"data", {{"node", d.bitmap_node}, {"target", old->name}, {"bitmaps", names}}}});
    for (const LiveBitmap* b : newer)
      actions.push_back(BitmapAction("block-dirty-bitmap-remove", d.bitmap_node, b->name));
    auto r = qmp_->Execute("transaction", {{"actions", actions}});
    if (!r.ok()) {
      Note("warning: " + series + ": could not merge the bitmaps of an interrupted backup into " +
           old->name + ": " + r.status().ToString());
      newer_ok = false;
    } else {
      recovered = true;
      Note(series + ": merged " +
           names.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
           " (left by an interrupted backup) into " + old->name);
      newer.clear();
    }
  }
  for (const LiveBitmap* b : newer)
    if (!b->busy) (void)RemoveBitmap(p, b->name, "an interrupted backup's");
  for (const LiveBitmap* b : older)
    if (!b->busy) (void)RemoveBitmap(p, b->name, "an old");

  bool usable = false;
  if (!p.parent) {
    p.reason = "full: first backup of " + series;
  } else if (parent_bitmap.empty()) {
    p.reason = "full: the parent snapshot " + p.parent->Id() + " has no dirty bitmap to continue";
  } else if (!SeriesBitmapSeq(parent_bitmap, p.prefix)) {
    p.reason = "full: the parent snapshot's bitmap " + parent_bitmap +
               " is not named as vmdedup names " + series +
               "'s now (an older name could be another series'); reading all once";
    // It is ours all the same (the parent names it): not kept recording.
    for (const auto& b : d.bitmaps)
      if (b.name == parent_bitmap && !b.busy) (void)RemoveBitmap(p, b.name, "the old-named");
  } else if (!old) {
    p.reason = "full: bitmap " + parent_bitmap + " is missing from node " + d.bitmap_node +
               " (removed, or QEMU was restarted without it)";
  } else if (old->inconsistent) {
    p.reason = "full: bitmap " + parent_bitmap +
               " is inconsistent (QEMU did not shut down cleanly since " + p.parent->Id() + ")";
  } else if (!newer_ok) {
    p.reason = "full: a bitmap left by an interrupted backup of " + series +
               " is inconsistent or in use, so writes may be missing";
  } else if (old->busy) {
    p.reason = "full: bitmap " + parent_bitmap + " is in use by another job or export";
  } else if (!old->recording && !recovered) {
    p.reason = "full: bitmap " + parent_bitmap + " was disabled, so writes may be missing";
  } else {
    usable = true;
  }
  if (usable) {
    p.old_bitmap = parent_bitmap;
    if (o_.full) {
      p.reason = "full: --full given";
    } else if (p.parent->size != d.size) {
      p.reason =
          "full: disk size changed from " + HumanSize(p.parent->size) + " to " + HumanSize(d.size);
    } else {
      p.use_dirty_map = true;
      p.reason = "incremental: dirty bitmap " + parent_bitmap + " since " + p.parent->Id();
    }
  } else if (old && !old->busy) {
    // An inconsistent bitmap can only be removed; an unusable one is useless.
    (void)RemoveBitmap(p, old->name, "the unusable");
  }
  p.new_bitmap = NewSeriesBitmapName(p.prefix, next_seq);
  p.persistent = d.format == "qcow2";
  return Status::OK();
}

Result<int64_t> LiveBackup::CutWithFreeze(FleeceSession& fleece, const std::vector<json>& actions) {
  std::unique_ptr<GuestAgentClient> agent;
  bool froze = false, maybe_frozen = false;
  if (o_.fsfreeze) {
    auto a = GuestAgentClient::Connect(o_.qga_socket);
    if (!a.ok()) {
      Note("warning: --fsfreeze: cannot reach the guest agent: " + a.status().ToString() +
           "; backing up without freezing (crash-consistent)");
    } else {
      agent = std::move(a).value();
      auto n = agent->FreezeFilesystems(o_.fsfreeze_timeout_ms);
      maybe_frozen = agent->command_sent();
      if (n.ok()) {
        froze = true;
        Note("froze " + std::to_string(*n) + " guest filesystem(s)");
      } else {
        Note("warning: --fsfreeze: the guest agent did not freeze the filesystems: " +
             n.status().ToString() + "; backing up without freezing (crash-consistent)");
      }
    }
  }
  auto instant = fleece.Cut(actions);
  if (agent && maybe_frozen) {
    // Thaw even after a failed freeze: the agent may have frozen late.
    auto t = agent->ThawFilesystems(froze ? 10 * 1000 : o_.fsfreeze_timeout_ms);
    if (froze && !t.ok())
      Note("warning: --fsfreeze: thawing the guest's filesystems failed: " + t.status().ToString());
  }
  return instant;
}

Status LiveBackup::BackUpDisk(DiskPlan& p, const std::string& uri, int64_t instant) {
  NbdUriOptions no;
  no.uri = uri;
  no.cancel = o_.cancel;
  if (p.use_dirty_map) no.bitmap = p.old_bitmap;
  ASSIGN_OR_RETURN(auto nbd, OpenNbdUri(no));
  BackupRequest req;
  req.disk = p.disk.name;
  req.parent = p.parent;
  req.use_dirty_map = p.use_dirty_map;
  req.read_mode = p.reason;
  if (p.use_dirty_map && !nbd->has_dirty_map()) {
    req.use_dirty_map = false;
    req.read_mode = "full: QEMU did not export bitmap " + p.old_bitmap;
    Note(o_.vm + "/" + p.disk.name + ": " + req.read_mode);
  }
  if (nbd->size() != p.disk.size)
    return Status::IOError("the fleecing export of " + p.disk.name + " has " +
                           std::to_string(nbd->size()) + " bytes, the disk " +
                           std::to_string(p.disk.size));
  LiveDiskSource source(std::move(nbd), "qemu:" + o_.qmp_socket + " disk " + p.disk.name +
                                            " (node " + p.disk.root_node + ")");
  req.source = &source;
  req.bitmap = p.new_bitmap;
  req.threads = o_.threads;
  req.cds = o_.cds;
  req.tags = o_.tags;
  req.cancel = o_.cancel;
  if (o_.progress) {
    const std::string name = p.disk.name;
    req.progress = [this, name](const BackupProgress& pr) { o_.progress(name, pr); };
  }
  {
    const std::string name = o_.vm + "/" + p.disk.name;
    req.note = [this, name](const std::string& line) { Note(name + ": " + line); };
  }
  req.time = instant;
  req.commit_into = &commit_;  // committed with the other disks' in Run
  ASSIGN_OR_RETURN(SnapshotRecord snap, RunBackup(repo_, *vm_, req));
  snapshots_.push_back(std::move(snap));
  return Status::OK();
}

void LiveBackup::FinishBitmaps() {
  for (DiskPlan& p : plans_) {
    if (!p.added) continue;
    const std::string series = o_.vm + "/" + p.disk.name;
    if (qmp_->closed()) {
      Note("warning: " + series + ": QEMU is gone; the next backup checks its bitmaps");
      continue;
    }
    if (p.committed) {
      if (!p.old_bitmap.empty()) (void)RemoveBitmap(p, p.old_bitmap, "the previous");
      continue;
    }
    Status st;
    if (!p.old_bitmap.empty()) {
      // OLD is the latest snapshot's bitmap again and holds every write.
      json actions = json::array(
          {BitmapAction("block-dirty-bitmap-enable", p.disk.bitmap_node, p.old_bitmap),
           {{"type", "block-dirty-bitmap-merge"},
            {"data",
             {{"node", p.disk.bitmap_node},
              {"target", p.old_bitmap},
              {"bitmaps", json::array({p.new_bitmap})}}}},
           BitmapAction("block-dirty-bitmap-remove", p.disk.bitmap_node, p.new_bitmap)});
      st = qmp_->Execute("transaction", {{"actions", actions}}).status();
    } else {
      // Without a usable parent bitmap the next backup reads everything anyway.
      st = qmp_->Execute("block-dirty-bitmap-remove",
                         {{"node", p.disk.bitmap_node}, {"name", p.new_bitmap}})
               .status();
    }
    if (!st.ok())
      Note("warning: " + series + ": could not restore the dirty bitmaps: " + st.ToString() +
           " (the next backup sorts them out)");
  }
}

Result<std::vector<SnapshotRecord>> LiveBackup::Run() {
  RETURN_IF_ERROR(ValidateName("VM", o_.vm));
  if (o_.fsfreeze && o_.qga_socket.empty())
    return Status::InvalidArgument("--fsfreeze needs the guest agent's socket: --qga SOCKET");
  auto qmp = QmpClient::Connect(o_.qmp_socket);
  if (!qmp.ok()) return qmp.status().WithContext("connecting to QEMU");
  qmp_ = std::move(qmp).value();
  ASSIGN_OR_RETURN(vm_, repo_.OpenVm(o_.vm, Repository::Access::kWrite));

  std::string base = o_.scratch_dir;
  if (base.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    base = tmp && *tmp ? tmp : "/var/tmp";
  }
  ASSIGN_OR_RETURN(auto scratch, ScratchArea::Acquire(base, qmp_->qemu_pid(),
                                                      [this](const std::string& l) { Note(l); }));
  auto result = RunInScratchArea(*scratch);
  // Keep the area only while QEMU may still hold something in it.
  if (area_clean_) {
    Status st = scratch->Remove();
    if (!st.ok()) Note("warning: " + st.ToString());
  }
  return result;
}

Result<std::vector<SnapshotRecord>> LiveBackup::RunInScratchArea(ScratchArea& area) {
  ScratchArea* scratch = &area;
  RETURN_IF_ERROR(RemoveLeftovers(*qmp_, *scratch, [this](const std::string& l) { Note(l); }));
  area_clean_ = true;

  ASSIGN_OR_RETURN(auto disks, QueryDisks(*qmp_));
  RETURN_IF_ERROR(SelectDisks(disks));
  for (DiskPlan& p : plans_) {
    auto latest = vm_->LatestSnapshot(p.disk.name);
    if (latest.ok())
      p.parent = std::move(latest).value();
    else if (!latest.status().IsNotFound())
      return latest.status();
    ASSIGN_OR_RETURN(uint64_t next_seq, vm_->GetCounter("seq/" + p.disk.name));
    RETURN_IF_ERROR(PlanBitmaps(p, next_seq));
    Note(o_.vm + "/" + p.disk.name + ": " + p.reason);
  }
  if (Cancelled()) return Status::Aborted("backup interrupted");

  Status failure;
  area_clean_ = false;  // until the teardown says so
  {
    FleeceSession fleece(*qmp_, *scratch);
    std::vector<FleeceDisk> fd;
    std::vector<json> actions;
    for (const DiskPlan& p : plans_) {
      fd.push_back({p.disk.root_node, p.disk.bitmap_node, p.disk.size,
                    p.use_dirty_map ? std::optional<std::string>(p.old_bitmap) : std::nullopt});
      json add = BitmapAction("block-dirty-bitmap-add", p.disk.bitmap_node, p.new_bitmap);
      add["data"]["persistent"] = p.persistent;
      actions.push_back(add);
      if (!p.old_bitmap.empty())
        actions.push_back(
            BitmapAction("block-dirty-bitmap-disable", p.disk.bitmap_node, p.old_bitmap));
    }
    failure = fleece.Prepare(std::move(fd));
    int64_t instant = 0;
    if (failure.ok() && Cancelled()) failure = Status::Aborted("backup interrupted");
    if (failure.ok()) {
      auto cut = CutWithFreeze(fleece, actions);
      if (cut.ok()) {
        instant = *cut;
        for (DiskPlan& p : plans_) p.added = true;
      } else {
        failure = cut.status();
      }
    }
    if (failure.ok()) failure = fleece.Export();
    for (size_t i = 0; failure.ok() && i < plans_.size(); i++) {
      if (Cancelled()) {
        failure = Status::Aborted("backup interrupted");
        break;
      }
      failure = BackUpDisk(plans_[i], fleece.Uri(i), instant);
    }
    if (failure.ok() && Cancelled()) failure = Status::Aborted("backup interrupted");
    if (failure.ok()) {
      // All disks at once: the VM's backup appears whole or not at all.
      failure = vm_->meta()->Write(commit_, true);
      if (failure.ok()) {
        for (DiskPlan& p : plans_) p.committed = true;
        if (Status st = vm_->RecordCommittedSnapshots(); !st.ok())
          Note("warning: the snapshots of " + o_.vm +
               " are committed, but the snapshot ledger could not be written (the next backup "
               "writes it): " +
               st.ToString());
      } else {
        failure = failure.WithContext("commit the snapshots of " + o_.vm);
      }
    }
    Status td = fleece.Teardown();
    area_clean_ = td.ok();
    if (!td.ok() && !qmp_->closed())
      Note("warning: tearing down the fleecing failed: " + td.ToString() +
           " (the next backup removes what is left)");
  }
  if (!failure.ok() && !failure.IsAborted() && Cancelled() && !qmp_->closed())
    failure = Status::Aborted("backup interrupted (" + failure.message() + ")");
  if (!failure.ok() && qmp_->closed())
    failure = Status::IOError("QEMU went away during the backup (its QMP connection closed): " +
                              failure.message());
  FinishBitmaps();
  // With QEMU gone nothing holds the scratch files any more.
  if (qmp_->closed()) area_clean_ = true;
  if (!failure.ok()) return failure;
  return std::move(snapshots_);
}

}  // namespace

Result<std::vector<SnapshotRecord>> RunLiveBackupJob(Repository& repo,
                                                     const LiveBackupOptions& options) {
  LiveBackup job(repo, options);
  return job.Run();
}

}  // namespace vmdedup
