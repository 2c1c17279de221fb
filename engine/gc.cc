#include "engine/gc.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <thread>
#include <tuple>

#include "store/container.h"
#include "store/reader_lease.h"
#include "store/records.h"

namespace vmdedup {
namespace {

struct VmState {
  std::vector<SnapshotRecord> snapshots;
  std::map<uint64_t, SegmentRecipe> recipes;
  std::map<uint64_t, ContainerRecord> containers;
  std::set<uint64_t> quarantined, lost_recipes;
};

// Every record of the VM, decoded; the first that does not decode is the
// reason liveness is unknown.
Status ReadVm(VmStore& vm, VmState* state) {
  Status bad;
  Status scanned = vm.meta()->Scan("", [&](std::string_view key, std::string_view value) {
    Status st = VerifyEnvelope(key, value);
    if (st.ok() && key.starts_with(kSnapshotKeyPrefix)) {
      SnapshotRecord r;
      st = DecodeSnapshot(key, value, &r);
      if (st.ok()) state->snapshots.push_back(std::move(r));
    } else if (st.ok() && key.starts_with(kSegmentKeyPrefix)) {
      SegmentRecipe r;
      st = DecodeSegmentRecipe(key, value, &r);
      if (st.ok()) state->recipes[r.id] = std::move(r);
    } else if (st.ok() && key.starts_with(kContainerKeyPrefix)) {
      ContainerRecord r;
      st = DecodeContainerRecord(key, value, &r);
      if (st.ok()) state->containers[r.id] = std::move(r);
    } else if (st.ok() && key.starts_with(kQuarantineKeyPrefix)) {
      QuarantineRecord r;
      st = DecodeQuarantine(key, value, &r);
      if (st.ok()) state->quarantined.insert(r.container);
    } else if (st.ok() && key.starts_with(kLostRecipeKeyPrefix)) {
      LostRecipeRecord r;
      st = DecodeLostRecipe(key, value, &r);
      if (st.ok()) state->lost_recipes.insert(r.recipe);
    }
    if (!st.ok()) {
      bad = st;
      return false;
    }
    return true;
  });
  RETURN_IF_ERROR(scanned);
  return bad;
}

class VmCollector {
 public:
  VmCollector(Repository& repo, VmStore& vm, const GcOptions& opt, GcVmReport& report)
      : repo_(repo), vm_(vm), opt_(opt), report_(report) {}

