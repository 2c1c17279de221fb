#include "engine/backup_job.h"

#include <algorithm>
#include <memory>
#include <set>

#include "base/human_size.h"
#include "dirty-bitmap/image_bitmaps.h"
#include "engine/image_source.h"
#include "engine/series_bitmaps.h"
#include "nbd-client/block_source.h"
#include "nbd-client/raw_file_source.h"

namespace vmdedup {
namespace {

void Note(const BackupJobOptions& o, const std::string& line) {
  if (o.note) o.note(line);
}

// The bitmap plan for a qcow2 image: what to export and what to record.
struct ImageBitmapPlan {
  bool incremental = false;
  std::string reason;       // why full, or which bitmap is used
  std::string export_name;  // bitmap exported to the pipeline (incremental)
  std::string new_name;     // bitmap created now, recorded in the snapshot
};

Result<ImageBitmapPlan> PrepareImageBitmaps(const Repository& repo, VmStore& vm,
                                            const BackupJobOptions& o, const ImageInfo& info,
                                            const std::optional<SnapshotRecord>& parent,
                                            uint64_t next_seq) {
  ImageBitmapPlan plan;
  const std::string prefix = SeriesBitmapPrefix(repo.config().repo_id, o.vm, o.disk);
  const std::string parent_bitmap = parent ? parent->bitmap : "";
  // Only a bitmap of the current naming can continue the parent: one of the
  // older scheme could be another series' (engine/series_bitmaps.h).
  const bool parent_named_now = SeriesBitmapSeq(parent_bitmap, prefix).has_value();
  // Bitmaps named by older snapshots of the series are stale, as is the
  // parent's of the older scheme; others of ours were left by an
  // interrupted run (of this repository or a copy of it) and hold writes
  // since the parent.
  std::set<std::string> stale;
  ASSIGN_OR_RETURN(auto snaps, vm.ListSnapshots(o.disk));
  for (const auto& s : snaps)
    if (!s.bitmap.empty() && (s.bitmap != parent_bitmap || !parent_named_now))
      stale.insert(s.bitmap);

  const ImageBitmap* parent_bm = nullptr;
  std::vector<std::string> orphans;
  for (const ImageBitmap& b : info.bitmaps) {
    if (stale.count(b.name)) {
      RETURN_IF_ERROR(RemoveBitmap(info.path, b.name));
    } else if (!SeriesBitmapSeq(b.name, prefix)) {
      continue;  // not ours: never touched
    } else if (b.name == parent_bitmap) {
      parent_bm = &b;
    } else {
      orphans.push_back(b.name);
    }
  }
  bool parent_usable = parent_bm != nullptr && !parent_bm->in_use;
  bool recovered = false;
  // Merge and enable before removing anything: were the parent's bitmap
  // still disabled when an orphan is gone, a crash in between would leave
  // later writes tracked by no bitmap (the next backup would read it all).
  for (const std::string& name : orphans) {
    auto it = std::find_if(info.bitmaps.begin(), info.bitmaps.end(),
                           [&](const ImageBitmap& b) { return b.name == name; });
    if (parent_usable && !it->in_use) {
      RETURN_IF_ERROR(MergeBitmap(info.path, name, parent_bitmap));
      recovered = true;
    }
  }
  if (recovered && !parent_bm->enabled) RETURN_IF_ERROR(EnableBitmap(info.path, parent_bitmap));
  for (const std::string& name : orphans) RETURN_IF_ERROR(RemoveBitmap(info.path, name));

  if (!parent) {
    plan.reason = "full: first backup of " + o.vm + "/" + o.disk;
  } else if (o.full) {
    plan.reason = "full: --full given";
  } else if (parent->size != info.virtual_size) {
    plan.reason = "full: disk size changed from " + HumanSize(parent->size) + " to " +
                  HumanSize(info.virtual_size);
  } else if (parent_bitmap.empty()) {
    plan.reason = "full: the parent snapshot " + parent->Id() + " has no dirty bitmap to continue";
  } else if (!parent_named_now) {
    plan.reason = "full: bitmap " + parent_bitmap +
                  " has vmdedup's older name, which two series could share; reading all once";
  } else if (parent_bm == nullptr) {
    plan.reason = "full: bitmap " + parent_bitmap +
                  " is missing from the image (removed, or the image was replaced)";
  } else if (parent_bm->in_use) {
    plan.reason =
        "full: bitmap " + parent_bitmap + " is inconsistent (the image was not closed cleanly)";
  } else if (!parent_bm->enabled && !recovered) {
    plan.reason = "full: bitmap " + parent_bitmap + " was disabled, so writes may be missing";
  } else {
    plan.incremental = true;
    plan.export_name = parent_bitmap;
    plan.reason = "incremental: dirty bitmap " + parent_bitmap + " since " + parent->Id();
  }
  if (!plan.incremental && parent_bm != nullptr)
    RETURN_IF_ERROR(RemoveBitmap(info.path, parent_bitmap));

  plan.new_name = NewSeriesBitmapName(prefix, next_seq);
  RETURN_IF_ERROR(AddBitmap(info.path, plan.new_name, /*enabled=*/true));
  // An enabled bitmap cannot be exported read-only; it records nothing while
  // the image is exported read-only anyway.
  if (plan.incremental) RETURN_IF_ERROR(DisableBitmap(info.path, plan.export_name));
  return plan;
}

// After a failed backup: fold the new bitmap back into the parent's so that
// nothing written since the parent is ever missed.
void RollBackImageBitmaps(const std::string& path, const ImageBitmapPlan& plan,
                          const BackupJobOptions& o) {
  Status st;
  if (plan.incremental) {
    st = MergeBitmap(path, plan.new_name, plan.export_name);
    if (st.ok()) st = EnableBitmap(path, plan.export_name);
    if (st.ok()) st = RemoveBitmap(path, plan.new_name);
  } else {
    // Without a parent bitmap the next backup reads everything anyway.
    st = RemoveBitmap(path, plan.new_name);
  }
  if (!st.ok())
    Note(o, "warning: could not restore the dirty bitmaps of " + path + ": " + st.ToString() +
                " (the next backup will detect it)");
}

}  // namespace

Result<SnapshotRecord> RunBackupJob(Repository& repo, const BackupJobOptions& o) {
  RETURN_IF_ERROR(ValidateName("VM", o.vm));
  RETURN_IF_ERROR(ValidateName("disk", o.disk));
  ASSIGN_OR_RETURN(auto vm, repo.OpenVm(o.vm, Repository::Access::kWrite));
  std::optional<SnapshotRecord> parent;
  auto latest = vm->LatestSnapshot(o.disk);
  if (latest.ok())
    parent = std::move(latest).value();
  else if (!latest.status().IsNotFound())
    return latest.status();

  BackupRequest req;
  req.disk = o.disk;
  req.parent = parent;
  req.threads = o.threads;
  req.cds = o.cds;
  req.tags = o.tags;
  req.cancel = o.cancel;
  req.progress = o.progress;
  req.note = o.note;

  std::unique_ptr<BlockSource> source;
  std::optional<ImageBitmapPlan> plan;
  std::string image_path;
  ASSIGN_OR_RETURN(std::optional<ImageSourceSpec> image, ParseImageSource(o.source));
  if (image) {
    image_path = image->path;
    if (o.bitmap)
      return Status::InvalidArgument(
          "--bitmap is for NBD URIs; vmdedup manages the bitmaps of qcow2 images itself");
    ASSIGN_OR_RETURN(
        const std::string format,
        ResolveImageFormat(*image, o.format, parent ? parent->source_format : "", o.source));
    if (parent && !parent->source_format.empty() && parent->source_format != format)
      Note(o, "note: " + parent->Id() + " read this disk as " + parent->source_format +
                  ", this backup reads it as " + format);
    ASSIGN_OR_RETURN(ImageInfo info, InspectSourceImage(image_path, format, o.backing_chain));
    // Recorded so that the next file: backup of the series needs no
    // --format; not in a repository of format version 1, whose snapshot
    // records an older vmdedup must read.
    if (repo.config().format_version >= 2) req.source_format = format;
    ImageFileOptions fo;
    fo.path = image_path;
    fo.cancel = o.cancel;
    fo.io_timeout_seconds = o.io_timeout_seconds;
    fo.format = info.format;
    if (info.format == "qcow2") {
      ASSIGN_OR_RETURN(uint64_t next_seq, vm->GetCounter("seq/" + o.disk));
      ASSIGN_OR_RETURN(plan, PrepareImageBitmaps(repo, *vm, o, info, parent, next_seq));
      if (plan->incremental) fo.bitmap = plan->export_name;
      req.read_mode = plan->reason;
      req.bitmap = plan->new_name;
    } else {
      req.read_mode = "full: raw images have no dirty bitmap";
    }
    // A raw image is read directly (no qemu-nbd: nothing to translate);
    // qcow2 goes through qemu-nbd, which also exports its bitmap.
    auto opened = info.format == "raw" ? OpenRawFile(image_path) : OpenImageFile(fo);
    if (!opened.ok()) {
      if (plan) RollBackImageBitmaps(image_path, *plan, o);
      return opened.status();
    }
    source = std::move(opened).value();
    req.use_dirty_map = plan && plan->incremental;
    if (req.use_dirty_map && !source->has_dirty_map()) {
      req.use_dirty_map = false;
      req.read_mode = "full: qemu-nbd did not export bitmap " + plan->export_name;
    }
  } else if (IsNbdUri(o.source)) {
    if (!o.format.empty())
      return Status::InvalidArgument("--format is for image files (file:PATH), not NBD URIs");
    NbdUriOptions no;
    no.uri = o.source;
    no.cancel = o.cancel;
    no.io_timeout_seconds = o.io_timeout_seconds;
    no.bitmap = o.bitmap;
    ASSIGN_OR_RETURN(source, OpenNbdUri(no));
    if (!o.bitmap) {
      req.read_mode = "full: no --bitmap given for this NBD source";
    } else if (!source->has_dirty_map()) {
      req.read_mode = "full: the server does not export bitmap " + *o.bitmap;
    } else if (!parent) {
      req.read_mode = "full: first backup of " + o.vm + "/" + o.disk;
    } else if (o.full) {
      req.read_mode = "full: --full given";
    } else if (parent->size != source->size()) {
      req.read_mode = "full: disk size changed from " + HumanSize(parent->size) + " to " +
                      HumanSize(source->size());
    } else {
      req.use_dirty_map = true;
      req.read_mode = "incremental: caller-managed bitmap " + *o.bitmap + " since " + parent->Id();
    }
    if (o.bitmap) req.bitmap = *o.bitmap;
  } else {
    return Status::InvalidArgument("unknown source '" + o.source +
                                   "': use raw:PATH, qcow2:PATH, file:PATH with --format, or an "
                                   "NBD URI (nbd://HOST[:PORT]/EXPORT, "
                                   "nbd+unix:///EXPORT?socket=PATH)");
  }
  Note(o, req.read_mode);
  req.source = source.get();

  auto snap = RunBackup(repo, *vm, req);
  source.reset();  // disconnect; stops qemu-nbd before bitmaps are edited
  if (!snap.ok()) {
    if (plan) RollBackImageBitmaps(image_path, *plan, o);
    return snap.status();
  }
  if (Status st = vm->RecordCommittedSnapshots(); !st.ok())
    Note(o, "warning: snapshot " + snap->Id() +
                " is committed, but the snapshot ledger could not be written (the next backup "
                "writes it): " +
                st.ToString());
  if (plan && plan->incremental) {
    Status st = RemoveBitmap(image_path, plan->export_name);
    if (!st.ok())
      Note(o,
           "warning: could not remove the old bitmap " + plan->export_name + ": " + st.ToString());
  }
  return snap;
}

}  // namespace vmdedup
