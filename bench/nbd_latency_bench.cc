// nbd_latency_bench: latency of random 4 KiB reads from any NBD server
// (`vmdedup serve`, qemu-nbd, ...), one request at a time, through libnbd.
//
// Usage: nbd_latency_bench URI [--count N] [--size BYTES] [--seed S] [--all] [--json]
//
// Offsets are 4 KiB-aligned (or --size-aligned) and uniformly random among
// the export's data extents (base:allocation), since reads of holes measure
// nothing; --all draws them from the whole export. Prints p50, p90, p99,
// max and mean in microseconds. Single-threaded; the server's cache state is
// whatever the earlier reads left (start a fresh server for a cold run).
#include <libnbd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct Range {
  uint64_t begin, end;
};

int Fail(nbd_handle* h, const char* what) {
  std::fprintf(stderr, "nbd_latency_bench: %s: %s\n", what, nbd_get_error());
  if (h) nbd_close(h);
  return 1;
}

// Appends every extent of base:allocation as (begin, end, is_data).
struct Extents {
  std::vector<Range> data;
  uint64_t end = 0;  // of the last extent seen
};

int CollectExtents(void* user, const char* context, uint64_t offset, uint32_t* entries, size_t n,
                   int* error) {
  (void)error;
  if (std::strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
  auto* out = static_cast<Extents*>(user);
  for (size_t i = 0; i + 1 < n; i += 2) {
    uint64_t len = entries[i];
    if ((entries[i + 1] & LIBNBD_STATE_ZERO) == 0) {
      if (!out->data.empty() && out->data.back().end == offset)
        out->data.back().end = offset + len;
      else
        out->data.push_back({offset, offset + len});
    }
    offset += len;
  }
  out->end = std::max(out->end, offset);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0) {
    std::fprintf(stderr,
                 "usage: nbd_latency_bench URI [--count N] [--size BYTES] [--seed S] [--all] "
                 "[--json]\n");
    return 2;
  }
  std::string uri = argv[1];
  uint64_t count = 2000, size = 4096, seed = 1;
  bool all = false, json = false;
  for (int i = 2; i < argc; i++) {
    std::string a = argv[i];
    auto next = [&]() -> uint64_t {
      return i + 1 < argc ? std::strtoull(argv[++i], nullptr, 0) : 0;
    };
    if (a == "--count")
      count = next();
    else if (a == "--size")
      size = next();
    else if (a == "--seed")
      seed = next();
    else if (a == "--all")
      all = true;
    else if (a == "--json")
      json = true;
    else {
      std::fprintf(stderr, "nbd_latency_bench: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (count == 0 || size == 0) return 2;

  nbd_handle* h = nbd_create();
  if (!h) return Fail(nullptr, "nbd_create");
  if (nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
    return Fail(h, "add_meta_context");
  if (nbd_connect_uri(h, uri.c_str()) == -1) return Fail(h, "connect");
  int64_t export_size = nbd_get_size(h);
  if (export_size < 0) return Fail(h, "get_size");

  // Where the data is.
  std::vector<Range> data;
  if (all || nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) != 1) {
    data.push_back({0, static_cast<uint64_t>(export_size)});
  } else {
    Extents ext;
    while (ext.end < static_cast<uint64_t>(export_size)) {
      uint64_t before = ext.end;
      uint64_t len = std::min<uint64_t>(1ull << 30, export_size - ext.end);
      nbd_extent_callback cb = {CollectExtents, &ext, nullptr};
      if (nbd_block_status(h, len, ext.end, cb, 0) == -1) return Fail(h, "block_status");
      if (ext.end <= before) return Fail(h, "block_status made no progress");
    }
    data = std::move(ext.data);
  }
  // Aligned slots inside the data ranges.
  std::vector<std::pair<uint64_t, uint64_t>> slots;  // first offset, number of slots
  uint64_t total_slots = 0;
  for (const auto& r : data) {
    uint64_t b = (r.begin + size - 1) / size * size;
    if (r.end < b + size) continue;
    uint64_t n = (r.end - b) / size;
    slots.push_back({b, n});
    total_slots += n;
  }
  if (total_slots == 0) {
    std::fprintf(stderr, "nbd_latency_bench: no data to read\n");
    nbd_close(h);
    return 1;
  }

  std::mt19937_64 rng(seed);
  std::vector<char> buf(size);
  std::vector<double> us;
  us.reserve(count);
  auto start = std::chrono::steady_clock::now();
  for (uint64_t i = 0; i < count; i++) {
    uint64_t k = rng() % total_slots;
    uint64_t off = 0;
    for (const auto& [b, n] : slots) {
      if (k < n) {
        off = b + k * size;
        break;
      }
      k -= n;
    }
    auto t0 = std::chrono::steady_clock::now();
    if (nbd_pread(h, buf.data(), size, off, 0) == -1) return Fail(h, "pread");
    auto t1 = std::chrono::steady_clock::now();
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  nbd_shutdown(h, 0);
  nbd_close(h);

  std::vector<double> sorted = us;
  std::sort(sorted.begin(), sorted.end());
  auto pct = [&](double p) {
    size_t idx = static_cast<size_t>(p / 100.0 * static_cast<double>(sorted.size() - 1) + 0.5);
    return sorted[std::min(idx, sorted.size() - 1)];
  };
  double mean = 0;
  for (double v : us) mean += v;
  mean /= static_cast<double>(us.size());
  uint64_t data_bytes = 0;
  for (const auto& r : data) data_bytes += r.end - r.begin;
  if (json) {
    std::printf(
        "{\"uri\":\"%s\",\"reads\":%llu,\"size\":%llu,\"data_bytes\":%llu,\"p50_us\":%.1f,"
        "\"p90_us\":%.1f,\"p99_us\":%.1f,\"max_us\":%.1f,\"mean_us\":%.1f,\"iops\":%.0f}\n",
        uri.c_str(), static_cast<unsigned long long>(count), static_cast<unsigned long long>(size),
        static_cast<unsigned long long>(data_bytes), pct(50), pct(90), pct(99), sorted.back(), mean,
        static_cast<double>(count) / secs);
  } else {
    std::printf(
        "%llu random reads of %llu bytes over %.1f MiB of data: p50 %.1f us, p90 %.1f us, "
        "p99 %.1f us, max %.1f us, mean %.1f us (%.0f reads/s)\n",
        static_cast<unsigned long long>(count), static_cast<unsigned long long>(size),
        static_cast<double>(data_bytes) / (1 << 20), pct(50), pct(90), pct(99), sorted.back(), mean,
        static_cast<double>(count) / secs);
  }
  return 0;
}