  Status Run() {
    // Liveness must be known whole, or nothing is deleted.
    auto lost = vm_.SnapshotsLostFromStore();
    if (!lost.ok()) return Skip("its snapshot ledger cannot be read: " + lost.status().ToString());
    if (!lost->empty())
      return Skip(std::to_string(lost->size()) +
                  " committed snapshot(s) are gone from its metadata store (run 'vmdedup check')");
    if (!opt_.dry_run) {
      ASSIGN_OR_RETURN(std::vector<SnapshotRecord> pending, vm_.ForgetInProgress());
      if (!pending.empty()) {
        RETURN_IF_ERROR(vm_.ForgetSnapshots(pending));
        report_.forgets_finished = pending.size();
      }
    }
    VmState s;
    if (Status st = ReadVm(vm_, &s); !st.ok())
      return Skip("its metadata does not read whole (" + st.ToString() + "; run 'vmdedup check')");
    std::set<uint64_t> live_recipes;
    for (const SnapshotRecord& snap : s.snapshots) {
      auto segs = vm_.GetSnapshotSegments(snap.disk, snap.seq);
      if (!segs.ok())
        return Skip("snapshot " + snap.Id() + ": " + segs.status().ToString() +
                    " (run 'vmdedup check')");
      for (uint64_t id : *segs) {
        if (id == 0) continue;
        if (!s.recipes.count(id))
          return Skip("snapshot " + snap.Id() + " names the missing recipe " +
                      SegmentRecipeKey(id) + " (run 'vmdedup check')");
        live_recipes.insert(id);
      }
    }
    // Live records, by container; live blocks (each once).
    std::map<uint64_t, std::set<std::pair<uint32_t, uint32_t>>> live_records;
    std::set<std::tuple<uint64_t, uint32_t, uint32_t>> live_blocks;
    for (uint64_t id : live_recipes) {
      for (const BlockRef& b : s.recipes.at(id).blocks) {
        if (b.kind != BlockKind::kOwn) continue;
        live_records[b.container].insert({b.offset, b.record_len});
        if (live_blocks.insert({b.container, b.offset, b.index}).second)
          report_.live_bytes += b.length;
      }
    }

    // What goes.
    WriteBatch batch;
    for (const auto& [id, r] : s.recipes) {
      if (live_recipes.count(id)) continue;
      batch.Delete(SegmentRecipeKey(id));
      if (s.lost_recipes.count(id)) batch.Delete(LostRecipeKey(id));
      report_.recipes_removed++;
    }
    std::vector<std::string> objects_to_delete;
    for (const auto& [cid, c] : s.containers) {
      if (live_records.count(cid)) {
        uint64_t used = 0;
        for (const auto& [offset, len] : live_records.at(cid)) used += len;
        report_.stored_bytes += c.size;
        report_.unused_bytes += c.size > used ? c.size - used : 0;
        continue;
      }
      batch.Delete(ContainerKey(cid));
      if (s.quarantined.count(cid)) batch.Delete(QuarantineKey(cid));
      objects_to_delete.push_back(c.object);
      report_.containers_removed++;
    }
    // Objects the catalog does not know: leftovers of interrupted backups
    // (no backup runs: this gc holds the lock), unless a live recipe
    // references them (their catalog record was lost: check reports it).
    std::vector<std::string> listed;
    RETURN_IF_ERROR(repo_.objects()->List("vms/" + vm_.vm() + "/data/", &listed));
    std::vector<std::string> leftovers;
    for (const std::string& name : listed) {
      uint64_t id = 0;
      if (!ParseContainerObjectName(vm_.vm(), name, &id)) continue;
      if (s.containers.count(id) || live_records.count(id)) continue;
      leftovers.push_back(name);
    }
    std::vector<ObjectStore::Temporary> temps;
    RETURN_IF_ERROR(repo_.objects()->ListTemporary("vms/" + vm_.vm() + "/data/", &temps));

    // Readers whose views may still read any of it defer everything.
    ASSIGN_OR_RETURN(report_.readers, LiveReaders(repo_.path(), vm_.vm()));
    uint64_t freed = 0;
    for (const std::string& o : objects_to_delete) {
      auto size = repo_.objects()->Size(o);
      freed += size.ok() ? *size : 0;
    }
    for (const std::string& o : leftovers) {
      auto size = repo_.objects()->Size(o);
      freed += size.ok() ? *size : 0;
    }
    for (const auto& t : temps)
      if (!t.writer_may_be_alive) freed += t.bytes;
    report_.bytes_freed = freed;
    report_.leftovers_removed = leftovers.size();
    for (const auto& t : temps) report_.leftovers_removed += t.writer_may_be_alive ? 0 : 1;
    if (!report_.readers.empty()) {
      std::string who;
      for (const auto& r : report_.readers) who += (who.empty() ? "" : ", ") + r;
      report_.bytes_freed = 0;
      return Skip("it is being read (" + who + "): its next gc deletes what is unused");
    }
    // Compaction: which partly live containers to rewrite.
    std::vector<uint64_t> repack = ChooseRepack(s, live_records);
    if (opt_.dry_run) {
      // What a rewrite would free: the unused bytes of those containers.
      report_.containers_repacked = repack.size();
      for (uint64_t cid : repack) {
        uint64_t used = 0;
        for (const auto& [offset, len] : live_records.at(cid)) used += len;
        report_.bytes_freed += s.containers.at(cid).size - used;
      }
      return Status::OK();
    }

    // Metadata first, objects after: a crash between leaves only
    // uncatalogued objects, which the next gc removes.
    if (!batch.ops().empty()) RETURN_IF_ERROR(vm_.meta()->Write(batch, true));
    if (!repack.empty()) {
      RETURN_IF_ERROR(Repack(s, live_recipes, live_records, repack, &objects_to_delete));
    }
    // A reader that started meanwhile may read what its view references.
    ASSIGN_OR_RETURN(report_.readers, LiveReaders(repo_.path(), vm_.vm()));
    if (!report_.readers.empty()) {
      report_.bytes_freed = 0;
      return Status::OK();  // the next gc removes what is now unreferenced
    }
    for (const std::string& o : objects_to_delete)
      RETURN_IF_ERROR(repo_.objects()->Delete(o).WithContext("delete " + o));
    for (const std::string& o : leftovers)
      RETURN_IF_ERROR(repo_.objects()->Delete(o).WithContext("delete " + o));
    for (const auto& t : temps)
      if (!t.writer_may_be_alive) RETURN_IF_ERROR(repo_.objects()->RemoveTemporary(t.name));
    return Status::OK();
  }

