// End-to-end tests of `vmdedup backup/restore/check/snapshots` on qcow2 and
// raw images, with the real qemu-img, qemu-io and qemu-nbd: incremental reads
// through vmdedup's own dirty bitmap, discards, fallbacks to a full read when
// the bitmap is missing or inconsistent, and clear errors for bad input.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "store/records.h"
#include "store/repository.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class BackupImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_ = dir_.Sub("repo");
    image_ = dir_.Sub("disk.qcow2");
    auto r = Vmdedup({"init", repo_, "--chunker", chunker_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }

  // Makes a qcow2 image of `size` whose first `data` bytes are random.
  void MakeImage(uint64_t size, uint64_t data, uint64_t seed) {
    std::string raw = dir_.Sub("seed.raw");
    {
      std::ofstream out(raw, std::ios::binary | std::ios::trunc);
      std::string bytes = RandomBytes(data, seed);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    ASSERT_EQ(truncate(raw.c_str(), static_cast<off_t>(size)), 0);
    auto r = RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    unlink(raw.c_str());
  }

  void QemuIo(const std::vector<std::string>& cmds) {
    std::vector<std::string> argv = {"qemu-io", "-f", "qcow2"};
    for (const auto& c : cmds) {
      argv.push_back("-c");
      argv.push_back(c);
    }
    argv.push_back(image_);
    auto r = RunCommand(argv);
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  }

  // SHA-256 of the image's guest-visible content.
  std::string ImageSha() {
    std::string raw = dir_.Sub("current.raw");
    unlink(raw.c_str());
    auto r = RunCommand({"qemu-img", "convert", "-O", "raw", image_, raw});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string sha = FileSha256(raw);
    unlink(raw.c_str());
    return sha;
  }

  nlohmann::json Backup(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = {"backup", "-r",     repo_, "--vm",
                                     "vm1",    "--disk", "vda", "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    args.push_back("qcow2:" + image_);
    auto r = Vmdedup(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    if (r.exit_code != 0) return {};
    last_note_ = r.err;
    return nlohmann::json::parse(r.out);
  }

  std::string RestoreSha(const std::string& snapshot) {
    std::string out = dir_.Sub("restored.raw");
    auto r = Vmdedup({"restore", "-r", repo_, snapshot, "--to", out, "--force"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string sha = FileSha256(out);
    unlink(out.c_str());
    return sha;
  }

  void ExpectCheckClean() {
    auto r = Vmdedup({"check", "-r", repo_, "--read-data", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    auto j = nlohmann::json::parse(r.out);
    EXPECT_TRUE(j["ok"].get<bool>()) << r.out;
  }

  static void ExpectLevelsAddUp(const nlohmann::json& s) {
    EXPECT_EQ(s["zero"].get<uint64_t>() + s["segment"].get<uint64_t>() +
                  s["block"].get<uint64_t>() + s["cds"].get<uint64_t>() + s["new"].get<uint64_t>(),
              s["size"].get<uint64_t>())
        << s.dump();
  }

  std::string chunker_ = "fixed";
  ScratchDir dir_;
  std::string repo_, image_;
  std::string last_note_;
};

TEST_F(BackupImageTest, IncrementalReadsOnlyDirtyExtentsAndRestoresEverySnapshot) {
  MakeImage(64 * kMiB, 24 * kMiB, 1);
  std::vector<std::string> shas = {ImageSha()};
  auto s1 = Backup();
  EXPECT_NE(last_note_.find("full: first backup"), std::string::npos) << last_note_;
  EXPECT_EQ(s1["read_bytes"].get<uint64_t>(), 24 * kMiB);
  EXPECT_EQ(s1["new"].get<uint64_t>(), 24 * kMiB);
  ExpectLevelsAddUp(s1);

  // Three chained incrementals, each with writes and a discard.
  const std::vector<std::vector<std::string>> rounds = {
      {"write -P 0x11 1M 64k", "write -P 0x12 5M 128k", "write -P 0x13 40M 64k"},
      {"write -P 0x21 2M 64k", "discard 8M 1M"},
      {"write -P 0x31 0 64k", "write -P 0x32 63M 64k", "write -P 0x33 12M 192k"},
  };
  const std::vector<uint64_t> dirty_data = {256 * 1024, 64 * 1024, 320 * 1024};
  for (size_t i = 0; i < rounds.size(); i++) {
    QemuIo(rounds[i]);
    shas.push_back(ImageSha());
    auto s = Backup();
    EXPECT_NE(last_note_.find("incremental"), std::string::npos) << last_note_;
    EXPECT_EQ(s["parent"].get<std::string>(), "vm1/vda/" + std::to_string(i + 1));
    // Only the dirty extents that hold data are read: a discarded range is
    // reported as zero by base:allocation and is not read.
    EXPECT_EQ(s["read_bytes"].get<uint64_t>(), dirty_data[i]) << s.dump();
    EXPECT_LE(s["new"].get<uint64_t>(), dirty_data[i]);
    ExpectLevelsAddUp(s);
  }
  for (size_t i = 0; i < shas.size(); i++)
    EXPECT_EQ(RestoreSha("vm1/vda/" + std::to_string(i + 1)), shas[i]) << "snapshot " << i + 1;
  EXPECT_EQ(RestoreSha("vm1/vda/latest"), shas.back());

  // The discarded range restores as zeros.
  std::string out = dir_.Sub("r3.raw");
  ASSERT_EQ(Vmdedup({"restore", "-r", repo_, "vm1/vda/3", "--to", out}).exit_code, 0);
  std::ifstream in(out, std::ios::binary);
  in.seekg(8 * kMiB);
  std::string buf(kMiB, 'x');
  in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
  EXPECT_EQ(buf, std::string(kMiB, '\0'));
  ExpectCheckClean();
}

TEST_F(BackupImageTest, MissingBitmapFallsBackToFullReadButStoresOnlyChanges) {
  MakeImage(32 * kMiB, 16 * kMiB, 2);
  auto s1 = Backup();
  QemuIo({"write -P 0x44 3M 64k"});
  // Someone removes vmdedup's bitmap.
  auto info = RunCommand({"qemu-img", "info", "--output=json", image_});
  auto bitmaps = nlohmann::json::parse(info.out)["format-specific"]["data"]["bitmaps"];
  ASSERT_EQ(bitmaps.size(), 1u) << info.out;
  std::string name = bitmaps[0]["name"].get<std::string>();
  EXPECT_EQ(name.rfind("vmdedup.", 0), 0u);
  ASSERT_EQ(RunCommand({"qemu-img", "bitmap", "--remove", image_, name}).exit_code, 0);
  std::string sha = ImageSha();
  auto s2 = Backup();
  EXPECT_NE(last_note_.find("full: bitmap " + name + " is missing"), std::string::npos)
      << last_note_;
  EXPECT_EQ(s2["read_bytes"].get<uint64_t>(), 16 * kMiB);
  EXPECT_LE(s2["new"].get<uint64_t>(), 64u * 1024);  // level 2 keeps storage small
  EXPECT_EQ(RestoreSha("vm1/vda/2"), sha);
  // And the next one is incremental again.
  QemuIo({"write -P 0x45 4M 64k"});
  auto s3 = Backup();
  EXPECT_NE(last_note_.find("incremental"), std::string::npos) << last_note_;
  EXPECT_EQ(s3["read_bytes"].get<uint64_t>(), 64u * 1024);
  ExpectCheckClean();
}

// VM "a.b" disk "c" and VM "a" disk "b.c" once shared their bitmaps' names
// (vmdedup.ID.a.b.c.SEQ): the second series took over the first's bitmap,
// and the first's next incremental missed the writes before it.
TEST_F(BackupImageTest, SeriesWhoseNamesRunTogetherNeverShareABitmap) {
  MakeImage(16 * kMiB, 4 * kMiB, 21);
  auto backup = [&](const std::string& vm, const std::string& disk) {
    auto r =
        Vmdedup({"backup", "-r", repo_, "--vm", vm, "--disk", disk, "--json", "qcow2:" + image_});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    last_note_ = r.err;
    return r.exit_code == 0 ? nlohmann::json::parse(r.out) : nlohmann::json{};
  };
  backup("a.b", "c");
  QemuIo({"write -P 0x61 1M 64k"});
  backup("a", "b.c");
  QemuIo({"write -P 0x62 5M 64k"});
  const std::string sha = ImageSha();
  auto s = backup("a.b", "c");
  ASSERT_FALSE(s.is_null());
  // Incremental through its own bitmap, which holds both writes.
  EXPECT_NE(last_note_.find("incremental"), std::string::npos) << last_note_;
  EXPECT_EQ(s["read_bytes"].get<uint64_t>(), 2 * 64 * 1024u) << s.dump();
  EXPECT_EQ(RestoreSha("a.b/c/2"), sha);
  QemuIo({"write -P 0x63 9M 64k"});
  const std::string sha2 = ImageSha();
  s = backup("a", "b.c");
  ASSERT_FALSE(s.is_null());
  EXPECT_EQ(RestoreSha("a/b.c/2"), sha2);
  ExpectCheckClean();
}

// A copy of the repository (the same repository id) backing up the same
// disk in turn with the original: neither may continue from a bitmap the
// other made or rotated; each restore is the disk as it was.
TEST_F(BackupImageTest, ACopiedRepositoryNeverContinuesTheOriginalsBitmap) {
  MakeImage(16 * kMiB, 4 * kMiB, 22);
  Backup();
  const std::string copy = dir_.Sub("copy");
  ASSERT_EQ(RunCommand({"cp", "-a", repo_, copy}).exit_code, 0);
  const std::string original = repo_;
  std::map<std::string, std::string> want;  // repo + snapshot → sha
  for (int round = 0; round < 4; round++) {
    repo_ = round % 2 == 0 ? original : copy;
    QemuIo({"write -P " + std::to_string(0x70 + round) + " " + std::to_string(2 + 3 * round) +
            "M 64k"});
    auto s = Backup();
    ASSERT_FALSE(s.is_null());
    want[repo_ + " vm1/vda/" + std::to_string(s["seq"].get<uint64_t>())] = ImageSha();
  }
  for (const auto& [key, sha] : want) {
    repo_ = key.substr(0, key.find(' '));
    EXPECT_EQ(RestoreSha(key.substr(key.find(' ') + 1)), sha) << key;
  }
  repo_ = original;
}

// A snapshot whose bitmap has vmdedup's older name (which two series could
// share) is never continued: the next backup reads everything once, removes
// that bitmap, and is incremental again after.
TEST_F(BackupImageTest, ABitmapOfTheOlderNamingIsNeverContinued) {
  MakeImage(16 * kMiB, 4 * kMiB, 23);
  Backup();
  // Make snapshot 1 name an old-style bitmap, present in the image and
  // recording, as the vmdedup before this change left them.
  const std::string old_name = "vmdedup.0123abcd.vm1.vda.1";
  ASSERT_EQ(RunCommand({"qemu-img", "bitmap", "--add", "-f", "qcow2", image_, old_name}).exit_code,
            0);
  {
    auto repo = Repository::Open(repo_);
    ASSERT_TRUE(repo.ok());
    auto vm = (*repo)->OpenVm("vm1", Repository::Access::kWrite);
    ASSERT_TRUE(vm.ok()) << vm.status().ToString();
    auto snap = (*vm)->GetSnapshot("vda", 1);
    ASSERT_TRUE(snap.ok());
    snap->bitmap = old_name;
    WriteBatch b;
    b.Put(SnapshotKey("vda", 1), EncodeSnapshot(SnapshotKey("vda", 1), *snap));
    ASSERT_TRUE((*vm)->meta()->Write(b, true).ok());
  }
  QemuIo({"write -P 0x55 3M 64k"});
  const std::string sha = ImageSha();
  auto s2 = Backup();
  ASSERT_FALSE(s2.is_null());
  EXPECT_NE(last_note_.find("older name"), std::string::npos) << last_note_;
  EXPECT_EQ(s2["read_bytes"].get<uint64_t>(), 4 * kMiB) << s2.dump();
  EXPECT_EQ(RestoreSha("vm1/vda/2"), sha);
  auto info = RunCommand({"qemu-img", "info", "--output=json", image_});
  EXPECT_EQ(info.out.find(old_name), std::string::npos) << "the old bitmap is still there";
  QemuIo({"write -P 0x56 7M 64k"});
  auto s3 = Backup();
  EXPECT_NE(last_note_.find("incremental"), std::string::npos) << last_note_;
  EXPECT_EQ(s3["read_bytes"].get<uint64_t>(), 64 * 1024u);
}

TEST_F(BackupImageTest, InconsistentBitmapAfterCrashedWriterFallsBackToFullRead) {
  MakeImage(32 * kMiB, 8 * kMiB, 3);
  Backup();
  // A writer opens the image (which marks the persistent bitmap in-use),
  // writes, and crashes without closing it.
  auto w =
      RunCommand({"qemu-io", "-f", "qcow2", "-c", "write -P 0x55 5M 64k", "-c", "abort", image_});
  ASSERT_EQ(w.exit_code, 128 + SIGABRT) << w.err;
  auto info = RunCommand({"qemu-img", "info", "--output=json", image_});
  ASSERT_NE(info.out.find("in-use"), std::string::npos) << info.out;
  std::string sha = ImageSha();
  auto s2 = Backup();
  EXPECT_NE(last_note_.find("inconsistent"), std::string::npos) << last_note_;
  EXPECT_EQ(s2["read_bytes"].get<uint64_t>(), 8 * kMiB);
  EXPECT_EQ(RestoreSha("vm1/vda/2"), sha);
  QemuIo({"write -P 0x46 6M 64k"});
  auto s3 = Backup();
  EXPECT_NE(last_note_.find("incremental"), std::string::npos) << last_note_;
  EXPECT_EQ(s3["read_bytes"].get<uint64_t>(), 64u * 1024);
  ExpectCheckClean();
}

TEST_F(BackupImageTest, RawImageIsReadFullyEveryTimeAndDedupedAtBlockLevel) {
  std::string raw = dir_.Sub("disk.raw");
  {
    std::ofstream out(raw, std::ios::binary);
    std::string bytes = RandomBytes(6 * kMiB, 4);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  ASSERT_EQ(truncate(raw.c_str(), 16 * kMiB), 0);
  auto r1 =
      Vmdedup({"backup", "-r", repo_, "--vm", "raw", "--json", "--format", "raw", "file:" + raw});
  ASSERT_EQ(r1.exit_code, 0) << r1.err;
  EXPECT_NE(r1.err.find("full: raw images have no dirty bitmap"), std::string::npos) << r1.err;
  {
    std::fstream f(raw, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(1 * kMiB);
    std::string bytes = RandomBytes(8192, 5);
    f.write(bytes.data(), 8192);
  }
  auto r2 = Vmdedup({"backup", "-r", repo_, "--vm", "raw", "--json", "file:" + raw});
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  auto s2 = nlohmann::json::parse(r2.out);
  EXPECT_EQ(s2["disk"].get<std::string>(), "disk0");
  EXPECT_EQ(s2["new"].get<uint64_t>(), 8192u);
  EXPECT_EQ(s2["block"].get<uint64_t>(), 6 * kMiB - 8192);
  EXPECT_EQ(RestoreSha("raw/disk0/2"), FileSha256(raw));
  ExpectCheckClean();
}

// A guest owns every byte of its raw disk: it can write a qcow2 header
// there whose backing file names any host file. vmdedup never probes a
// format, so such a disk is backed up as the raw bytes it holds, never as
// the host file, and nothing is written into it.
TEST_F(BackupImageTest, AGuestWrittenQcow2HeaderInARawDiskIsNeverFollowed) {
  const std::string secret = dir_.Sub("host-secret.raw");
  {
    std::ofstream out(secret, std::ios::binary);
    out << std::string(1 * kMiB, 'S');
  }
  // The guest's disk: a qcow2 header naming the host file, then its data.
  const std::string header = dir_.Sub("header.qcow2");
  ASSERT_EQ(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw",
                        header, "8M"})
                .exit_code,
            0);
  const std::string disk = dir_.Sub("guest.raw");
  {
    std::string bytes = ReadFileBytes(header);
    bytes += RandomBytes(2 * kMiB, 31);
    bytes.resize(8 * kMiB, '\0');
    WriteFileBytes(disk, bytes);
  }
  const std::string disk_sha = FileSha256(disk);

  // Without a format: refused, saying how to name one.
  auto r = Vmdedup({"backup", "-r", repo_, "--vm", "g", "--disk", "vda", "file:" + disk});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("raw:PATH or qcow2:PATH"), std::string::npos) << r.err;
  // Named qcow2 by mistake: its backing file is not followed.
  r = Vmdedup({"backup", "-r", repo_, "--vm", "g", "--disk", "vda", "qcow2:" + disk});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--backing-chain"), std::string::npos) << r.err;
  EXPECT_EQ(FileSha256(disk), disk_sha);
  // As what it is: raw. The snapshot holds the disk's bytes, header and all.
  r = Vmdedup({"backup", "-r", repo_, "--vm", "g", "--disk", "vda", "--json", "raw:" + disk});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["source_format"], "raw");
  EXPECT_EQ(FileSha256(disk), disk_sha) << "vmdedup wrote into the guest's raw disk";
  // The next file: backup of the series takes the format it recorded.
  r = Vmdedup({"backup", "-r", repo_, "--vm", "g", "--disk", "vda", "--json", "file:" + disk});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["source_format"], "raw");
  for (const char* snap : {"g/vda/1", "g/vda/2"}) {
    const std::string out = dir_.Sub("restored.raw");
    auto rs = Vmdedup({"restore", "-r", repo_, snap, "--to", out, "--force"});
    ASSERT_EQ(rs.exit_code, 0) << rs.err;
    EXPECT_EQ(FileSha256(out), disk_sha) << snap;
  }
  // --format and a format prefix that disagree, --format on an NBD URI.
  r = Vmdedup(
      {"backup", "-r", repo_, "--vm", "g", "--disk", "vda", "--format", "qcow2", "raw:" + disk});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = Vmdedup(
      {"backup", "-r", repo_, "--vm", "g", "--disk", "vda", "--format", "vmdk", "file:" + disk});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("raw and qcow2"), std::string::npos) << r.err;
}

// A qcow2 image with a backing file is read through its chain only when
// asked to, and only when the chain records its formats.
TEST_F(BackupImageTest, ABackingChainIsReadOnlyWithBackingChain) {
  const std::string base = dir_.Sub("base.qcow2");
  MakeImage(8 * kMiB, 3 * kMiB, 41);
  ASSERT_EQ(RunCommand({"mv", image_, base}).exit_code, 0);
  ASSERT_EQ(
      RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", image_})
          .exit_code,
      0);
  QemuIo({"write -P 0x3c 1M 64k"});
  auto r = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "qcow2:" + image_});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("base.qcow2"), std::string::npos) << r.err;
  auto snap = Backup({"--backing-chain"});
  ASSERT_FALSE(snap.is_null());
  EXPECT_EQ(RestoreSha("vm1/vda/1"), ImageSha());
  // A chain that leaves a backing format unrecorded (as an image made by an
  // older QEMU may: QEMU 7.2 no longer makes one, so its header extension
  // is renamed here) is refused.
  const std::string loose = dir_.Sub("loose.qcow2");
  ASSERT_EQ(
      RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", loose})
          .exit_code,
      0);
  {
    std::string bytes = ReadFileBytes(loose);
    const size_t at = bytes.find("\xe2\x79\x2a\xca");  // the backing format extension
    ASSERT_NE(at, std::string::npos);
    bytes.replace(at, 4, "\x12\x34\x56\x78");  // an extension qemu ignores
    ASSERT_TRUE(WriteFileBytes(loose, bytes));
  }
  auto info = RunCommand({"qemu-img", "info", "-f", "qcow2", "--output=json", loose});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  ASSERT_EQ(info.out.find("backing-filename-format"), std::string::npos) << info.out;
  r = Vmdedup(
      {"backup", "-r", repo_, "--vm", "vm2", "--disk", "vda", "--backing-chain", "qcow2:" + loose});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("format"), std::string::npos) << r.err;
}

