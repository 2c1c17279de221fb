#include "store/check.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "base/encoding.h"
#include "base/fingerprint.h"
#include "store/cds_area.h"
#include "store/container.h"
#include "store/records.h"
#include "store/snapshot_ledger.h"

namespace vmdedup {
namespace {

// A block in a container: its record (offset, length), its index in the
// record (0 but in a frame record) and fingerprint.
struct Ref {
  uint32_t offset;
  uint32_t record_len;
  uint32_t index;
  Fingerprint fp;
  bool operator<(const Ref& o) const {
    return std::tie(offset, record_len, index, fp) <
           std::tie(o.offset, o.record_len, o.index, o.fp);
  }
};

// Reads container `object` (id `cid`), verifies every record and re-hashes
// its plaintext; fills `valid` with the records found sound.
Status VerifyContainerRecords(Repository& repo, const std::string& object, uint64_t cid,
                              CheckReport& report, std::set<Ref>* valid) {
  std::string data;
  RETURN_IF_ERROR(repo.objects()->Get(object, &data));
  return VerifyContainerBlocks(data, cid, object, [&](const VerifiedBlock& b) {
    report.blocks_verified++;
    report.bytes_verified += b.raw_len;
    valid->insert({b.offset, b.record_len, b.index, b.fingerprint});
  });
}

// What the VMs' CDS references are checked against: the CDS containers that
// published versions reach (with their sizes) and, with read_data, the
// records found valid in them.
struct CdsState {
  std::set<uint64_t> published;
  std::map<uint64_t, uint64_t> container_sizes;     // present containers
  std::map<uint64_t, std::set<Ref>> valid_records;  // read_data only
  std::set<uint64_t> damaged_containers;
  // Of those, the ones found damaged (not an I/O error): quarantined.
  std::set<uint64_t> to_quarantine;
};

// What a quarantine is for: an object missing, of the wrong shape, or a
// link. An I/O error may pass, and a quarantine is for good.
bool IsDamage(const Status& st) { return st.IsNotFound() || st.IsCorruption(); }

void AddFinding(CheckReport& report, CheckFinding::Kind kind, std::string msg, uint64_t bytes = 0) {
  report.findings.push_back({kind, "", std::move(msg), {}, bytes});
  if (kind == CheckFinding::Kind::kReclaimable) report.reclaimable_bytes += bytes;
}

// The CDS area: pointer, every published version's manifest and index, the
// containers they reach (read and re-hashed with read_data), leftovers.
Status CheckCdsArea(Repository& repo, const CheckOptions& opt, CheckReport& report,
                    CdsState* state) {
  CdsArea area(repo.objects());
  auto pointer = area.ReadPointer();
  if (!pointer.ok()) {
    AddFinding(report, CheckFinding::Kind::kError, pointer.status().ToString());
    return Status::OK();
  }
  if (pointer->published.empty()) return Status::OK();
  if (opt.progress) opt.progress("checking the common data set");
  std::map<uint64_t, std::vector<std::pair<uint64_t, CdsEntry>>> entries_by_container;
  for (uint64_t v : pointer->published) {
    state->published.insert(v);
    auto manifest = area.ReadManifest(v);
    if (!manifest.ok()) {
      AddFinding(report, CheckFinding::Kind::kError,
                 "CDS version " + std::to_string(v) + ": " + manifest.status().ToString());
      continue;
    }
    std::vector<CdsEntry> entries;
    Status st = area.ReadEntries(v, &entries);
    if (!st.ok()) {
      AddFinding(report, CheckFinding::Kind::kError,
                 "CDS version " + std::to_string(v) + ": " + st.ToString());
      continue;
    }
    report.cds_versions++;
    for (const CdsEntry& e : entries) entries_by_container[e.container].push_back({v, e});
  }
  for (const auto& [cid, entries] : entries_by_container) {
    const std::string object = CdsArea::ContainerObjectName(cid);
    auto size = repo.objects()->Size(object);
    if (!size.ok()) {
      AddFinding(report, CheckFinding::Kind::kError,
                 "CDS container " + object + ": " + size.status().ToString());
      state->damaged_containers.insert(cid);
      if (IsDamage(size.status())) state->to_quarantine.insert(cid);
      continue;
    }
    report.cds_containers++;
    state->container_sizes[cid] = *size;
    for (const auto& [v, e] : entries) {
      if (uint64_t{e.offset} + e.record_len > *size) {
        AddFinding(report, CheckFinding::Kind::kError,
                   "CDS version " + std::to_string(v) + " refers past the end of " + object);
        state->damaged_containers.insert(cid);
        state->to_quarantine.insert(cid);
        break;
      }
    }
    if (!opt.read_data) continue;
    if (opt.progress) opt.progress("reading " + object);
    std::set<Ref>& valid = state->valid_records[cid];
    Status st = VerifyContainerRecords(repo, object, cid, report, &valid);
    if (!st.ok()) {
      AddFinding(report, CheckFinding::Kind::kError, st.ToString());
      state->damaged_containers.insert(cid);
      if (IsDamage(st)) state->to_quarantine.insert(cid);
      continue;
    }
    for (const auto& [v, e] : entries) {
      if (!valid.count({e.offset, e.record_len, 0, e.fingerprint})) {
        AddFinding(report, CheckFinding::Kind::kError,
                   "CDS version " + std::to_string(v) + ": " + object + " has no record with " +
                       "fingerprint " + e.fingerprint.Hex() + " at offset " +
                       std::to_string(e.offset));
        state->damaged_containers.insert(cid);
        state->to_quarantine.insert(cid);
        break;
      }
    }
  }
  auto before = area.ReadQuarantine();
  if (!before.ok())
    AddFinding(report, CheckFinding::Kind::kError,
               before.status().ToString() +
                   " (backups take no CDS block while it is damaged; a check that finds a "
                   "damaged CDS container writes it anew)");
  if (!state->to_quarantine.empty()) {
    Status st = area.AddToQuarantine(state->to_quarantine);
    if (st.ok()) {
      for (uint64_t cid : state->to_quarantine)
        report.quarantined += before.ok() && before->count(cid) ? 0 : 1;
    } else {
      AddFinding(report, CheckFinding::Kind::kSkipped,
                 "could not quarantine the damaged CDS containers (backups may still take blocks "
                 "from them): " +
                     st.ToString());
    }
  }
  std::vector<std::string> leftovers;
  if (Status st = area.ListLeftovers(&leftovers); !st.ok()) {
    // A published manifest that cannot be read (reported above) leaves the
    // leftovers unknown; the rest of the check goes on.
    AddFinding(report, CheckFinding::Kind::kError,
               "cannot tell the CDS area's leftovers: " + st.ToString());
    return Status::OK();
  }
  for (const std::string& name : leftovers) {
    auto size = repo.objects()->Size(name);
    AddFinding(report, CheckFinding::Kind::kReclaimable,
               "CDS object " + name + " belongs to no published version (left by an " +
                   "interrupted cds build)",
               size.ok() ? *size : 0);
  }
  return Status::OK();
}

class VmCheck {
 public:
  VmCheck(Repository& repo, VmStore& vm, const CheckOptions& opt, const CdsState& cds,
          CheckReport& report)
      : repo_(repo), vm_(vm), opt_(opt), cds_(cds), report_(report) {}
  Status Run();

