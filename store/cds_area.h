// The CDS area of a repository: the shared containers that hold the common
// data set (the most popular blocks across VMs) and the versions that index
// them. docs/format.md ("The CDS area") is the authority on the layout:
//
//   cds/data/ID.ctr              CDS containers (same format as a VM's);
//                                ID = (version << 20) | n, so that a version
//                                never needs an id allocator
//   cds/versions/V/index-NNNN    a version's entries, sorted by fingerprint
//   cds/versions/V/manifest      a version's summary, written after its index
//   cds/current                  the version in force and every version ever
//                                published; replaced atomically to publish
//
// A version is published when `cds/current` lists it. Anything under
// cds/versions/ or cds/data/ that no published version reaches is a leftover
// of a build that did not finish: reclaimable, never an error. Containers
// are shared between versions (a rebuild keeps blocks that stay popular where
// they are). Nothing is modified in place, so a backup that loaded a version
// keeps using it while a newer one is published.
//
// Thread model: a CdsArea is a thin, stateless view of the object store; its
// methods may be called from several threads. Writers (cds build) serialize
// through the repository's CDS lock, which the caller holds.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "base/fingerprint.h"
#include "base/status.h"
#include "store/object_store.h"

namespace vmdedup {

constexpr uint32_t kCdsFormatVersion = 1;
// Entries per index object: 56 bytes each keeps an object under 64 MiB.
constexpr uint32_t kCdsEntriesPerIndexPart = 1u << 20;
constexpr size_t kCdsIndexEntrySize = 56;  // on disk

// One block of a CDS version and where its record is.
struct CdsEntry {
  Fingerprint fingerprint;
  uint32_t length = 0;      // plaintext bytes
  uint64_t container = 0;   // CDS container id
  uint32_t offset = 0;      // of the record in the container
  uint32_t record_len = 0;  // header + payload
};

// What a version holds and how it was made (the manifest).
struct CdsVersionInfo {
  uint64_t version = 0;
  int64_t created = 0;             // unix seconds
  uint64_t block_count = 0;        // entries
  uint64_t raw_bytes = 0;          // plaintext bytes of its blocks
  uint64_t stored_bytes = 0;       // record bytes of its blocks (after compression)
  uint32_t index_parts = 0;        // index-0000 .. index-(n-1)
  std::string chunker;             // the repository's chunker at build time ("cdc 4096/1024/16384")
  std::string selection;           // how the blocks were chosen, for humans ("fraction 1%")
  std::vector<std::string> seeds;  // seed sources, for humans
  std::vector<uint64_t> containers;  // CDS containers its entries reference, sorted
};

// The `cds/current` record.
struct CdsPointer {
  uint64_t current = 0;             // 0: no CDS in force
  std::vector<uint64_t> published;  // every version ever published, ascending
};

class CdsArea {
 public:
  explicit CdsArea(ObjectStore* objects) : objects_(objects) {}

  static std::string ContainerObjectName(uint64_t container_id);  // cds/data/ID.ctr
  static std::string IndexObjectName(uint64_t version, uint32_t part);
  static std::string ManifestObjectName(uint64_t version);
  static constexpr const char* kPointerObject = "cds/current";
  static uint64_t ContainerId(uint64_t version, uint32_t n) { return (version << 20) | n; }
  static uint64_t VersionOfContainer(uint64_t container_id) { return container_id >> 20; }

  // The pointer; a repository without one has no CDS (current 0, nothing
  // published). Corruption when the object is damaged.
  Result<CdsPointer> ReadPointer();
  // The CDS containers `check` found damaged (docs/format.md, "Quarantine");
  // none without the object. Corruption when the object is damaged.
  static constexpr const char* kQuarantineObject = "cds/quarantine";
  Result<std::set<uint64_t>> ReadQuarantine();
  // Adds `ids` to the quarantine: one Put replacing the object.
  Status AddToQuarantine(const std::set<uint64_t>& ids);
  // Of `containers`, those a backup must take nothing from: quarantined or
  // missing (one listing of cds/data/).
  Result<std::set<uint64_t>> UnusableContainers(const std::vector<uint64_t>& containers);
  Result<CdsVersionInfo> ReadManifest(uint64_t version);
  // One index part's entries in order; Corruption names the object.
  Status ReadIndexPart(uint64_t version, uint32_t part, std::vector<CdsEntry>* out);
  // All of a version's entries, sorted by fingerprint.
  Status ReadEntries(uint64_t version, std::vector<CdsEntry>* out);
  // Calls `fn` with every entry of the version `info` (its manifest, from
  // ReadManifest) describes, in order, numbered from 0 across parts, holding
  // one index object in memory at a time. Checks what ReadEntries checks:
  // the order across parts, the part sizes, that the entries add up to the
  // manifest and reference only its containers. On Corruption `fn` may have
  // seen the entries before the damage.
  Status ScanEntries(const CdsVersionInfo& info,
                     const std::function<void(uint64_t entry, const CdsEntry&)>& fn);
  // Byte offset of entry `i` (of its part) inside its index object, for
  // reading one entry's fingerprint with ObjectStore::GetRange.
  static uint64_t IndexEntryOffset(uint32_t i);

  // A version number no build has used: above every published version and
  // every version with anything under cds/versions/ or cds/data/.
  Result<uint64_t> NextVersion();
  // Writes the index parts (entries sorted by fingerprint, InvalidArgument
  // otherwise) and then the manifest; fills info.index_parts,
  // info.block_count, raw_bytes, stored_bytes and containers from `entries`.
  Status WriteVersion(CdsVersionInfo* info, const std::vector<CdsEntry>& entries);
  // Makes `version` (written by WriteVersion) the one in force: one atomic
  // Put of the pointer, which also adds it to `published`.
  Status Publish(uint64_t version);

  // Names under cds/ that no published version reaches (a crashed or failed
  // build's index parts, manifests and containers), sorted.
  Status ListLeftovers(std::vector<std::string>* names);

 private:
  ObjectStore* objects_;
};

}  // namespace vmdedup