TEST_F(BackupImageTest, QcowRestoreMatchesOriginal) {
  MakeImage(16 * kMiB, 4 * kMiB, 6);
  Backup();
  std::string out = dir_.Sub("restored.qcow2");
  auto r = Vmdedup({"restore", "-r", repo_, "vm1/vda/1", "--to", out, "--format", "qcow2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto cmp = RunCommand({"qemu-img", "compare", image_, out});
  EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;
}

TEST_F(BackupImageTest, BadInputGivesClearErrors) {
  MakeImage(8 * kMiB, 1 * kMiB, 7);
  // Missing image: names the file.
  auto r = Vmdedup({"backup", "-r", repo_, "--vm", "x", "qcow2:" + dir_.Sub("nope.qcow2")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("nope.qcow2"), std::string::npos) << r.err;
  // Not a repository.
  r = Vmdedup({"snapshots", "-r", dir_.Sub("norepo")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("vmdedup init"), std::string::npos) << r.err;
  // Bad VM name.
  r = Vmdedup({"backup", "-r", repo_, "--vm", "a/b", "qcow2:" + image_});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("may only contain"), std::string::npos) << r.err;
  // Unknown source kind.
  r = Vmdedup({"backup", "-r", repo_, "--vm", "x", "ftp://host/x"});
  EXPECT_EQ(r.exit_code, 2);
  // Unknown priority: names the value and the choices, and records nothing.
  r = Vmdedup({"backup", "-r", repo_, "--vm", "x", "--priority", "high", "qcow2:" + image_});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("normal, low or idle, got 'high'"), std::string::npos) << r.err;
  r = Vmdedup({"snapshots", "-r", repo_, "--vm", "x"});
  EXPECT_EQ(r.out.find("x/"), std::string::npos) << r.out;
  // Unknown snapshot.
  Backup();
  r = Vmdedup({"restore", "-r", repo_, "vm1/vda/9", "--to", dir_.Sub("o.raw")});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("vm1/vda/9 does not exist"), std::string::npos) << r.err;
  // Refuses to overwrite without --force, and leaves the file alone.
  std::string existing = dir_.Sub("existing.raw");
  { std::ofstream(existing) << "keep me"; }
  r = Vmdedup({"restore", "-r", repo_, "vm1/vda/1", "--to", existing});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--force"), std::string::npos) << r.err;
  std::ifstream in(existing);
  std::string content;
  std::getline(in, content);
  EXPECT_EQ(content, "keep me");
  // Truncated image file.
  std::string broken = dir_.Sub("broken.qcow2");
  ASSERT_EQ(RunCommand({"cp", image_, broken}).exit_code, 0);
  ASSERT_EQ(truncate(broken.c_str(), 1000), 0);
  r = Vmdedup({"backup", "-r", repo_, "--vm", "x", "qcow2:" + broken});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("broken.qcow2"), std::string::npos) << r.err;
}

