// global_dedup_bench: exact global deduplication of a fleet of raw images with
// vmdedup's own chunkers, the reference for dedup efficiency at the same block
// size (docs/benchmarks.md, docs/chunking.md).
//
// Every image is cut as a full vmdedup backup cuts it: the disk is split into
// segments (default 2 MiB); inside a segment, each data range (an allocated
// extent from SEEK_DATA/SEEK_HOLE, clipped to the segment; or with
// --ranges segment the whole segment when any of it is allocated) is cut by
// the chunker on its own; all-zero blocks are skipped (level 0). Every other
// block is fingerprinted with SHA-256 and counted once over the whole fleet
// (global), and once per VM (inner-VM only).
//
// Usage: global_dedup_bench [--chunker fixed|cdc] [--avg N] [--min N] [--max N]
//                           [--segment N] [--ranges alloc|segment] [--json FILE] PATH...
// PATH is a datagen fleet directory (DIR/*/snap-N.raw; one VM a directory,
// snapshots in order of N) or raw image files (grouped by directory).
// Defaults are vmdedup's: cdc, avg 4096, min 1024, max 16384, 2 MiB segments.
//
// Output: one line per image and a JSON summary (also to --json FILE):
// logical, nonzero, unique_global, unique_inner_vm, blocks, seconds.
// Memory: about 80 bytes per unique block (an unordered_map entry).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <regex>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/fingerprint.h"
#include "engine/block_scan.h"
#include "engine/chunker.h"

namespace vmdedup {
namespace {

[[noreturn]] void Die(const std::string& msg, int code = 1) {
  std::fprintf(stderr, "global_dedup_bench: %s\n", msg.c_str());
  std::exit(code);
}

struct Image {
  std::string vm, path;
  int snap = 0;
};

std::vector<Image> FindImages(const std::vector<std::string>& paths) {
  namespace fs = std::filesystem;
  std::vector<Image> out;
  const std::regex snap_re("snap-([0-9]+)\\.raw");
  auto add = [&](const fs::path& p) {
    std::smatch m;
    std::string name = p.filename().string();
    Image im;
    im.path = p.string();
    im.vm = fs::absolute(p).parent_path().filename().string();
    if (std::regex_match(name, m, snap_re)) im.snap = std::stoi(m[1]);
    out.push_back(im);
  };
  for (const std::string& s : paths) {
    fs::path p(s);
    if (fs::is_directory(p)) {
      std::vector<fs::path> dirs = {p};
      for (const auto& e : fs::directory_iterator(p))
        if (e.is_directory()) dirs.push_back(e.path());
      for (const auto& d : dirs)
        for (const auto& e : fs::directory_iterator(d)) {
          std::smatch m;
          std::string name = e.path().filename().string();
          if (e.is_regular_file() && std::regex_match(name, m, snap_re)) add(e.path());
        }
    } else {
      add(p);
    }
  }
  std::sort(out.begin(), out.end(), [](const Image& a, const Image& b) {
    return a.vm != b.vm ? a.vm < b.vm : a.snap < b.snap;
  });
  return out;
}

std::vector<std::pair<uint64_t, uint64_t>> DataExtents(int fd, uint64_t size) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  off_t pos = 0;
  while (static_cast<uint64_t>(pos) < size) {
    off_t data = lseek(fd, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;
      Die(std::string("lseek: ") + std::strerror(errno));
    }
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) hole = static_cast<off_t>(size);
    out.push_back({static_cast<uint64_t>(data), static_cast<uint64_t>(hole)});
    pos = hole;
  }
  return out;
}

void PreadFull(int fd, uint8_t* buf, size_t n, uint64_t off) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = pread(fd, buf + done, n - done, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      Die(std::string("pread: ") + std::strerror(errno));
    }
    if (r == 0) {
      std::memset(buf + done, 0, n - done);
      return;
    }
    done += static_cast<size_t>(r);
  }
}

