#include "store/snapshot_ledger.h"

#include <set>

#include "base/encoding.h"
#include "store/framed_object.h"
#include "store/repository.h"

namespace vmdedup {
namespace {

constexpr char kLedgerMagic[8] = {'V', 'M', 'D', 'D', 'L', 'E', 'D', 'G'};

}  // namespace

std::string LedgerObjectName(const std::string& vm) { return "vms/" + vm + "/ledger"; }

std::string EncodeLedger(const SnapshotLedger& ledger) {
  ByteWriter body;
  body.Varint(ledger.size());
  for (const auto& [key, state] : ledger) {
    body.String(key.first);
    body.Varint(key.second);
    body.U8(static_cast<uint8_t>(state));
  }
  return FrameObject(kLedgerMagic, body.buffer());
}

Status DecodeLedger(std::string_view data, const std::string& what, SnapshotLedger* ledger) {
  std::string_view body;
  RETURN_IF_ERROR(UnframeObject(data, kLedgerMagic, what, &body));
  ByteReader in(body, what);
  uint64_t n = 0;
  RETURN_IF_ERROR(in.Varint(&n));
  ledger->clear();
  for (uint64_t i = 0; i < n; i++) {
    std::string disk;
    uint64_t seq = 0;
    uint8_t state = 0;
    RETURN_IF_ERROR(in.String(&disk));
    RETURN_IF_ERROR(in.Varint(&seq));
    RETURN_IF_ERROR(in.U8(&state));
    if (state < static_cast<uint8_t>(LedgerState::kCommitted) ||
        state > static_cast<uint8_t>(LedgerState::kForgotten))
      return Status::Corruption(what + ": unknown state " + std::to_string(state) + " of " + disk +
                                "/" + std::to_string(seq));
    if (!ledger->emplace(std::make_pair(disk, seq), static_cast<LedgerState>(state)).second)
      return Status::Corruption(what + ": " + disk + "/" + std::to_string(seq) + " twice");
  }
  if (in.remaining() != 0) return Status::Corruption(what + ": trailing bytes");
  return Status::OK();
}

Result<std::optional<SnapshotLedger>> ReadLedger(ObjectStore& objects, const std::string& vm) {
  const std::string name = LedgerObjectName(vm);
  std::string data;
  Status st = objects.Get(name, &data);
  if (st.IsNotFound()) return std::optional<SnapshotLedger>();
  RETURN_IF_ERROR(st);
  SnapshotLedger ledger;
  RETURN_IF_ERROR(DecodeLedger(data, "snapshot ledger " + name, &ledger));
  return std::optional<SnapshotLedger>(std::move(ledger));
}

Status WriteLedger(ObjectStore& objects, const std::string& vm, const SnapshotLedger& ledger) {
  const std::string data = EncodeLedger(ledger);
  return objects.Put(LedgerObjectName(vm),
                     {reinterpret_cast<const uint8_t*>(data.data()), data.size()});
}

Result<std::vector<std::string>> VmStore::SnapshotsLostFromStore() {
  ASSIGN_OR_RETURN(std::optional<SnapshotLedger> ledger, ReadLedger(*objects_, vm_));
  std::vector<std::string> lost;
  if (!ledger) return lost;
  ASSIGN_OR_RETURN(std::vector<SnapshotRecord> held, ListSnapshots());
  std::set<std::pair<std::string, uint64_t>> have;
  for (const SnapshotRecord& s : held) have.insert({s.disk, s.seq});
  for (const auto& [key, state] : *ledger)
    if (state == LedgerState::kCommitted && !have.count(key))
      lost.push_back(vm_ + "/" + key.first + "/" + std::to_string(key.second));
  return lost;
}

Status VmStore::RecordCommittedSnapshots() {
  ASSIGN_OR_RETURN(std::optional<SnapshotLedger> ledger, ReadLedger(*objects_, vm_));
  SnapshotLedger out = ledger ? *ledger : SnapshotLedger{};
  ASSIGN_OR_RETURN(std::vector<SnapshotRecord> held, ListSnapshots());
  bool changed = !ledger.has_value();
  for (const SnapshotRecord& s : held) {
    auto [it, added] = out.emplace(std::make_pair(s.disk, s.seq), LedgerState::kCommitted);
    // A forgotten snapshot whose records remain (an interrupted forget)
    // stays forgotten.
    if (!added && it->second == LedgerState::kLost) {
      it->second = LedgerState::kCommitted;
      added = true;
    }
    changed |= added;
  }
  if (!changed) return Status::OK();
  return WriteLedger(*objects_, vm_, out);
}

Status VmStore::ForgetSnapshots(const std::vector<SnapshotRecord>& snapshots) {
  if (snapshots.empty()) return Status::OK();
  ASSIGN_OR_RETURN(std::optional<SnapshotLedger> ledger, ReadLedger(*objects_, vm_));
  SnapshotLedger out = ledger ? *ledger : SnapshotLedger{};
  // The ledger first: a crash before the records are deleted leaves a
  // forget in progress, never a committed snapshot the store lacks.
  for (const SnapshotRecord& s : snapshots)
    out[std::make_pair(s.disk, s.seq)] = LedgerState::kForgotten;
  RETURN_IF_ERROR(WriteLedger(*objects_, vm_, out).WithContext("write the snapshot ledger"));
  WriteBatch batch;
  for (const SnapshotRecord& s : snapshots) {
    batch.Delete(SnapshotKey(s.disk, s.seq));
    batch.Delete(SnapshotSegmentsKey(s.disk, s.seq));
  }
  return meta_->Write(batch, true);
}

Result<std::vector<SnapshotRecord>> VmStore::ForgetInProgress() {
  ASSIGN_OR_RETURN(std::optional<SnapshotLedger> ledger, ReadLedger(*objects_, vm_));
  std::vector<SnapshotRecord> out;
  if (!ledger) return out;
  ASSIGN_OR_RETURN(std::vector<SnapshotRecord> held, ListSnapshots());
  for (SnapshotRecord& s : held) {
    auto it = ledger->find({s.disk, s.seq});
    if (it != ledger->end() && it->second == LedgerState::kForgotten) out.push_back(std::move(s));
  }
  return out;
}

}  // namespace vmdedup