TEST_F(BackupImageTest, SecondBackupOfSameVmIsRefusedByTheLock) {
  MakeImage(8 * kMiB, 1 * kMiB, 8);
  Backup();
  // Hold the VM's lock the way a running backup does (flock is per open file,
  // so this process holding it blocks the vmdedup child).
  std::string lock = repo_ + "/vms/vm1/lock";
  int fd = open(lock.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(flock(fd, LOCK_EX), 0);
  auto r = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "qcow2:" + image_});
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_NE(r.err.find("locked"), std::string::npos) << r.err;
  // Readers are not blocked by the backup lock itself.
  EXPECT_EQ(Vmdedup({"snapshots", "-r", repo_}).exit_code, 0);
  close(fd);
  auto again = Backup();
  EXPECT_EQ(again["seq"].get<uint64_t>(), 2u);
  ExpectCheckClean();
}

TEST_F(BackupImageTest, CorruptedContainerByteIsReportedNamingObjectAndSnapshots) {
  MakeImage(16 * kMiB, 4 * kMiB, 10);
  std::string sha1 = ImageSha();
  Backup();
  QemuIo({"write -P 0x61 10M 64k"});
  std::string sha2 = ImageSha();
  Backup();
  // Snapshot 2 wrote one small container of its own; snapshot 1's data is in
  // the first. Flip one byte in the middle of the first container.
  auto list = RunShell("ls " + repo_ + "/vms/vm1/data/ | sort | head -1");
  ASSERT_EQ(list.exit_code, 0);
  std::string name = list.out.substr(0, list.out.find('\n'));
  std::string path = repo_ + "/vms/vm1/data/" + name;
  {
    std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
    f.seekg(0, std::ios::end);
    auto size = static_cast<std::streamoff>(f.tellg());
    f.seekg(size / 2);
    char c;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x40);
    f.seekp(size / 2);
    f.write(&c, 1);
  }
  // The metadata check does not read data; --read-data finds it and names
  // the object and both snapshots (snapshot 2 shares the unchanged blocks).
  EXPECT_EQ(Vmdedup({"check", "-r", repo_}).exit_code, 0);
  auto r = Vmdedup({"check", "-r", repo_, "--read-data", "--json"});
  EXPECT_EQ(r.exit_code, 3) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_FALSE(j["ok"].get<bool>());
  EXPECT_EQ(j["damaged_snapshots"], nlohmann::json({"vm1/vda/1", "vm1/vda/2"})) << r.out;
  EXPECT_NE(r.out.find(name), std::string::npos) << r.out;
  // A restore fails with a Corruption error naming the object, never writes
  // wrong data, and leaves no output file behind.
  std::string out = dir_.Sub("bad.raw");
  r = Vmdedup({"restore", "-r", repo_, "vm1/vda/1", "--to", out});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("Corruption"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(name), std::string::npos) << r.err;
  EXPECT_NE(access(out.c_str(), F_OK), 0);
  EXPECT_NE(access((out + ".partial").c_str(), F_OK), 0);
  (void)sha1;
  (void)sha2;
}

