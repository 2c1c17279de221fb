// Building a CDS version (`vmdedup cds build`): count how popular each block
// is across VMs, choose the most popular within a budget, copy them into the
// CDS area and publish the new version atomically.
//
// Counting (docs/cds.md): the popularity of a block is the number of distinct
// VMs whose live recipes hold it (own or CDS references), plus one for each
// seed image that holds it. Counting is exact and runs in bounded memory: the
// fingerprint space is split into P partitions by the first fingerprint byte
// and each pass counts one partition, so memory is about 1/P of the distinct
// blocks; P follows from `count_memory_budget`. The counts of one pass are a
// sorted list of (fingerprint, length, holders): partial counts made on
// several hosts (each over its own VMs) merge by adding holders per
// fingerprint (MergePopularity), which is how counting maps onto a cluster.
//
// Choosing: blocks held by at least two VMs, or by a seed, ordered by holders
// (then fingerprint, for determinism), until the budget is full.
//
// Copying: a chosen block already in the CDS area stays where it is; one held
// by a VM is copied record-for-record (checksum and fingerprint verified)
// from that VM's container; a seed-only block is compressed afresh. The new
// version's index and manifest are written, then the pointer (one atomic
// Put). A build that fails or is killed leaves the version in force as it
// was; its objects are leftovers that `check` reports as reclaimable.
//
// Thread model: one build at a time per repository (BuildCds takes the CDS
// lock: Busy when another build holds it). VMs are read through read views
// (Repository::Access::kRead), so a VM being backed up is counted with the
// snapshots it had when the build listed it; the backup keeps the version
// it loaded at its start.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/fingerprint.h"
#include "base/status.h"
#include "store/repository.h"

namespace vmdedup {

struct BlockPopularity {
  Fingerprint fingerprint;
  uint32_t length = 0;
  uint32_t holders = 0;  // distinct VMs (and seeds) holding the block
  bool seed = false;     // held by a seed image
};

// Sorted by fingerprint; holders of equal fingerprints add up.
std::vector<BlockPopularity> MergePopularity(
    const std::vector<std::vector<BlockPopularity>>& parts);

struct CdsBuildOptions {
  // Exactly one of: percent of the unique (distinct, non-zero) data, or the
  // memory the index may take, counted at 24 bytes an entry (a cap: the
  // index takes 20.25, engine/cds_index.h).
  std::optional<double> fraction_percent;
  std::optional<uint64_t> index_budget_bytes;
  std::vector<std::string> seeds;  // file:PATH or NBD URIs of template images
  // Count only these VMs (empty: every VM). The CDS serves every VM either
  // way; this chooses whose blocks make a block popular (e.g. production
  // VMs only, or one host's share of a fleet counted on several hosts).
  std::vector<std::string> vms;
  uint64_t count_memory_budget = 256ull << 20;
  unsigned threads = 2;
  std::function<void(const std::string&)> note;  // one-line notes (skipped VMs, passes)
  std::function<void(uint64_t done, uint64_t total, const char* phase)> progress;
};

struct CdsBuildResult {
  uint64_t version = 0;
  uint64_t previous_version = 0;  // 0: none
  uint64_t vms_counted = 0;
  uint64_t seed_blocks = 0;    // distinct non-zero blocks of the seeds
  uint64_t unique_blocks = 0;  // distinct non-zero blocks counted
  uint64_t unique_bytes = 0;
  uint64_t candidates = 0;  // blocks eligible (>= 2 holders or seed)
  uint64_t blocks = 0;      // in the new version
  uint64_t raw_bytes = 0;
  uint64_t stored_bytes = 0;
  uint64_t copied_blocks = 0;  // newly written to the CDS area
  uint64_t copied_stored_bytes = 0;
  uint64_t index_memory = 0;  // of the new version's in-memory index
  uint32_t passes = 0;
  uint64_t duration_ms = 0;
};

Result<CdsBuildResult> BuildCds(Repository& repo, const CdsBuildOptions& options);

}  // namespace vmdedup