 private:
  using LiveRecords = std::map<uint64_t, std::set<std::pair<uint32_t, uint32_t>>>;

  // The partly live containers to rewrite, least live first, until the
  // unused share falls to max_unused_percent. Quarantined ones are left.
  std::vector<uint64_t> ChooseRepack(const VmState& s, const LiveRecords& live) {
    struct Candidate {
      uint64_t id, size, used;
    };
    std::vector<Candidate> candidates;
    for (const auto& [cid, records] : live) {
      auto c = s.containers.find(cid);
      if (c == s.containers.end() || s.quarantined.count(cid)) continue;
      uint64_t used = 0;
      for (const auto& [offset, len] : records) used += len;
      if (c->second.size > used + 64) candidates.push_back({cid, c->second.size, used});
    }
    std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
      return a.used * b.size < b.used * a.size;  // lower live share first
    });
    std::vector<uint64_t> out;
    uint64_t unused = report_.unused_bytes, stored = report_.stored_bytes;
    for (const Candidate& c : candidates) {
      if (static_cast<double>(unused) <=
          opt_.max_unused_percent / 100.0 * static_cast<double>(stored))
        break;
      out.push_back(c.id);
      unused -= c.size - c.used;
      stored -= c.size - c.used;
    }
    return out;
  }

  // Copies the live records of `repack` into new containers, then re-points
  // the recipes and swaps the catalog records in one synced batch; adds the
  // old objects to `to_delete`. A container whose live records do not all
  // verify is left as it is.
  Status Repack(const VmState& s, const std::set<uint64_t>& live_recipes, const LiveRecords& live,
                const std::vector<uint64_t>& repack, std::vector<std::string>* to_delete) {
    const size_t capacity = repo_.config().container_capacity;
    std::map<std::pair<uint64_t, uint32_t>, std::pair<uint64_t, uint32_t>> moved;
    WriteBatch batch;
    std::vector<std::string> old_objects;
    ContainerWriter writer(0, capacity);
    bool have_id = false;
    ContainerRecord rec;
    auto seal = [&]() -> Status {
      if (writer.empty()) return Status::OK();
      rec.id = writer.id();
      rec.block_count = writer.block_count();
      rec.object = ContainerObjectName(vm_.vm(), rec.id);
      rec.written_by = "gc";
      std::string bytes = writer.Finish();
      rec.size = bytes.size();
      RETURN_IF_ERROR(repo_.objects()->PutNew(
          rec.object, {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}));
      report_.bytes_written += bytes.size();
      batch.Put(ContainerKey(rec.id), EncodeContainerRecord(ContainerKey(rec.id), rec));
      rec = ContainerRecord{};
      have_id = false;
      return Status::OK();
    };
    for (uint64_t cid : repack) {
      const ContainerRecord& old = s.containers.at(cid);
      std::string data;
      if (!repo_.objects()->Get(old.object, &data).ok()) continue;
      // Every live record must verify before any is copied.
      std::vector<std::pair<uint32_t, std::string_view>> records;
      std::vector<RecordView> views;
      bool sound = true;
      for (const auto& [offset, len] : live.at(cid)) {
        if (uint64_t{offset} + len > data.size()) {
          sound = false;
          break;
        }
        RecordView view;
        std::string_view record(data.data() + offset, len);
        if (!RecordView::Parse(record, old.object, &view).ok()) {
          sound = false;
          break;
        }
        records.push_back({offset, record});
        views.push_back(view);
      }
      if (!sound) continue;
      for (size_t i = 0; i < records.size(); i++) {
        if (!have_id || !writer.FitsRecord(records[i].second.size())) {
          RETURN_IF_ERROR(seal());
          ASSIGN_OR_RETURN(uint64_t id, vm_.AllocateContainerId());
          writer.Reset(id);
          have_id = true;
        }
        const uint32_t at = writer.AppendRecord(views[i], records[i].second);
        rec.raw_bytes += views[i].raw_len();
        moved[{cid, records[i].first}] = {writer.id(), at};
      }
      batch.Delete(ContainerKey(cid));
      old_objects.push_back(old.object);
      report_.containers_repacked++;
      uint64_t used = 0;
      for (const auto& [offset, record] : records) used += record.size();
      report_.stored_bytes -= old.size;
      report_.unused_bytes -= std::min(report_.unused_bytes, old.size - used);
    }
    RETURN_IF_ERROR(seal());
    report_.stored_bytes += report_.bytes_written;
    if (old_objects.empty()) return Status::OK();
    // The recipes that reference a moved record, re-pointed (same ids).
    for (uint64_t id : live_recipes) {
      SegmentRecipe r = s.recipes.at(id);
      bool changed = false;
      for (BlockRef& b : r.blocks) {
        if (b.kind != BlockKind::kOwn) continue;
        auto it = moved.find({b.container, b.offset});
        if (it == moved.end()) continue;
        b.container = it->second.first;
        b.offset = it->second.second;
        changed = true;
      }
      if (changed) batch.Put(SegmentRecipeKey(id), EncodeSegmentRecipe(SegmentRecipeKey(id), r));
    }
    RETURN_IF_ERROR(vm_.meta()->Write(batch, true));
    for (const std::string& o : old_objects) {
      auto size = repo_.objects()->Size(o);
      report_.bytes_freed += size.ok() ? *size : 0;
      to_delete->push_back(o);
    }
    report_.bytes_freed -= std::min(report_.bytes_freed, report_.bytes_written);
    return Status::OK();
  }

