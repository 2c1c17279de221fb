// Salvage of a VM's damaged metadata store (`vmdedup repair`): a LevelDB
// table block that fails its checksum hides every key in its range (also
// those older tables hold), and a lost CURRENT or MANIFEST leaves the store
// unopenable, although nearly every record is still on disk. The repair
// works on a copy of the store: LevelDB's RepairDB (with paranoid checks,
// so that a damaged block is dropped, never read as data) rebuilds it from
// every table and log it can read; the copy must then read whole; every
// counter is raised above every id and sequence number the salvaged
// records use (an older value of a counter may be all that survived, and a
// counter that went back would hand an id out again); then the copy and
// the damaged store swap places atomically, and the damaged store is kept
// beside it (`meta.damaged-TIME`) for the user to remove.
//
// Container catalog records lost with the damaged blocks are written again
// from the containers themselves (RecatalogContainers).
//
// What the damaged blocks held is gone: `check` afterwards names the
// snapshots that needed it and records their lost recipes, so that the
// next backup stores those segments afresh.
//
// The caller holds the VM's writer lock; the repair also takes LevelDB's
// LOCK of the damaged store, so that no check or backup has it open.
// One thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace leveldb {
class Env;
}

namespace vmdedup {

class MetadataStore;
class ObjectStore;

struct MetadataRepairReport {
  bool repaired = false;                     // false: the store read whole, nothing was done
  std::string kept_as;                       // the damaged store's new directory (below the VM)
  uint64_t records = 0;                      // records in the repaired store
  uint64_t bad_records = 0;                  // records salvaged whose own checksum fails
  std::vector<std::string> counters_raised;  // "next/segment: 7 -> 12"
  // Containers that recipes reference and the catalog had lost, found
  // whole on disk and catalogued again.
  std::vector<uint64_t> recatalogued;
  // Snapshots the ledger lists as committed that the store does not hold:
  // now recorded as lost ("vm/disk/seq").
  std::vector<std::string> lost_snapshots;
  bool ledger_rewritten = false;  // it did not decode: written again from the store
};

// Repairs the store in `vm_dir`/meta (`vm_dir` is the VM's directory below
// the repository; nothing is followed through a link). Busy when another
// process has the store open; Corruption when even the repaired copy does
// not read whole (the damaged store is then left as it was).
Result<MetadataRepairReport> RepairMetadataStore(const std::string& vm_dir, leveldb::Env* env);

// Catalogs again (`ctr/ID`, written by "repair") every container of VM
// `vm` that a recipe references, that the catalog lacks and whose object
// verifies whole (every block re-hashed); what does not verify is left for
// check to report. Adds the ids to `report`.
Status RecatalogContainers(MetadataStore& meta, ObjectStore& objects, const std::string& vm,
                           MetadataRepairReport* report);

// Brings VM `vm`'s snapshot ledger in line with its (repaired) store: the
// committed snapshots the store lost are marked lost, the store's
// snapshots committed, a ledger that does not decode written again, and
// each disk's sequence counter raised above every snapshot the ledger
// names, so that no lost snapshot's number is handed out again.
Status ReconcileLedger(MetadataStore& meta, ObjectStore& objects, const std::string& vm,
                       MetadataRepairReport* report);

}  // namespace vmdedup
