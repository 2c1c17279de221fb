// End-to-end tests of multi-block frame records (repository format 2): the
// same raw image backed up with 64 KiB frames and with one block a frame
// restores bit-exactly from both, passes `check --read-data`, dedups the same
// blocks, and stores less with frames; the containers and recipes written
// with one block a frame keep the version 1 layout an older vmdedup reads;
// small reads anywhere inside frames return the image's bytes; an
// incremental that changes blocks inside a frame references the parent's
// other blocks of that frame; blocks repeated across segments are stored
// once, in the same frames, however many workers race on them.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "base/encoding.h"
#include "base/fingerprint.h"
#include "engine/snapshot_reader.h"
#include "store/container.h"
#include "store/repository.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kImageSize = 16 * kMiB;
constexpr uint64_t kDupFrom = 64 * kKiB, kDupTo = 6 * kMiB + 12 * kKiB, kDupLen = 256 * kKiB;

// Compressible, unique-per-block text: lines of words drawn at random.
std::string Text(size_t n, uint64_t seed) {
  static const char* kWords[] = {"alpha", "bravo", "charlie", "delta",  "echo",   "foxtrot",
                                 "golf",  "hotel", "india",   "juliet", "kilo",   "lima",
                                 "mike",  "nov",   "oscar",   "papa",   "quebec", "romeo"};
  std::mt19937_64 rng(seed);
  std::string s;
  s.reserve(n + 64);
  while (s.size() < n) {
    s += kWords[rng() % 18];
    s += (rng() % 9 == 0) ? '\n' : ' ';
    if (rng() % 5 == 0) s += std::to_string(rng() % 100000);
  }
  s.resize(n);
  return s;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

class FrameBackupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    image_ = dir_.Sub("disk.raw");
    content_.assign(kImageSize, '\0');
    content_.replace(0, 3 * kMiB, Text(3 * kMiB, 1));
    content_.replace(3 * kMiB, 2 * kMiB, RandomBytes(2 * kMiB, 2));
    content_.replace(6 * kMiB, 2 * kMiB, Text(2 * kMiB, 3));
    content_.replace(kDupTo, kDupLen, content_.substr(kDupFrom, kDupLen));
    content_.replace(9 * kMiB + 4 * kKiB, 100 * kKiB, RandomBytes(100 * kKiB, 4));
    WriteImage();
  }

  void WriteImage() {
    std::ofstream out(image_, std::ios::binary | std::ios::trunc);
    out.write(content_.data(), static_cast<std::streamsize>(content_.size()));
  }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }

  std::string Init(const std::string& name, const std::string& frame_size) {
    std::string repo = dir_.Sub(name);
    auto r = Vmdedup({"init", repo, "--chunker", "fixed", "--frame-size", frame_size, "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return repo;
  }

  nlohmann::json Backup(const std::string& repo, const std::string& threads = "1") {
    auto r = Vmdedup({"backup", "-r", repo, "--vm", "vm1", "--disk", "vda", "--threads", threads,
                      "--json", "raw:" + image_});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.exit_code == 0 ? nlohmann::json::parse(r.out) : nlohmann::json();
  }

  std::string RestoreSha(const std::string& repo, const std::string& snapshot) {
    std::string out = dir_.Sub("restored.raw");
    auto r = Vmdedup({"restore", "-r", repo, snapshot, "--to", out, "--force"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string sha = FileSha256(out);
    unlink(out.c_str());
    return sha;
  }

  void ExpectCheckClean(const std::string& repo) {
    auto r = Vmdedup({"check", "-r", repo, "--read-data", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    auto j = nlohmann::json::parse(r.out);
    EXPECT_TRUE(j["ok"].get<bool>()) << r.out;
  }

  struct Layout {
    std::set<uint32_t> container_versions;
    uint64_t block_records = 0, frame_records = 0, frame_blocks = 0;
    uint32_t largest_frame = 0;  // plaintext bytes
    std::set<uint8_t> recipe_versions;
  };

  // What the VM's containers and recipes hold.
  Layout Inspect(const std::string& repo) {
    Layout l;
    for (const auto& e : std::filesystem::directory_iterator(repo + "/vms/vm1/data")) {
      std::string bytes = ReadBytes(e.path().string());
      EXPECT_GE(bytes.size(), 64u);
      if (bytes.size() < 64) continue;
      l.container_versions.insert(DecodeU32(reinterpret_cast<const uint8_t*>(bytes.data()) + 8));
      const uint64_t id = std::stoull(e.path().stem().string(), nullptr, 16);
      Status st = ForEachBlockRecord(bytes, id, e.path().string(),
                                     [&](const BlockRecordInfo& info, std::string_view) {
                                       if (info.block_count == 1) {
                                         l.block_records++;
                                       } else {
                                         l.frame_records++;
                                         l.frame_blocks += info.block_count;
                                         l.largest_frame = std::max(l.largest_frame, info.raw_len);
                                       }
                                       return Status::OK();
                                     });
      EXPECT_TRUE(st.ok()) << st.ToString();
    }
    auto r = Repository::Open(repo);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok()) return l;
    auto vm = (*r)->OpenVm("vm1", Repository::Access::kRead);
    EXPECT_TRUE(vm.ok()) << vm.status().ToString();
    if (!vm.ok()) return l;
    Status st = (*vm)->meta()->Scan("seg/", [&](std::string_view, std::string_view value) {
      if (value.size() > 1) l.recipe_versions.insert(static_cast<uint8_t>(value[1]));
      return true;
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    return l;
  }

  ScratchDir dir_;
  std::string image_;
  std::string content_;
};

TEST_F(FrameBackupTest, FramesAndSingleBlockRecordsRestoreTheSameAndFramesStoreLess) {
  const std::string framed = Init("framed", "64K");
  const std::string single = Init("single", "0");
  auto f = Backup(framed);
  auto s = Backup(single);
  ASSERT_FALSE(f.is_null());
  ASSERT_FALSE(s.is_null());
  const std::string sha = FileSha256(image_);
  EXPECT_EQ(RestoreSha(framed, "vm1/vda/1"), sha);
  EXPECT_EQ(RestoreSha(single, "vm1/vda/1"), sha);
  ExpectCheckClean(framed);
  ExpectCheckClean(single);

  // The same dedup decisions: the repeated 256 KiB are found in this run.
  for (const char* field : {"zero", "block", "new", "new_blocks", "read_bytes"})
    EXPECT_EQ(f[field], s[field]) << field << "\n" << f.dump() << "\n" << s.dump();
  EXPECT_EQ(f["block"].get<uint64_t>(), kDupLen);
  // Text compresses better in frames; the random data is stored as it is.
  EXPECT_LT(f["stored"].get<uint64_t>(), s["stored"].get<uint64_t>() * 98 / 100)
      << f["stored"] << " vs " << s["stored"];

  Layout fl = Inspect(framed);
  EXPECT_EQ(fl.container_versions, std::set<uint32_t>({2}));
  EXPECT_GT(fl.frame_records, 0u);
  EXPECT_LE(fl.largest_frame, 64 * kKiB);
  EXPECT_EQ(fl.largest_frame, 64 * kKiB);  // 16 adjacent 4 KiB blocks fill a frame
  EXPECT_EQ(fl.frame_blocks + fl.block_records, f["new_blocks"].get<uint64_t>());
  EXPECT_TRUE(fl.recipe_versions.count(2)) << "no recipe refers into a frame";

  // One block a frame writes only what format 1 has.
  Layout sl = Inspect(single);
  EXPECT_EQ(sl.container_versions, std::set<uint32_t>({1}));
  EXPECT_EQ(sl.frame_records, 0u);
  EXPECT_EQ(sl.block_records, s["new_blocks"].get<uint64_t>());
  EXPECT_EQ(sl.recipe_versions, std::set<uint8_t>({1}));
}

// `init --container-size` bounds every container of a backup (trailer
// included), and bad sizes are refused with the accepted range.
TEST_F(FrameBackupTest, ContainerSizeBoundsEveryContainer) {
  auto d = Vmdedup({"init", dir_.Sub("default"), "--json"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(nlohmann::json::parse(d.out)["container_capacity"].get<uint64_t>(), 8 * kMiB);
  for (const char* bad : {"512K", "65M", "1x"}) {
    auto r = Vmdedup({"init", dir_.Sub(std::string("bad-") + bad), "--container-size", bad});
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.err;
    EXPECT_NE(r.err.find(bad), std::string::npos) << r.err;
  }

  const std::string repo = dir_.Sub("small");
  auto r = Vmdedup({"init", repo, "--chunker", "fixed", "--container-size", "1M", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["container_capacity"].get<uint64_t>(), kMiB);
  auto snap = Backup(repo, "2");
  ASSERT_FALSE(snap.is_null());
  // More than 2 MiB is stored (the random 2.1 MiB alone), so at least three
  // containers, none above 1 MiB.
  ASSERT_GT(snap["stored"].get<uint64_t>(), 2 * kMiB);
  size_t containers = 0;
  for (const auto& e : std::filesystem::directory_iterator(repo + "/vms/vm1/data")) {
    EXPECT_LE(e.file_size(), kMiB) << e.path();
    containers++;
  }
  EXPECT_GE(containers, 3u);
  EXPECT_EQ(RestoreSha(repo, "vm1/vda/1"), FileSha256(image_));
  ExpectCheckClean(repo);
}

TEST_F(FrameBackupTest, SmallReadsInsideFramesAreExact) {
  const std::string repo = Init("framed", "64K");
  ASSERT_FALSE(Backup(repo).is_null());
  auto r = Repository::Open(repo);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto vm = (*r)->OpenVm("vm1", Repository::Access::kRead);
  ASSERT_TRUE(vm.ok()) << vm.status().ToString();
  auto snap = (*vm)->GetSnapshot("vda", 1);
  ASSERT_TRUE(snap.ok()) << snap.status().ToString();
  auto reader = SnapshotReader::Open(**r, **vm, *snap);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  Sha256Hasher hasher;
  std::mt19937_64 rng(11);
  std::vector<uint8_t> out(128 * kKiB);
  int checked = 0;
  for (int i = 0; i < 400; i++) {
    const uint64_t seg = rng() % (*reader)->segment_count();
    if ((*reader)->SegmentIsZero(seg)) continue;
    auto recipe = (*reader)->GetRecipe(seg);
    ASSERT_TRUE(recipe.ok()) << recipe.status().ToString();
    const uint32_t len = (*reader)->SegmentLength(seg);
    // Lengths from 1 byte to 96 KiB, often crossing a frame's end.
    const uint32_t n = 1 + static_cast<uint32_t>(rng() % (i % 4 == 0 ? 96 * kKiB : 6 * kKiB));
    const uint32_t begin = static_cast<uint32_t>(rng() % (len - n));
    Status st = (*reader)->ReadRange(seg, *recipe, begin, begin + n, out.data(), hasher);
    ASSERT_TRUE(st.ok()) << st.ToString();
    const uint64_t at = seg * 2 * kMiB + begin;
    ASSERT_EQ(std::memcmp(out.data(), content_.data() + at, n), 0)
        << "segment " << seg << " [" << begin << ", " << begin + n << ")";
    checked++;
  }
  EXPECT_GT(checked, 150);
  // Whole segments too, decoded straight into the output.
  std::vector<uint8_t> seg_buf(2 * kMiB);
  for (uint64_t seg = 0; seg < (*reader)->segment_count(); seg++) {
    ASSERT_TRUE((*reader)->ReadSegment(seg, seg_buf.data(), hasher, nullptr).ok());
    ASSERT_EQ(std::memcmp(seg_buf.data(), content_.data() + seg * 2 * kMiB, 2 * kMiB), 0) << seg;
  }
}

TEST_F(FrameBackupTest, IncrementalKeepsTheUnchangedBlocksOfAFrame) {
  const std::string repo = Init("framed", "64K");
  auto s1 = Backup(repo);
  ASSERT_FALSE(s1.is_null());
  const std::string sha1 = FileSha256(image_);
  // Two blocks in the middle of the first frames of segment 0 and 3.
  content_.replace(20 * kKiB, 8 * kKiB, Text(8 * kKiB, 9));
  content_.replace(3 * kMiB + 36 * kKiB, 4 * kKiB, RandomBytes(4 * kKiB, 10));
  WriteImage();
  auto s2 = Backup(repo);
  ASSERT_FALSE(s2.is_null());
  EXPECT_EQ(s2["new"].get<uint64_t>(), 12 * kKiB) << s2.dump();
  EXPECT_EQ(s2["block"].get<uint64_t>(), s1["new"].get<uint64_t>() + kDupLen - 12 * kKiB)
      << s2.dump();
  EXPECT_EQ(RestoreSha(repo, "vm1/vda/1"), sha1);
  EXPECT_EQ(RestoreSha(repo, "vm1/vda/2"), FileSha256(image_));
  ExpectCheckClean(repo);
}

TEST_F(FrameBackupTest, RepeatedBlocksAcrossSegmentsAreStoredOnceWhateverTheWorkers) {
  // 12 segments, each: its own text, then the same 256 KiB of text at an
  // offset that moves with the segment (whole 4 KiB blocks), then zeros.
  // Neighbouring segments are processed at the same time by two workers.
  const std::string shared = Text(256 * kKiB, 21);
  content_.assign(24 * kMiB, '\0');
  for (uint64_t seg = 0; seg < 12; seg++) {
    const uint64_t base = seg * 2 * kMiB;
    content_.replace(base, kMiB, Text(kMiB, 100 + seg));
    content_.replace(base + kMiB + 4 * kKiB * seg, shared.size(), shared);
  }
  WriteImage();
  auto one = Backup(Init("one", "64K"), "1");
  ASSERT_FALSE(one.is_null());
  EXPECT_EQ(one["block"].get<uint64_t>(), 11 * shared.size()) << one.dump();
  for (int round = 0; round < 3; round++) {
    const std::string repo = Init("two-" + std::to_string(round), "64K");
    auto two = Backup(repo, "2");
    ASSERT_FALSE(two.is_null());
    for (const char* field : {"block", "new", "new_blocks", "stored"})
      EXPECT_EQ(two[field], one[field]) << field << ", round " << round << "\n"
                                        << two.dump() << "\n"
                                        << one.dump();
    if (round == 0) {
      EXPECT_EQ(RestoreSha(repo, "vm1/vda/1"), FileSha256(image_));
      ExpectCheckClean(repo);
    }
  }
}

}  // namespace
}  // namespace vmdedup::testing