// One damaged snapshot record: check names that snapshot, still re-hashes
// the data it used, and reports none of it as reclaimable (a later clean-up
// would otherwise delete the only copy of what the snapshot held).
TEST_F(BackupImageTest, DamagedSnapshotRecordKeepsItsDataOutOfTheReclaimable) {
  MakeImage(16 * kMiB, 4 * kMiB, 12);
  Backup();
  // Snapshot 2 overwrites all of snapshot 1's data: snapshot 1's container
  // is used by snapshot 1 alone.
  QemuIo({"write -P 0x62 0 4M"});
  Backup();
  ASSERT_EQ(testing::DamageSnapshotRecord(repo_, "vm1", "vda", 1), "");
  auto r = Vmdedup({"check", "-r", repo_, "--read-data", "--json"});
  EXPECT_EQ(r.exit_code, 3) << r.out << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["damaged_snapshots"], nlohmann::json({"vm1/vda/1"})) << r.out;
  EXPECT_EQ(j["reclaimable_bytes"].get<uint64_t>(), 0u) << r.out;
  bool withheld = false;
  for (const auto& f : j["findings"]) {
    EXPECT_NE(f["kind"], "reclaimable") << f.dump();
    if (f["kind"] == "skipped" &&
        f["message"].get<std::string>().find("not reported as reclaimable") != std::string::npos)
      withheld = f["bytes"].get<uint64_t>() > 0;
  }
  EXPECT_TRUE(withheld) << "snapshot 1's own container is not counted as withheld: " << r.out;
  // Every container was still read: snapshot 1's own as well as snapshot 2's.
  EXPECT_GE(j["blocks_verified"].get<uint64_t>(), 4 * kMiB / 16384) << r.out;
  EXPECT_EQ(j["containers"].get<uint64_t>(), 2u) << r.out;
  // The readable snapshot still restores.
  EXPECT_EQ(RestoreSha("vm1/vda/2"), ImageSha());
}

