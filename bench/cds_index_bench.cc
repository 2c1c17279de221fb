// cds_index_bench: cost of the in-memory CDS index (engine/cds_index.h).
// Writes a CDS version of N random entries through CdsArea into a temporary
// local object store, loads it with CdsIndex::Load and measures the time per
// lookup for misses (random fingerprints: no read) and for hits (each
// confirmed by reading the entry's fingerprint from its index object, a
// pread from the page cache here), and the memory per entry.
//
// Usage: cds_index_bench [entries] [dir]   (default 1048576 entries, $TMPDIR).
// Build with -DCMAKE_BUILD_TYPE=Release. The CDS containers are small
// stand-ins (the index only records where records are; no block is read).
// Times are wall clock, best of 3 rounds, one thread.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "engine/cds_index.h"

namespace vmdedup {
namespace {

constexpr int kRounds = 3;
constexpr uint32_t kContainers = 64;

Fingerprint RandomFingerprint(std::mt19937_64& rng) {
  Fingerprint fp;
  for (size_t k = 0; k < 32; k += 8) {
    uint64_t r = rng();
    std::memcpy(fp.bytes.data() + k, &r, 8);
  }
  return fp;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Best time per call of `lookup` over `keys`, in nanoseconds; `found`
// receives how many were hits.
double BestNs(const CdsIndex& index, const std::vector<Fingerprint>& keys, uint64_t* found) {
  double best = 1e30;
  for (int r = 0; r < kRounds; r++) {
    uint64_t hits = 0;
    auto start = std::chrono::steady_clock::now();
    for (const Fingerprint& fp : keys) hits += index.Lookup(fp).has_value();
    best = std::min(best, Seconds(start) * 1e9 / static_cast<double>(keys.size()));
    *found = hits;
  }
  return best;
}

void Row(const char* name, double ns, uint64_t lookups, uint64_t found) {
  std::printf("%-34s %10.0f %10llu %10llu\n", name, ns, static_cast<unsigned long long>(lookups),
              static_cast<unsigned long long>(found));
}

int Main(int argc, char** argv) {
  const uint64_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : (1u << 20);
  std::string base = argc > 2 ? argv[2] : (std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp");
  std::string tmpl = base + "/cds_index_bench.XXXXXX";
  if (n == 0 || ::mkdtemp(tmpl.data()) == nullptr) {
    std::fprintf(stderr, "usage: cds_index_bench [entries>0] [dir]\n");
    return 2;
  }
  const std::string dir = tmpl;
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } cleanup{dir};

  std::unique_ptr<ObjectStore> objects = NewLocalObjectStore(dir);
  CdsArea area(objects.get());
  const std::string blob(64 << 10, 'c');
  for (uint32_t c = 0; c < kContainers; c++) {
    Status st = objects->Put(CdsArea::ContainerObjectName(CdsArea::ContainerId(1, c)),
                             {reinterpret_cast<const uint8_t*>(blob.data()), blob.size()});
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.ToString().c_str());
      return 1;
    }
  }

  std::mt19937_64 rng(0x5eed);
  std::vector<CdsEntry> entries(n);
  for (uint64_t i = 0; i < n; i++) {
    CdsEntry& e = entries[i];
    e.fingerprint = RandomFingerprint(rng);
    e.length = 4096;
    e.container = CdsArea::ContainerId(1, static_cast<uint32_t>(i % kContainers));
    e.offset = 32 + static_cast<uint32_t>(i % 8) * 2048;
    e.record_len = 48 + 1500;
  }
  std::sort(entries.begin(), entries.end(),
            [](const CdsEntry& a, const CdsEntry& b) { return a.fingerprint < b.fingerprint; });
  entries.erase(std::unique(entries.begin(), entries.end(),
                            [](const CdsEntry& a, const CdsEntry& b) {
                              return a.fingerprint == b.fingerprint;
                            }),
                entries.end());

  CdsVersionInfo info;
  info.version = 1;
  info.selection = "cds_index_bench";
  auto start = std::chrono::steady_clock::now();
  Status st = area.WriteVersion(&info, entries);
  if (st.ok()) st = area.Publish(1);
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 1;
  }
  const double write_s = Seconds(start);
  start = std::chrono::steady_clock::now();
  Result<std::unique_ptr<CdsIndex>> loaded = CdsIndex::Load(objects.get(), 1);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", loaded.status().ToString().c_str());
    return 1;
  }
  const double load_s = Seconds(start);
  const CdsIndex& index = **loaded;

  const size_t lookups = std::min<size_t>(entries.size(), 1u << 20);
  std::vector<Fingerprint> misses(lookups), hits(lookups);
  for (Fingerprint& fp : misses) fp = RandomFingerprint(rng);
  for (size_t i = 0; i < lookups; i++) hits[i] = entries[rng() % entries.size()].fingerprint;

  // The same index with confirmations from memory: the cost of the index
  // itself, without the read.
  std::unique_ptr<CdsIndex> in_memory = CdsIndex::FromEntries(
      1, entries, [&](uint64_t i) -> Result<Fingerprint> { return entries[i].fingerprint; });

  std::printf("CDS index: %llu entries, %u index part(s), written in %.2f s, loaded in %.2f s\n",
              static_cast<unsigned long long>(index.size()), info.index_parts, write_s, load_s);
  std::printf("memory: %llu bytes, %.2f bytes an entry\n\n",
              static_cast<unsigned long long>(index.MemoryBytes()),
              static_cast<double>(index.MemoryBytes()) / static_cast<double>(index.size()));
  std::printf("%-34s %10s %10s %10s\n", "lookup (1 thread)", "ns", "lookups", "found");
  uint64_t found = 0;
  double ns = BestNs(index, misses, &found);
  Row("miss (random fingerprint)", ns, lookups, found);
  ns = BestNs(index, hits, &found);
  Row("hit, confirmed by a pread", ns, lookups, found);
  ns = BestNs(*in_memory, misses, &found);
  Row("miss, index only", ns, lookups, found);
  ns = BestNs(*in_memory, hits, &found);
  Row("hit, confirmed from memory", ns, lookups, found);
  std::printf("\nprefix collisions %llu, confirmation errors %llu\n",
              static_cast<unsigned long long>(index.prefix_collisions()),
              static_cast<unsigned long long>(index.confirm_errors()));
  return 0;
}

}  // namespace
}  // namespace vmdedup

int main(int argc, char** argv) { return vmdedup::Main(argc, argv); }