 private:
  void Error(std::string msg, std::vector<std::string> snaps = {}) {
    report_.findings.push_back(
        {CheckFinding::Kind::kError, vm_.vm(), std::move(msg), std::move(snaps), 0});
  }
  // An error that leaves the VM's liveness unknown: a record that does not
  // decode, a snapshot whose segments cannot be listed, a recipe a snapshot
  // needs that is missing. What such a snapshot uses cannot be told from
  // what nothing uses, so no leftover of the VM is reported reclaimable.
  void MetadataError(std::string msg, std::vector<std::string> snaps = {}) {
    Error(std::move(msg), std::move(snaps));
    liveness_unknown_ = true;
  }
  // A container of the VM found damaged: later backups take nothing from it.
  void Quarantine(uint64_t cid, const std::string& reason) {
    auto added = vm_.QuarantineContainer(cid, reason);
    if (added.ok()) {
      report_.quarantined += *added ? 1 : 0;
      return;
    }
    report_.findings.push_back(
        {CheckFinding::Kind::kSkipped,
         vm_.vm(),
         "could not quarantine container " + Hex16(cid) +
             " (backups may still take records from it): " + added.status().ToString(),
         {},
         0});
  }
  void Reclaimable(std::string msg, uint64_t bytes) {
    if (liveness_unknown_) {
      withheld_items_++;
      withheld_bytes_ += bytes;
      return;
    }
    report_.findings.push_back(
        {CheckFinding::Kind::kReclaimable, vm_.vm(), std::move(msg), {}, bytes});
    report_.reclaimable_bytes += bytes;
  }
  std::vector<std::string> SnapshotsUsingRecipes(const std::set<uint64_t>& bad);
  std::vector<std::string> SnapshotsUsingContainer(uint64_t id);