// Lost metadata is never recreated as new: with meta/CURRENT gone (or all
// of meta/), a backup refuses the VM, pointing to check, and touches none
// of its containers; check reports the VM as damaged.
TEST_F(BackupImageTest, LostMetadataIsNeverRecreatedOverTheContainers) {
  MakeImage(8 * kMiB, 2 * kMiB, 24);
  Backup();
  QemuIo({"write -P 0x21 1M 64k"});
  Backup();
  auto containers = [&] {
    std::map<std::string, std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(repo_ + "/vms/vm1/data"))
      out[e.path().filename().string()] = FileSha256(e.path().string());
    return out;
  };
  const auto before = containers();
  ASSERT_FALSE(before.empty());
  for (const std::string& lose : {std::string("meta/CURRENT"), std::string("meta")}) {
    SCOPED_TRACE("lost " + lose);
    std::filesystem::remove_all(repo_ + "/vms/vm1/" + lose);
    auto r = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "qcow2:" + image_});
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("no metadata store"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("vmdedup repair"), std::string::npos) << r.err;
    EXPECT_EQ(containers(), before);
    EXPECT_FALSE(std::filesystem::exists(repo_ + "/vms/vm1/meta/CURRENT"));
    auto c = Vmdedup({"check", "-r", repo_, "--json"});
    EXPECT_NE(c.exit_code, 0) << c.out;
    EXPECT_NE(c.out.find("no metadata store"), std::string::npos) << c.out;
  }
}

