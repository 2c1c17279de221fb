// chunker_bench: single-thread throughput of the fixed and CDC chunkers, of
// SHA-256 fingerprinting (Sha256Hasher over 4 KiB blocks) and of the zero-block
// scan, over pseudo-random data cut as the pipeline does (2 MiB segments).
//
// Usage: chunker_bench [MiB]   (default 256). Build with -DCMAKE_BUILD_TYPE=Release.
// Times are this thread's CPU time (best of 3), so that other load on a shared
// machine does not count; on an idle machine they equal wall time. The fixed
// chunker only computes lengths and reads no data: its figure is not
// data-bound and only shows that it costs nothing.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <span>
#include <vector>

#include "base/fingerprint.h"
#include "engine/block_scan.h"
#include "engine/chunker.h"

namespace vmdedup {
namespace {

constexpr size_t kSegment = 2 << 20;
constexpr int kRepeats = 3;

std::vector<uint8_t> RandomData(size_t n) {
  std::vector<uint8_t> out(n);
  uint64_t s = 0x1234567;
  for (size_t i = 0; i + 8 <= n; i += 8) {
    s += 0x9e3779b97f4a7c15ULL;
    uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    std::copy_n(reinterpret_cast<const uint8_t*>(&z), 8, out.data() + i);
  }
  return out;
}

double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// Runs `fn` kRepeats times and returns the best throughput in MB/s (10^6 B/s).
double BestMBps(size_t bytes, const std::function<void()>& fn) {
  double best = 0;
  for (int r = 0; r < kRepeats; ++r) {
    const double start = ThreadCpuSeconds();
    fn();
    const double secs = std::max(ThreadCpuSeconds() - start, 1e-9);
    best = std::max(best, static_cast<double>(bytes) / secs / 1e6);
  }
  return best;
}

void Row(const char* name, double mbps, size_t blocks, size_t bytes) {
  if (blocks > 0) {
    std::printf("%-26s %10.0f %10zu %10.0f\n", name, mbps, blocks,
                static_cast<double>(bytes) / static_cast<double>(blocks));
  } else {
    std::printf("%-26s %10.0f %10s %10s\n", name, mbps, "-", "-");
  }
}

int Main(int argc, char** argv) {
  size_t mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 256;
  if (mib == 0) mib = 256;
  const size_t bytes = mib << 20;
  std::printf("generating %zu MiB of random data...\n", mib);
  const auto data = RandomData(bytes);
  const std::span<const uint8_t> all(data);

  std::printf("%-26s %10s %10s %10s\n", "single thread", "MB/s", "blocks", "avg bytes");
  std::vector<uint32_t> lengths;
  lengths.reserve(bytes / 1024 + 1024);

  auto cut = [&](const Chunker& c) {
    lengths.clear();
    for (size_t off = 0; off < bytes; off += kSegment) {
      c.Cut(all.subspan(off, std::min(kSegment, bytes - off)), &lengths);
    }
  };

  ChunkerParams fixed_params;
  fixed_params.kind = ChunkerKind::kFixed;
  auto fixed = NewChunker(fixed_params);
  auto cdc = NewChunker(ChunkerParams{});
  if (!fixed.ok() || !cdc.ok()) {
    std::fprintf(stderr, "NewChunker failed\n");
    return 1;
  }
  double mbps = BestMBps(bytes, [&] { cut(**fixed); });
  Row("fixed 4K (no data read)", mbps, lengths.size(), bytes);
  mbps = BestMBps(bytes, [&] { cut(**cdc); });
  Row("cdc 1K/4K/16K", mbps, lengths.size(), bytes);
  const std::vector<uint32_t> cdc_lengths = lengths;

  Sha256Hasher hasher;
  uint64_t sink = 0;
  mbps = BestMBps(bytes, [&] {
    for (size_t off = 0; off < bytes; off += 4096) {
      sink += hasher.Hash(all.subspan(off, std::min<size_t>(4096, bytes - off))).Prefix64();
    }
  });
  Row("sha256 4K blocks", mbps, bytes / 4096, bytes);

  mbps = BestMBps(bytes, [&] {
    size_t off = 0;
    for (uint32_t len : cdc_lengths) {
      sink += hasher.Hash(all.subspan(off, len)).Prefix64();
      off += len;
    }
  });
  Row("sha256 cdc blocks", mbps, cdc_lengths.size(), bytes);

  mbps = BestMBps(bytes, [&] {
    cut(**cdc);
    size_t off = 0;
    for (uint32_t len : lengths) {
      sink += hasher.Hash(all.subspan(off, len)).Prefix64();
      off += len;
    }
  });
  Row("cdc + sha256", mbps, lengths.size(), bytes);

  const std::vector<uint8_t> zeros(bytes, 0);
  size_t zero_blocks = 0;
  mbps = BestMBps(bytes, [&] {
    zero_blocks = 0;
    for (size_t off = 0; off < bytes; off += 4096) {
      zero_blocks += IsAllZero(std::span(zeros).subspan(off, 4096));
    }
  });
  Row("IsAllZero (zero 4K)", mbps, zero_blocks, bytes);

  std::printf("(checksum %llx)\n", static_cast<unsigned long long>(sink));
  return 0;
}

}  // namespace
}  // namespace vmdedup

int main(int argc, char** argv) { return vmdedup::Main(argc, argv); }