struct Entry {
  uint32_t length = 0;
  int32_t last_vm = -1;
};

struct Row {
  Image image;
  uint64_t logical = 0, nonzero = 0, blocks = 0, new_global = 0, new_to_vm = 0;
  double seconds = 0;
};

int Main(int argc, char** argv) {
  ChunkerParams params;  // cdc 4096/1024/16384
  uint64_t segment = 2u << 20;
  bool whole_segments = false;
  std::string json_path;
  std::vector<std::string> paths;
  for (int i = 1; i < argc; i++) {
    std::string s = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Die("option " + s + " needs a value", 2);
      return argv[++i];
    };
    if (s == "--chunker") {
      auto k = ParseChunkerKind(next());
      if (!k.ok()) Die(k.status().ToString(), 2);
      params.kind = *k;
    } else if (s == "--avg") {
      params.avg_size = static_cast<uint32_t>(std::stoul(next()));
    } else if (s == "--min") {
      params.min_size = static_cast<uint32_t>(std::stoul(next()));
    } else if (s == "--max") {
      params.max_size = static_cast<uint32_t>(std::stoul(next()));
    } else if (s == "--segment") {
      segment = std::stoull(next());
    } else if (s == "--ranges") {
      std::string r = next();
      if (r != "alloc" && r != "segment") Die("--ranges alloc|segment", 2);
      whole_segments = r == "segment";
    } else if (s == "--json") {
      json_path = next();
    } else if (!s.empty() && s[0] == '-') {
      Die("usage: global_dedup_bench [--chunker fixed|cdc] [--avg N] [--min N] [--max N] "
          "[--segment N] [--ranges alloc|segment] [--json FILE] PATH...",
          2);
    } else {
      paths.push_back(s);
    }
  }
  auto chunker_or = NewChunker(params);
  if (!chunker_or.ok()) Die(chunker_or.status().ToString(), 2);
  const Chunker& chunker = **chunker_or;
  std::vector<Image> images = FindImages(paths);
  if (images.empty()) Die("no images found", 2);

  std::map<std::string, int> vm_index;
  for (const Image& im : images) vm_index.emplace(im.vm, static_cast<int>(vm_index.size()));
  std::unordered_map<Fingerprint, Entry, FingerprintHash> index;
  index.reserve(4u << 20);
  std::vector<uint64_t> unique_per_vm(vm_index.size());
  Sha256Hasher hasher;
  std::vector<uint8_t> buf(segment);
  std::vector<uint32_t> lengths;
  std::vector<Row> rows;
  uint64_t unique = 0;
  const auto t0 = std::chrono::steady_clock::now();

  for (const Image& im : images) {
    const auto ti = std::chrono::steady_clock::now();
    const int vi = vm_index[im.vm];
    int fd = open(im.path.c_str(), O_RDONLY);
    if (fd < 0) Die("open " + im.path + ": " + std::strerror(errno));
    Row row;
    row.image = im;
    const off_t end = lseek(fd, 0, SEEK_END);
    row.logical = static_cast<uint64_t>(end);
    auto ext = DataExtents(fd, row.logical);
    size_t e = 0;
    for (uint64_t sb = 0; sb < row.logical; sb += segment) {
      const uint64_t se = std::min(row.logical, sb + segment);
      while (e < ext.size() && ext[e].second <= sb) e++;
      if (e == ext.size()) break;
      if (ext[e].first >= se) continue;  // all hole
      // Data ranges of this segment, relative to sb.
      std::vector<std::pair<uint64_t, uint64_t>> ranges;
      for (size_t k = e; k < ext.size() && ext[k].first < se; k++)
        ranges.push_back({std::max(sb, ext[k].first) - sb, std::min(se, ext[k].second) - sb});
      if (whole_segments) ranges = {{0, se - sb}};
      const uint64_t rb = ranges.front().first, re = ranges.back().second;
      PreadFull(fd, buf.data() + rb, re - rb, sb + rb);
      for (auto [b, en] : ranges) {
        std::span<const uint8_t> data(buf.data() + b, en - b);
        lengths.clear();
        chunker.Cut(data, &lengths);
        size_t pos = 0;
        for (uint32_t len : lengths) {
          std::span<const uint8_t> block = data.subspan(pos, len);
          pos += len;
          if (IsAllZero(block)) continue;
          row.nonzero += len;
          row.blocks++;
          Fingerprint fp = hasher.Hash(block);
          auto [it, inserted] = index.try_emplace(fp, Entry{len, vi});
          if (inserted) {
            row.new_global += len;
            row.new_to_vm += len;
            unique += len;
            unique_per_vm[vi] += len;
          } else if (it->second.last_vm != vi) {
            it->second.last_vm = vi;
            row.new_to_vm += len;
            unique_per_vm[vi] += len;
          }
        }
      }
    }
    close(fd);
    row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - ti).count();
    std::fprintf(stderr,
                 "%-12s snap-%d nonzero %10llu  blocks %8llu  new-to-VM %10llu  new-global %10llu  "
                 "(%.1f s)\n",
                 im.vm.c_str(), im.snap, static_cast<unsigned long long>(row.nonzero),
                 static_cast<unsigned long long>(row.blocks),
                 static_cast<unsigned long long>(row.new_to_vm),
                 static_cast<unsigned long long>(row.new_global), row.seconds);
    rows.push_back(row);
  }

  uint64_t logical = 0, nonzero = 0, blocks = 0, inner = 0;
  for (const Row& r : rows) {
    logical += r.logical;
    nonzero += r.nonzero;
    blocks += r.blocks;
  }
  for (uint64_t u : unique_per_vm) inner += u;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::string json = "{\"chunker\":\"" + std::string(ChunkerKindName(params.kind)) +
                     "\",\"avg\":" + std::to_string(params.avg_size) +
                     ",\"min\":" + std::to_string(params.min_size) +
                     ",\"max\":" + std::to_string(params.max_size) +
                     ",\"segment\":" + std::to_string(segment) + ",\"ranges\":\"" +
                     (whole_segments ? "segment" : "alloc") + "\",\"images\":[";
  for (size_t i = 0; i < rows.size(); i++) {
    const Row& r = rows[i];
    json += std::string(i ? "," : "") + "{\"vm\":\"" + r.image.vm +
            "\",\"snap\":" + std::to_string(r.image.snap) +
            ",\"logical\":" + std::to_string(r.logical) +
            ",\"nonzero\":" + std::to_string(r.nonzero) +
            ",\"blocks\":" + std::to_string(r.blocks) +
            ",\"new_to_vm\":" + std::to_string(r.new_to_vm) +
            ",\"new_global\":" + std::to_string(r.new_global) + "}";
  }
  char tail[512];
  std::snprintf(tail, sizeof(tail),
                "],\"logical\":%llu,\"nonzero\":%llu,\"blocks\":%llu,\"unique_blocks\":%zu,"
                "\"unique_global\":%llu,\"unique_inner_vm\":%llu,\"avg_block\":%.0f,"
                "\"seconds\":%.1f}",
                static_cast<unsigned long long>(logical), static_cast<unsigned long long>(nonzero),
                static_cast<unsigned long long>(blocks), index.size(),
                static_cast<unsigned long long>(unique), static_cast<unsigned long long>(inner),
                blocks ? static_cast<double>(nonzero) / static_cast<double>(blocks) : 0.0, secs);
  json += tail;
  std::printf("%s\n", json.c_str());
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (!f) Die("cannot write " + json_path);
    std::fprintf(f, "%s\n", json.c_str());
    std::fclose(f);
  }
  return 0;
}

}  // namespace
}  // namespace vmdedup

int main(int argc, char** argv) { return vmdedup::Main(argc, argv); }