// Container ids are never handed out twice, even when the counter that
// hands them out went back (metadata restored from an older copy): the
// next backup starts above every id on disk and overwrites nothing.
TEST_F(BackupImageTest, ACounterThatWentBackNeverReusesAContainerId) {
  MakeImage(8 * kMiB, 2 * kMiB, 25);
  Backup();
  const std::string sha1 = ImageSha();
  {
    auto repo = Repository::Open(repo_);
    ASSERT_TRUE(repo.ok());
    auto vm = (*repo)->OpenVm("vm1", Repository::Access::kWrite);
    ASSERT_TRUE(vm.ok());
    WriteBatch b;
    b.Delete(CounterKey("container"));  // reads as 1 again
    ASSERT_TRUE((*vm)->meta()->Write(b, true).ok());
  }
  std::map<std::string, std::string> before;
  for (const auto& e : std::filesystem::directory_iterator(repo_ + "/vms/vm1/data"))
    before[e.path().filename().string()] = FileSha256(e.path().string());
  QemuIo({"write -P 0x31 1M 1M"});
  auto s2 = Backup();
  ASSERT_FALSE(s2.is_null());
  EXPECT_GT(s2["new"].get<uint64_t>(), 0u);
  for (const auto& [name, sha] : before)
    EXPECT_EQ(FileSha256(repo_ + "/vms/vm1/data/" + name), sha) << name << " was overwritten";
  EXPECT_EQ(RestoreSha("vm1/vda/1"), sha1);
  EXPECT_EQ(RestoreSha("vm1/vda/2"), ImageSha());
  ExpectCheckClean();
}

