// Repository check: proves the invariants of docs/format.md on what is
// stored. Without read_data it checks metadata: every record's checksum,
// every snapshot's segment list, every recipe reference (recipe exists,
// container in the catalog, record inside the object), every catalogued
// object present with its size. With read_data it also reads every container,
// verifies every record, decompresses and re-hashes every block, and checks
// that every reference points at a record holding that fingerprint.
//
// The CDS area is checked first: its pointer, every published version's
// manifest and index, the containers they reach (records re-hashed with
// read_data); the VMs' CDS references must land on those records.
//
// Leftovers of crashed or interrupted runs (objects not in the catalog,
// unreferenced containers and recipes, temporary files, CDS objects of an
// unpublished build) are reported as reclaimable, not as errors. Runs on one thread; opens each VM
// read-only.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/status.h"
#include "store/repository.h"

namespace vmdedup {

struct CheckOptions {
  bool read_data = false;
  std::string vm;  // empty: every VM
  // How long to wait for a VM that a backup (or another check) holds before
  // it is left unchecked (CheckReport::vms_not_checked).
  double lock_wait_seconds = 0;
  const std::atomic<bool>* cancel = nullptr;  // stops the wait
  std::function<void(const std::string& line)> progress;
};

struct CheckFinding {
  enum class Kind { kError, kReclaimable, kSkipped };
  Kind kind = Kind::kError;
  std::string vm;
  std::string message;
  std::vector<std::string> snapshots;  // affected snapshot ids (errors)
  uint64_t bytes = 0;                  // reclaimable bytes
};

struct CheckReport {
  std::vector<CheckFinding> findings;
  uint64_t vms = 0, snapshots = 0, recipes = 0, containers = 0;
  uint64_t blocks_verified = 0, bytes_verified = 0;
  uint64_t reclaimable_bytes = 0;
  uint64_t cds_versions = 0, cds_containers = 0;  // published versions, their containers
  // Damaged containers quarantined by this check (docs/format.md,
  // "Quarantine"): later backups store their blocks afresh.
  uint64_t quarantined = 0;
  // Segment recipes that snapshots use and that are missing or unreadable,
  // recorded by this check: later backups read those segments again.
  uint64_t lost_recipes = 0;
  // VMs that were not checked because a backup or another check held them
  // (after CheckOptions::lock_wait_seconds), each with the holder.
  std::vector<std::pair<std::string, std::string>> vms_not_checked;
  // What check set right: the configuration record or its copy rewritten
  // from the other (Repository::RepairConfigCopies).
  std::vector<std::string> repaired;
  bool ok() const;
  bool complete() const { return vms_not_checked.empty(); }
  std::vector<std::string> DamagedSnapshots() const;
};

Result<CheckReport> CheckRepository(Repository& repo, const CheckOptions& options);

}  // namespace vmdedup
