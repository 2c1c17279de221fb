// The snapshot ledger of a VM (object `vms/VM/ledger`, docs/format.md):
// every snapshot ever committed, kept outside the VM's metadata store so
// that metadata which lost committed snapshots (a lost LevelDB log, a
// metadata directory put back from an older copy) is seen as damage, never
// taken for a shorter history: without it, the lost snapshots' containers
// would look like the leftovers of interrupted backups, and the next
// backup would hand their sequence numbers out again.
//
// Invariant: the snapshots the ledger lists as committed are a subset of
// those the metadata store holds. A backup writes the ledger after its
// snapshot is committed (a crash between leaves the ledger behind, never
// ahead); `repair` marks the committed snapshots the store lost as lost
// (acknowledged); `forget` marks snapshots forgotten before it deletes
// their records. A VM backed up before the ledger existed has none until
// its next backup.
//
// Pure encoding plus reads and writes through an ObjectStore; the VM's
// writer (who holds its lock) is the only one that writes it. Any thread.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "base/status.h"
#include "store/object_store.h"

namespace vmdedup {

enum class LedgerState : uint8_t {
  kCommitted = 1,
  kLost = 2,       // committed once, lost with damaged metadata; `repair` acknowledged it
  kForgotten = 3,  // removed by `forget` (its records may remain: a forget in progress)
};

// (disk, seq) → state.
using SnapshotLedger = std::map<std::pair<std::string, uint64_t>, LedgerState>;

std::string LedgerObjectName(const std::string& vm);
std::string EncodeLedger(const SnapshotLedger& ledger);
Status DecodeLedger(std::string_view data, const std::string& what, SnapshotLedger* ledger);

// The VM's ledger; nullopt when it has none. Corruption when it does not
// decode.
Result<std::optional<SnapshotLedger>> ReadLedger(ObjectStore& objects, const std::string& vm);
Status WriteLedger(ObjectStore& objects, const std::string& vm, const SnapshotLedger& ledger);

}  // namespace vmdedup