// A backup never references a container that is missing, truncated or
// that check found damaged: the segments of the parent that use it are read
// again (even where no bit is dirty) and stored afresh, so the new snapshot
// restores, and one line says so.
TEST_F(BackupImageTest, ABackupNeverReferencesAMissingTruncatedOrDamagedContainer) {
  struct Damage {
    const char* what;
    std::function<void(const std::string& container)> apply;
    bool needs_check;  // only re-reading finds it
  };
  const std::vector<Damage> damages = {
      {"deleted", [](const std::string& c) { ASSERT_EQ(unlink(c.c_str()), 0); }, false},
      {"truncated", [](const std::string& c) { ASSERT_EQ(truncate(c.c_str(), 4096), 0); }, false},
      {"flipped",
       [](const std::string& c) {
         std::fstream f(c, std::ios::in | std::ios::out | std::ios::binary);
         f.seekp(100000);
         f.write("\x5a\xa5\x5a\xa5", 4);
       },
       true},
  };
  for (const Damage& d : damages) {
    SCOPED_TRACE(d.what);
    std::filesystem::remove_all(repo_);
    ASSERT_EQ(Vmdedup({"init", repo_, "--chunker", chunker_}).exit_code, 0);
    MakeImage(8 * kMiB, 3 * kMiB, 26);
    Backup();
    std::string container;
    for (const auto& e : std::filesystem::directory_iterator(repo_ + "/vms/vm1/data"))
      container = e.path().string();
    ASSERT_FALSE(container.empty());
    d.apply(container);
    if (d.needs_check) {
      auto c = Vmdedup({"check", "-r", repo_, "--read-data", "--json"});
      EXPECT_EQ(c.exit_code, 3) << c.out;
      EXPECT_EQ(nlohmann::json::parse(c.out)["quarantined"], 1) << c.out;
    }
    // An incremental that writes elsewhere: level 1 would reuse every
    // damaged segment unread.
    QemuIo({"write -P 0x66 6M 64k"});
    const std::string sha = ImageSha();
    auto s2 = Backup();
    ASSERT_FALSE(s2.is_null());
    EXPECT_NE(last_note_.find("missing, damaged or quarantined"), std::string::npos) << last_note_;
    EXPECT_GE(s2["new"].get<uint64_t>(), 3 * kMiB) << s2.dump();
    EXPECT_EQ(RestoreSha("vm1/vda/2"), sha);
    // The snapshot after it needs nothing of the damaged one.
    auto s3 = Backup();
    ASSERT_FALSE(s3.is_null());
    EXPECT_EQ(last_note_.find("quarantined"), std::string::npos) << last_note_;
    EXPECT_EQ(RestoreSha("vm1/vda/3"), sha);
  }
}