  Status Skip(std::string why) {
    report_.skipped = std::move(why);
    return Status::OK();
  }

  Repository& repo_;
  VmStore& vm_;
  const GcOptions& opt_;
  GcVmReport& report_;
};

}  // namespace

bool GcReport::complete() const {
  for (const auto& v : vms)
    if (!v.skipped.empty()) return false;
  return true;
}

Result<GcReport> CollectGarbage(Repository& repo, const GcOptions& options) {
  GcReport report;
  std::vector<std::string> vms;
  if (!options.vm.empty()) {
    // Named: it must exist (opening it to write would create it).
    ASSIGN_OR_RETURN(std::vector<std::string> dirs, repo.ListVmDirectories());
    if (std::find(dirs.begin(), dirs.end(), options.vm) == dirs.end())
      return Status::NotFound("VM '" + options.vm + "' has no backups in repository " +
                              repo.path());
    vms.push_back(options.vm);
  } else {
    ASSIGN_OR_RETURN(vms, repo.ListVms());
  }
  for (const std::string& name : vms) {
    if (options.cancel != nullptr && options.cancel->load())
      return Status::Aborted("gc interrupted");
    GcVmReport vr;
    vr.vm = name;
    if (options.progress) options.progress("collecting VM " + name);
    const auto wait_until =
        std::chrono::steady_clock::now() +
        std::chrono::milliseconds(static_cast<int64_t>(options.lock_wait_seconds * 1000));
    auto vm = repo.OpenVm(name, Repository::Access::kWrite);
    while (!vm.ok() && vm.status().IsBusy() && std::chrono::steady_clock::now() < wait_until &&
           !(options.cancel != nullptr && options.cancel->load())) {
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      vm = repo.OpenVm(name, Repository::Access::kWrite);
    }
    if (!vm.ok()) {
      if (!options.vm.empty() && !vm.status().IsBusy()) return vm.status();
      vr.skipped = vm.status().ToString();
      report.vms.push_back(std::move(vr));
      continue;
    }
    VmCollector collector(repo, **vm, options, vr);
    RETURN_IF_ERROR(collector.Run().WithContext("gc of VM '" + name + "'"));
    report.bytes_freed += vr.bytes_freed;
    report.vms.push_back(std::move(vr));
  }
  return report;
}

}  // namespace vmdedup