  Repository& repo_;
  VmStore& vm_;
  const CheckOptions& opt_;
  const CdsState& cds_;
  CheckReport& report_;
  std::map<uint64_t, SegmentRecipe> recipes_;
  std::map<uint64_t, ContainerRecord> containers_;
  std::vector<SnapshotRecord> snapshots_;
  std::map<std::string, std::vector<uint64_t>> snapshot_segments_;  // by snapshot id
  bool liveness_unknown_ = false;                                   // set by MetadataError
  uint64_t withheld_items_ = 0, withheld_bytes_ = 0;
};

// "vm/disk/seq" of a snapshot record's key ("snap/DISK/SEQ"), or "" when
// the key is not one.
std::string SnapshotIdOfKey(const std::string& vm, std::string_view key) {
  if (!key.starts_with(kSnapshotKeyPrefix)) return "";
  std::string_view rest = key.substr(kSnapshotKeyPrefix.size());
  size_t slash = rest.rfind('/');
  if (slash == std::string_view::npos || slash == 0 || slash + 1 == rest.size()) return "";
  std::string_view seq = rest.substr(slash + 1);
  size_t i = 0;
  while (i + 1 < seq.size() && seq[i] == '0') i++;
  if (seq.find_first_not_of("0123456789") != std::string_view::npos) return "";
  return vm + "/" + std::string(rest.substr(0, slash)) + "/" + std::string(seq.substr(i));
}

std::vector<std::string> VmCheck::SnapshotsUsingRecipes(const std::set<uint64_t>& bad) {
  std::vector<std::string> out;
  for (const auto& [id, segs] : snapshot_segments_)
    for (uint64_t s : segs)
      if (bad.count(s)) {
        out.push_back(id);
        break;
      }
  return out;
}

std::vector<std::string> VmCheck::SnapshotsUsingContainer(uint64_t cid) {
  std::set<uint64_t> bad;
  for (const auto& [id, r] : recipes_)
    for (const BlockRef& b : r.blocks)
      if (b.kind == BlockKind::kOwn && b.container == cid) {
        bad.insert(id);
        break;
      }
  return SnapshotsUsingRecipes(bad);
}

Status VmCheck::Run() {
  // 1. Every record: envelope and type-specific decoding. A metadata store
  // damaged below its records (a LevelDB table block that fails its
  // checksum) yields every record it can still read and then the damage:
  // the check goes on with those, and reads what each snapshot needs the
  // way a restore does (step 2b).
  Status scanned = vm_.meta()->Scan("", [&](std::string_view key, std::string_view value) {
    std::string k(key);
    Status st = VerifyEnvelope(key, value);
    if (st.ok()) {
      if (k.starts_with(kSegmentKeyPrefix)) {
        SegmentRecipe r;
        st = DecodeSegmentRecipe(key, value, &r);
        if (st.ok()) recipes_[r.id] = std::move(r);
      } else if (k.starts_with(kContainerKeyPrefix)) {
        ContainerRecord r;
        st = DecodeContainerRecord(key, value, &r);
        if (st.ok()) containers_[r.id] = std::move(r);
      } else if (k.starts_with(kSnapshotKeyPrefix)) {
        SnapshotRecord r;
        st = DecodeSnapshot(key, value, &r);
        if (st.ok()) snapshots_.push_back(std::move(r));
      }
    }
    if (!st.ok()) {
      std::string id = SnapshotIdOfKey(vm_.vm(), key);
      MetadataError(st.ToString(), id.empty() ? std::vector<std::string>{} : std::vector{id});
    }
    return true;
  });
  const bool store_damaged = scanned.IsCorruption();
  if (store_damaged) {
    MetadataError(scanned.ToString() +
                  " (the records in its damaged part cannot be read: the snapshots that need "
                  "them are named below, and a snapshot whose own record was there is not "
                  "listed at all; 'vmdedup repair -r " +
                  repo_.path() + " --vm " + vm_.vm() +
                  "' salvages everything outside the damaged part; docs/operations.md, "
                  "\"Damage\")");
  } else {
    RETURN_IF_ERROR(scanned);
  }
  report_.recipes += recipes_.size();
  report_.containers += containers_.size();
  report_.snapshots += snapshots_.size();

  // 1b. The snapshot ledger: snapshots committed once and gone from the
  // store (store/snapshot_ledger.h). What they used looks unreferenced.
  const std::string repair = "'vmdedup repair -r " + repo_.path() + " --vm " + vm_.vm() + "'";
  if (auto ledger = ReadLedger(*repo_.objects(), vm_.vm()); !ledger.ok()) {
    MetadataError(ledger.status().ToString() +
                  " (whether committed snapshots were lost cannot be "
                  "told; " +
                  repair + " writes the ledger again from the metadata store)");
  } else if (ledger->has_value()) {
    std::set<std::pair<std::string, uint64_t>> have;
    for (const SnapshotRecord& s : snapshots_) have.insert({s.disk, s.seq});
    std::vector<std::string> gone;
    for (const auto& [key, state] : **ledger) {
      const std::string id = vm_.vm() + "/" + key.first + "/" + std::to_string(key.second);
      if (state == LedgerState::kCommitted && !have.count(key)) gone.push_back(id);
      if (state == LedgerState::kForgotten && have.count(key))
        Reclaimable("snapshot " + id +
                        " was forgotten but its records remain (an interrupted forget; the next "
                        "forget of the VM removes them)",
                    0);
    }
    if (!gone.empty())
      MetadataError(std::to_string(gone.size()) +
                        " committed snapshot(s) are gone from the metadata store (the snapshot "
                        "ledger lists them): a lost log file, or metadata put back from an older "
                        "copy; backups of the VM are refused until " +
                        repair + " records the loss",
                    gone);
  }

  // 2. Snapshots → segment lists → recipes.
  std::set<uint64_t> live_recipes;
  for (const SnapshotRecord& s : snapshots_) {
    if (s.cds_version != 0 && !cds_.published.count(s.cds_version)) {
      Error("snapshot " + s.Id() + " was made with CDS version " + std::to_string(s.cds_version) +
                ", which the CDS area does not list as published",
            {s.Id()});
    }
    auto segs = vm_.GetSnapshotSegments(s.disk, s.seq);
    if (!segs.ok()) {
      MetadataError(segs.status().ToString(), {s.Id()});
      continue;
    }
    if (segs->size() != s.segment_count) {
      MetadataError("snapshot " + s.Id() + ": segment list length " + std::to_string(segs->size()) +
                        " does not match " + std::to_string(s.segment_count),
                    {s.Id()});
      continue;
    }
    for (uint64_t i = 0; i < segs->size(); i++) {
      uint64_t id = (*segs)[i];
      if (id == 0) continue;
      auto it = recipes_.find(id);
      uint64_t len = std::min<uint64_t>(s.segment_size, s.size - i * s.segment_size);
      if (it == recipes_.end()) {
        MetadataError("snapshot " + s.Id() + ": segment " + std::to_string(i) +
                          " refers to missing recipe " + SegmentRecipeKey(id),
                      {s.Id()});
      } else if (it->second.length != len) {
        Error("snapshot " + s.Id() + ": segment " + std::to_string(i) + " recipe " +
                  SegmentRecipeKey(id) + " has length " + std::to_string(it->second.length),
              {s.Id()});
      }
      live_recipes.insert(id);
    }
    snapshot_segments_[s.Id()] = std::move(segs).value();
  }

  // 2b. A damaged store: what a restore reads, read as it does (one key at
  // a time). A damaged table block hides every key in its range, even
  // those an older table holds and the scan above found.
  std::map<uint64_t, std::string> unreadable;  // recipe → why
  if (store_damaged) {
    for (const SnapshotRecord& s : snapshots_) {
      if (auto r = vm_.GetSnapshot(s.disk, s.seq); !r.ok())
        Error("snapshot " + s.Id() + ": " + r.status().ToString(), {s.Id()});
    }
    for (uint64_t id : live_recipes) {
      if (!recipes_.count(id)) continue;  // missing: reported above
      auto r = vm_.GetSegmentRecipe(id);
      if (!r.ok()) unreadable[id] = r.status().ToString();
    }
  }
  // Recipes that snapshots use and that cannot be had: recorded, so that
  // later backups read those segments again (docs/format.md, "Quarantine").
  uint64_t not_recorded = 0;
  Status first_failure;
  for (uint64_t id : live_recipes) {
    if (recipes_.count(id) && !unreadable.count(id)) continue;
    auto added = vm_.RecordLostRecipe(
        id, unreadable.count(id) ? unreadable[id] : "missing from the metadata store");
    if (added.ok()) {
      report_.lost_recipes += *added ? 1 : 0;
    } else if (not_recorded++ == 0) {
      first_failure = added.status();
    }
  }
  if (not_recorded > 0)
    report_.findings.push_back(
        {CheckFinding::Kind::kSkipped,
         vm_.vm(),
         "could not record " + std::to_string(not_recorded) +
             " lost segment recipe(s) (a backup may still reuse them; 'vmdedup repair' first): " +
             first_failure.ToString(),
         {},
         0});

  // 3. Live recipes → containers. A problem is reported once, with the
  // recipes that have it (a damaged container may be referenced by
  // thousands of blocks).
  std::map<uint64_t, std::set<Ref>> refs;  // container → referenced records
  std::set<uint64_t> bad_recipes;
  std::map<std::string, std::set<uint64_t>> problems;  // problem → recipes
  if (!unreadable.empty()) {
    std::set<uint64_t> ids;
    for (const auto& [id, why] : unreadable) ids.insert(id);
    bad_recipes.insert(ids.begin(), ids.end());
    const auto& [first, why] = *unreadable.begin();
    Error(ids.size() == 1 ? "segment recipe " + SegmentRecipeKey(first) + " cannot be read: " + why
                          : std::to_string(ids.size()) + " segment recipes cannot be read (" +
                                SegmentRecipeKey(first) + ": " + why + ")",
          SnapshotsUsingRecipes(ids));
  }
  for (uint64_t id : live_recipes) {
    auto it = recipes_.find(id);
    if (it == recipes_.end() || unreadable.count(id)) continue;
    for (const BlockRef& b : it->second.blocks) {
      if (b.kind == BlockKind::kZero) continue;
      if (b.kind == BlockKind::kCds) {
        const std::string object = CdsArea::ContainerObjectName(b.container);
        auto size = cds_.container_sizes.find(b.container);
        std::string problem;
        if (cds_.damaged_containers.count(b.container)) {
          problem = "to " + object + ", which is damaged";
        } else if (size == cds_.container_sizes.end()) {
          problem = "to CDS container " + object + ", which no published CDS version has";
        } else if (uint64_t{b.offset} + b.record_len > size->second) {
          problem = "past the end of " + object;
        } else if (opt_.read_data &&
                   !cds_.valid_records.at(b.container)
                        .count({b.offset, b.record_len, b.index, b.fingerprint})) {
          problem = "to records of " + object + " that it does not hold (fingerprint)";
        }
        if (!problem.empty()) {
          problems[problem].insert(id);
          bad_recipes.insert(id);
        }
        continue;
      }
      auto c = containers_.find(b.container);
      if (c == containers_.end()) {
        problems["to container " + ContainerKey(b.container) + ", which is not in the catalog"]
            .insert(id);
        bad_recipes.insert(id);
      } else if (static_cast<uint64_t>(b.offset) + b.record_len > c->second.size) {
        problems["past the end of " + c->second.object].insert(id);
        bad_recipes.insert(id);
      } else {
        refs[b.container].insert({b.offset, b.record_len, b.index, b.fingerprint});
      }
    }
  }
  for (const auto& [problem, ids] : problems) {
    std::string which = "recipe " + SegmentRecipeKey(*ids.begin());
    if (ids.size() == 2)
      which =
          "recipes " + SegmentRecipeKey(*ids.begin()) + " and " + SegmentRecipeKey(*ids.rbegin());
    if (ids.size() > 2)
      which = "recipe " + SegmentRecipeKey(*ids.begin()) + " and " +
              std::to_string(ids.size() - 1) + " others";
    Error(which + (ids.size() == 1 ? " refers " : " refer ") + problem, SnapshotsUsingRecipes(ids));
  }
  if (!bad_recipes.empty()) {
    auto snaps = SnapshotsUsingRecipes(bad_recipes);
    Error(std::to_string(bad_recipes.size()) + " recipe(s) with unresolvable references", snaps);
  }

  // 4. Containers: present, right size; with read_data every record re-hashed.
  for (const auto& [cid, rec] : containers_) {
    bool referenced = refs.count(cid) > 0;
    auto size = repo_.objects()->Size(rec.object);
    if (!size.ok()) {
      if (referenced) {
        Error("container " + rec.object + ": " + size.status().ToString(),
              SnapshotsUsingContainer(cid));
        if (IsDamage(size.status())) Quarantine(cid, size.status().ToString());
      } else {
        Reclaimable("catalogued container " + rec.object + " is missing and unreferenced", 0);
      }
      continue;
    }
    if (*size != rec.size) {
      const std::string why = "container " + rec.object + " has " + std::to_string(*size) +
                              " bytes, the catalog says " + std::to_string(rec.size);
      Error(why, referenced ? SnapshotsUsingContainer(cid) : std::vector<std::string>{});
      Quarantine(cid, why);
      continue;
    }
    if (!referenced) {
      Reclaimable("container " + rec.object + " is referenced by no snapshot", rec.size);
      // With liveness unknown a damaged snapshot may use it: verify it too.
      if (!liveness_unknown_) continue;
    }
    if (!opt_.read_data) continue;
    if (opt_.progress) opt_.progress("reading " + rec.object);
    std::set<Ref> valid;
    Status st = VerifyContainerRecords(repo_, rec.object, cid, report_, &valid);
    if (!st.ok()) {
      Error(st.ToString(), SnapshotsUsingContainer(cid));
      if (IsDamage(st)) Quarantine(cid, st.ToString());
      continue;
    }
    for (const Ref& r : refs[cid]) {
      if (!valid.count(r)) {
        const std::string why = rec.object + ": no record with fingerprint " + r.fp.Hex() +
                                " at offset " + std::to_string(r.offset);
        Error(why, SnapshotsUsingContainer(cid));
        Quarantine(cid, why);
        break;
      }
    }
  }

  // 5. Leftovers: objects not in the catalog, unreferenced recipes.
  std::vector<std::string> objects;
  RETURN_IF_ERROR(repo_.objects()->List("vms/" + vm_.vm() + "/data/", &objects));
  std::set<std::string> catalogued;
  for (const auto& [cid, rec] : containers_) catalogued.insert(rec.object);
  for (const std::string& o : objects) {
    if (catalogued.count(o)) continue;
    auto size = repo_.objects()->Size(o);
    Reclaimable("object " + o + " is not in the catalog (left by an interrupted backup)",
                size.ok() ? *size : 0);
  }
  uint64_t orphan_recipes = 0;
  for (const auto& [id, r] : recipes_)
    if (!live_recipes.count(id)) orphan_recipes++;
  if (orphan_recipes)
    Reclaimable(std::to_string(orphan_recipes) + " segment recipe(s) referenced by no snapshot", 0);
  if (withheld_items_ > 0) {
    report_.findings.push_back(
        {CheckFinding::Kind::kSkipped,
         vm_.vm(),
         std::to_string(withheld_items_) +
             " item(s) that no readable snapshot uses are not reported as reclaimable: the "
             "VM's metadata is damaged (above), so what the damaged snapshots use is unknown",
         {},
         withheld_bytes_});
  }
  return Status::OK();
}

}  // namespace

bool CheckReport::ok() const {
  for (const auto& f : findings)
    if (f.kind == CheckFinding::Kind::kError) return false;
  return true;
}

std::vector<std::string> CheckReport::DamagedSnapshots() const {
  std::set<std::string> s;
  for (const auto& f : findings)
    if (f.kind == CheckFinding::Kind::kError) s.insert(f.snapshots.begin(), f.snapshots.end());
  return {s.begin(), s.end()};
}

Result<CheckReport> CheckRepository(Repository& repo, const CheckOptions& options) {
  CheckReport report;
  if (Status st = repo.RepairConfigCopies(&report.repaired); !st.ok())
    AddFinding(report,
               st.IsCorruption() ? CheckFinding::Kind::kError : CheckFinding::Kind::kSkipped,
               "the configuration record and its copy differ or one is damaged, and it could not "
               "be set right: " +
                   st.ToString());
  CdsState cds;
  RETURN_IF_ERROR(CheckCdsArea(repo, options, report, &cds));
  std::vector<std::string> vms;
  if (!options.vm.empty()) {
    vms.push_back(options.vm);
  } else {
    ASSIGN_OR_RETURN(vms, repo.ListVmDirectories());
  }
  for (const std::string& name : vms) {
    auto vm = repo.OpenVm(name, Repository::Access::kInspect);
    const auto wait_until =
        std::chrono::steady_clock::now() +
        std::chrono::milliseconds(static_cast<int64_t>(options.lock_wait_seconds * 1000));
    bool said = false;
    while (!vm.ok() && vm.status().IsBusy() && std::chrono::steady_clock::now() < wait_until &&
           !(options.cancel != nullptr && options.cancel->load())) {
      if (!said && options.progress) options.progress("waiting for VM " + name);
      said = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      vm = repo.OpenVm(name, Repository::Access::kInspect);
    }
    if (!vm.ok() && !vm.status().IsBusy() && !vm.status().IsNotFound() &&
        !vm.status().IsCorruption()) {
      // A repository check cannot write to (read-only, another user's): a
      // read view checks it all the same; quarantines are then reported as
      // not recorded.
      auto view = repo.OpenVm(name, Repository::Access::kRead);
      if (view.ok()) vm = std::move(view);
    }
    if (!vm.ok()) {
      if (vm.status().IsBusy()) {
        report.vms_not_checked.push_back({name, vm.status().message()});
        continue;
      }
      std::error_code ec;
      if (vm.status().IsNotFound() &&
          std::filesystem::is_directory(repo.path() + "/vms/" + name, ec)) {
        // No metadata store: a first backup that did not get as far as
        // creating it left the directory. Without containers there is
        // nothing to lose; with them, the VM's history is gone.
        std::vector<std::string> objects;
        RETURN_IF_ERROR(repo.objects()->List("vms/" + name + "/data/", &objects));
        if (objects.empty()) {
          report.findings.push_back({CheckFinding::Kind::kReclaimable,
                                     name,
                                     "VM '" + name +
                                         "' has neither metadata nor containers: the leftover "
                                         "of a first backup that did not commit",
                                     {},
                                     0});
          continue;
        }
        report.findings.push_back(
            {CheckFinding::Kind::kError,
             name,
             "VM '" + name + "' has " + std::to_string(objects.size()) +
                 " containers but no metadata store: its snapshots cannot be read (" +
                 vm.status().message() + ")",
             {},
             0});
        continue;
      }
      if (!options.vm.empty() && !vm.status().IsCorruption()) return vm.status();
      std::string msg = vm.status().ToString();
      if (vm.status().IsCorruption())
        msg += " ('vmdedup repair -r " + repo.path() + " --vm " + name +
               "' salvages what can be read; docs/operations.md, \"Damage\")";
      report.findings.push_back({CheckFinding::Kind::kError, name, msg, {}, 0});
      continue;
    }
    report.vms++;
    if (options.progress) options.progress("checking VM " + name);
    VmCheck check(repo, **vm, options, cds, report);
    Status st = check.Run();
    if (!st.ok())
      report.findings.push_back({CheckFinding::Kind::kError, name, st.ToString(), {}, 0});
  }
  std::vector<ObjectStore::Temporary> temps;
  RETURN_IF_ERROR(repo.objects()->ListTemporary("", &temps));
  for (const auto& t : temps) {
    if (t.writer_may_be_alive) continue;
    report.findings.push_back({CheckFinding::Kind::kReclaimable,
                               "",
                               "temporary object " + t.name + " left by an interrupted write",
                               {},
                               t.bytes});
    report.reclaimable_bytes += t.bytes;
  }
  return report;
}

}  // namespace vmdedup