TEST_F(BackupImageTest, CorruptedMetadataIsCorruptionNotACrash) {
  MakeImage(8 * kMiB, 2 * kMiB, 11);
  Backup();
  // Damage every LevelDB table and log file of the VM in the middle.
  auto r = RunShell("for f in " + repo_ + "/vms/vm1/meta/*.log " + repo_ +
                    "/vms/vm1/meta/*.ldb; do [ -f \"$f\" ] || continue; "
                    "s=$(stat -c %s \"$f\"); "
                    "printf '\\377\\377\\377\\377' | dd of=\"$f\" bs=1 seek=$((s/2)) conv=notrunc "
                    "status=none; done");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto c = Vmdedup({"check", "-r", repo_, "--json"});
  auto l = Vmdedup({"snapshots", "-r", repo_});
  auto o = Vmdedup({"restore", "-r", repo_, "vm1/vda/1", "--to", dir_.Sub("x.raw")});
  // LevelDB (paranoid checks) refuses the damaged log: a Corruption error
  // naming the VM's metadata, never a crash or wrong data.
  EXPECT_EQ(c.exit_code, 3) << c.out << c.err;
  EXPECT_NE(c.out.find("Corruption"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("metadata of VM 'vm1'"), std::string::npos) << c.out;
  for (const auto* res : {&l, &o}) {
    EXPECT_EQ(res->exit_code, 1) << res->err;
    EXPECT_NE(res->err.find("Corruption"), std::string::npos) << res->err;
  }
  EXPECT_NE(access(dir_.Sub("x.raw").c_str(), F_OK), 0);
}

TEST_F(BackupImageTest, NbdServerGoneMidBackupFailsCleanly) {
  MakeImage(64 * kMiB, 48 * kMiB, 12);
  Backup();
  std::string raw = dir_.Sub("src.raw");
  ASSERT_EQ(RunCommand({"qemu-img", "convert", "-O", "raw", image_, raw}).exit_code, 0);
  // A server that serves every read slowly (0.3 s, one request at a time),
  // killed once two reads have started: vmdedup is then mid-backup, whatever
  // the machine's speed, because the 48 MiB of data need more than two reads
  // (at most 4 MiB each).
  SlowNbdServer server(raw, 64 * kMiB, "0.3", dir_.Sub("slow.sock"), dir_.Sub("reads"));
  ASSERT_TRUE(server.Listening());
  std::atomic<bool> killed{false};
  std::thread killer([&] {
    server.WaitForReads(2, 60000);
    killed = server.Kill(SIGKILL);
  });
  auto r = Vmdedup(
      {"backup", "-r", repo_, "--vm", "vm1", "--disk", "nbd", "--threads", "1", server.Uri()});
  killer.join();
  ASSERT_TRUE(killed);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("IOError"), std::string::npos) << r.err;
  auto l = Vmdedup({"snapshots", "-r", repo_, "--disk", "nbd", "--vm", "vm1", "--json"});
  EXPECT_EQ(l.out, "");  // nothing recorded for the failed series
  ExpectCheckClean();
  // The repository is usable: the next backup works.
  Backup();
}

TEST_F(BackupImageTest, AFailedFirstBackupLeavesNoVmInStatsOrSnapshots) {
  MakeImage(8 * kMiB, 1 * kMiB, 13);
  Backup();
  auto r = Vmdedup({"backup", "-r", repo_, "--vm", "ghost", "--disk", "vda",
                    "nbd+unix:///?socket=" + dir_.Sub("nobody-listens.sock")});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  r = Vmdedup({"stats", "-r", repo_, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["vms"].size(), 1u) << r.out;
  EXPECT_EQ(j["vms"][0]["vm"], "vm1");
  r = Vmdedup({"stats", "-r", repo_});
  EXPECT_EQ(r.out.find("ghost"), std::string::npos) << r.out;
  r = Vmdedup({"snapshots", "-r", repo_});
  EXPECT_EQ(r.out.find("ghost"), std::string::npos) << r.out;
  ExpectCheckClean();
}

class BackupImageCdcTest : public BackupImageTest {
 protected:
  BackupImageCdcTest() { chunker_ = "cdc"; }
};

TEST_F(BackupImageCdcTest, IncrementalWithContentDefinedBlocks) {
  MakeImage(32 * kMiB, 16 * kMiB, 9);
  std::vector<std::string> shas = {ImageSha()};
  auto s1 = Backup();
  EXPECT_EQ(s1["chunker"].get<std::string>(), "cdc");
  QemuIo({"write -P 0x51 3M 64k", "write -P 0x52 9M 64k"});
  shas.push_back(ImageSha());
  auto s2 = Backup();
  // Rebuilt ranges grow to the parent's block boundaries: at most one
  // maximum-size block (16 KiB) on each side of each dirty extent.
  uint64_t read = s2["read_bytes"].get<uint64_t>();
  EXPECT_GE(read, 128u * 1024);
  EXPECT_LE(read, 128u * 1024 + 4 * 16384);
  EXPECT_LE(s2["new"].get<uint64_t>(), read);
  EXPECT_EQ(RestoreSha("vm1/vda/1"), shas[0]);
  EXPECT_EQ(RestoreSha("vm1/vda/2"), shas[1]);
  ExpectCheckClean();
}

}  // namespace
}  // namespace vmdedup::testing
