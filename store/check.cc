#include "store/check.h"

#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "base/fingerprint.h"
#include "store/container.h"
#include "store/records.h"

namespace vmdedup {
namespace {

struct Ref {
  uint32_t offset;
  uint32_t record_len;
  Fingerprint fp;
  bool operator<(const Ref& o) const {
    return std::tie(offset, record_len, fp) < std::tie(o.offset, o.record_len, o.fp);
  }
};

class VmCheck {
 public:
  VmCheck(Repository& repo, VmStore& vm, const CheckOptions& opt, CheckReport& report)
      : repo_(repo), vm_(vm), opt_(opt), report_(report) {}
  Status Run();

 private:
  void Error(std::string msg, std::vector<std::string> snaps = {}) {
    report_.findings.push_back(
        {CheckFinding::Kind::kError, vm_.vm(), std::move(msg), std::move(snaps), 0});
  }
  void Reclaimable(std::string msg, uint64_t bytes) {
    report_.findings.push_back(
        {CheckFinding::Kind::kReclaimable, vm_.vm(), std::move(msg), {}, bytes});
    report_.reclaimable_bytes += bytes;
  }
  std::vector<std::string> SnapshotsUsingRecipes(const std::set<uint64_t>& bad);
  std::vector<std::string> SnapshotsUsingContainer(uint64_t id);

  Repository& repo_;
  VmStore& vm_;
  const CheckOptions& opt_;
  CheckReport& report_;
  std::map<uint64_t, SegmentRecipe> recipes_;
  std::map<uint64_t, ContainerRecord> containers_;
  std::vector<SnapshotRecord> snapshots_;
  std::map<std::string, std::vector<uint64_t>> snapshot_segments_;  // by snapshot id
};

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
  // 1. Every record: envelope and type-specific decoding.
  std::vector<std::string> bad_keys;
  RETURN_IF_ERROR(vm_.meta()->Scan("", [&](std::string_view key, std::string_view value) {
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
    if (!st.ok()) Error(st.ToString());
    return true;
  }));
  report_.recipes += recipes_.size();
  report_.containers += containers_.size();
  report_.snapshots += snapshots_.size();

  // 2. Snapshots → segment lists → recipes.
  std::set<uint64_t> live_recipes;
  for (const SnapshotRecord& s : snapshots_) {
    auto segs = vm_.GetSnapshotSegments(s.disk, s.seq);
    if (!segs.ok()) {
      Error(segs.status().ToString(), {s.Id()});
      continue;
    }
    if (segs->size() != s.segment_count) {
      Error("snapshot " + s.Id() + ": segment list length " + std::to_string(segs->size()) +
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
        Error("snapshot " + s.Id() + ": segment " + std::to_string(i) +
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

  // 3. Live recipes → containers.
  std::map<uint64_t, std::set<Ref>> refs;  // container → referenced records
  std::set<uint64_t> bad_recipes;
  for (uint64_t id : live_recipes) {
    auto it = recipes_.find(id);
    if (it == recipes_.end()) continue;
    for (const BlockRef& b : it->second.blocks) {
      if (b.kind == BlockKind::kZero) continue;
      if (b.kind == BlockKind::kCds) {
        Error("recipe " + SegmentRecipeKey(id) +
              " refers to the CDS area, which this repository does not have");
        bad_recipes.insert(id);
        continue;
      }
      auto c = containers_.find(b.container);
      if (c == containers_.end()) {
        Error("recipe " + SegmentRecipeKey(id) + " refers to container " +
              ContainerKey(b.container) + ", which is not in the catalog");
        bad_recipes.insert(id);
      } else if (static_cast<uint64_t>(b.offset) + b.record_len > c->second.size) {
        Error("recipe " + SegmentRecipeKey(id) + " refers past the end of " + c->second.object);
        bad_recipes.insert(id);
      } else {
        refs[b.container].insert({b.offset, b.record_len, b.fingerprint});
      }
    }
  }
  if (!bad_recipes.empty()) {
    auto snaps = SnapshotsUsingRecipes(bad_recipes);
    Error(std::to_string(bad_recipes.size()) + " recipe(s) with unresolvable references", snaps);
  }

  // 4. Containers: present, right size; with read_data every record re-hashed.
  Sha256Hasher hasher;
  std::string data, plain;
  for (const auto& [cid, rec] : containers_) {
    bool referenced = refs.count(cid) > 0;
    auto size = repo_.objects()->Size(rec.object);
    if (!size.ok()) {
      if (referenced)
        Error("container " + rec.object + ": " + size.status().ToString(),
              SnapshotsUsingContainer(cid));
      else
        Reclaimable("catalogued container " + rec.object + " is missing and unreferenced", 0);
      continue;
    }
    if (*size != rec.size) {
      Error("container " + rec.object + " has " + std::to_string(*size) +
                " bytes, the catalog says " + std::to_string(rec.size),
            referenced ? SnapshotsUsingContainer(cid) : std::vector<std::string>{});
      continue;
    }
    if (!referenced) {
      Reclaimable("container " + rec.object + " is referenced by no snapshot", rec.size);
      continue;
    }
    if (!opt_.read_data) continue;
    if (opt_.progress) opt_.progress("reading " + rec.object);
    Status st = repo_.objects()->Get(rec.object, &data);
    std::set<Ref> valid;
    if (st.ok()) {
      st = ForEachBlockRecord(
          data, cid, rec.object, [&](const BlockRecordInfo& info, std::string_view record) {
            RETURN_IF_ERROR(DecodeBlockRecord(record, &info.fingerprint, &plain, rec.object));
            if (hasher.Hash({reinterpret_cast<const uint8_t*>(plain.data()), plain.size()}) !=
                info.fingerprint)
              return Status::Corruption(rec.object + " at offset " + std::to_string(info.offset) +
                                        ": content does not match its fingerprint");
            report_.blocks_verified++;
            report_.bytes_verified += plain.size();
            valid.insert({info.offset, info.record_len, info.fingerprint});
            return Status::OK();
          });
    }
    if (!st.ok()) {
      Error(st.ToString(), SnapshotsUsingContainer(cid));
      continue;
    }
    for (const Ref& r : refs[cid]) {
      if (!valid.count(r)) {
        Error(rec.object + ": no record with fingerprint " + r.fp.Hex() + " at offset " +
                  std::to_string(r.offset),
              SnapshotsUsingContainer(cid));
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
  std::vector<std::string> vms;
  if (!options.vm.empty()) {
    vms.push_back(options.vm);
  } else {
    ASSIGN_OR_RETURN(vms, repo.ListVms());
  }
  for (const std::string& name : vms) {
    auto vm = repo.OpenVm(name, Repository::Access::kRead);
    if (!vm.ok()) {
      if (vm.status().IsBusy()) {
        report.findings.push_back(
            {CheckFinding::Kind::kSkipped, name, vm.status().message(), {}, 0});
        continue;
      }
      if (!options.vm.empty()) return vm.status();
      report.findings.push_back({CheckFinding::Kind::kError, name, vm.status().ToString(), {}, 0});
      continue;
    }
    report.vms++;
    if (options.progress) options.progress("checking VM " + name);
    VmCheck check(repo, **vm, options, report);
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
