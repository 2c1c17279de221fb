// RunProcess (base/subprocess.h) and the qemu-img based image inspection and
// persistent bitmap operations (dirty-bitmap/image_bitmaps.h), with real
// qemu-img, qemu-io and qemu-nbd. Bitmap contents are checked independently
// of vmdedup's NBD client, with nbdinfo --map.
#include "dirty-bitmap/image_bitmaps.h"
#include "engine/series_bitmaps.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "base/subprocess.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace vmdedup {
namespace {

using testing::RunCommand;
using testing::ScratchDir;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

// ---------------------------------------------------------------- RunProcess

TEST(RunProcessTest, CapturesOutputAndExitStatus) {
  auto r = RunProcess({"sh", "-c", "echo out; echo err >&2; exit 3"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->out, "out\n");
  EXPECT_EQ(r->err, "err\n");
  EXPECT_EQ(r->exit_code, 3);
  EXPECT_EQ(r->term_signal, 0);
  EXPECT_FALSE(r->success());

  r = RunProcess({"true"});
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->success());
}

TEST(RunProcessTest, NoShellInterpretation) {
  auto r = RunProcess({"echo", "$HOME; `id` * 'x'"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->out, "$HOME; `id` * 'x'\n");
}

TEST(RunProcessTest, KilledBySignal) {
  auto r = RunProcess({"sh", "-c", "kill -9 $$"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->term_signal, SIGKILL);
  EXPECT_EQ(r->exit_code, 128 + SIGKILL);
  EXPECT_FALSE(r->success());
  EXPECT_EQ(r->ErrorSummary(), "killed by signal 9");
}

TEST(RunProcessTest, LargeOutputOnBothPipes) {
  // More than a pipe buffer on each: the child must never block on one while
  // the parent waits on the other.
  auto r = RunProcess(
      {"sh", "-c", "head -c 3000000 /dev/zero >&2; head -c 5000000 /dev/zero; echo x >&2"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->out.size(), 5000000u);
  EXPECT_EQ(r->err.size(), 3000002u);
  EXPECT_TRUE(r->success());
}

TEST(RunProcessTest, StdinIsEmpty) {
  auto r = RunProcess({"cat"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->out, "");
  EXPECT_TRUE(r->success());
}

TEST(RunProcessTest, MissingProgram) {
  auto r = RunProcess({"vmdedup-no-such-program", "x"});
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("vmdedup-no-such-program"), std::string::npos);
  r = RunProcess({"/nonexistent/bin/tool"});
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().ToString();
  EXPECT_EQ(ProgramNotFound("qemu-img").message(), "qemu-img not found: install qemu-utils");
  EXPECT_TRUE(RunProcess({}).status().IsInvalidArgument());
  EXPECT_FALSE(FindProgram("vmdedup-no-such-program"));
  EXPECT_TRUE(FindProgram("sh"));
}

TEST(RunProcessTest, NotExecutable) {
  ScratchDir dir;
  std::string script = dir.Sub("script");
  std::ofstream(script) << "#!/bin/sh\necho hi\n";
  // Not executable: not a program.
  EXPECT_TRUE(RunProcess({script}).status().IsNotFound());
  chmod(script.c_str(), 0755);
  auto r = RunProcess({script});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->out, "hi\n");
}

TEST(RunProcessTest, Timeout) {
  ProcessOptions options;
  options.timeout_ms = 200;
  auto start = std::chrono::steady_clock::now();
  auto r = RunProcess({"sleep", "30"}, options);
  EXPECT_TRUE(r.status().IsIOError()) << r.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  // A child that closes its output but keeps running is killed too.
  start = std::chrono::steady_clock::now();
  r = RunProcess({"sh", "-c", "exec >&- 2>&-; sleep 30"}, options);
  EXPECT_TRUE(r.status().IsIOError()) << r.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(RunProcessTest, ErrorSummaryJoinsLines) {
  ProcessOutput out;
  out.exit_code = 1;
  out.err = "qemu-img: Could not open 'x': lock\n  Is another process using it?\n\n";
  EXPECT_EQ(out.ErrorSummary(), "qemu-img: Could not open 'x': lock Is another process using it?");
  out.err = "";
  EXPECT_EQ(out.ErrorSummary(), "exit status 1");
}

TEST(RunProcessTest, ManyThreadsAtOnce) {
  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int t = 0; t < 8; t++) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10; i++) {
        auto r = RunProcess({"sh", "-c", "echo $0", std::to_string(t * 100 + i)});
        if (r.ok() && r->out == std::to_string(t * 100 + i) + "\n") good++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(good.load(), 80);
}

// ------------------------------------------------------------ image bitmaps

// A server the test starts and stops by pid; dies with the test.
class Background {
 public:
  explicit Background(const std::vector<std::string>& argv) {
    pid_ = fork();
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      int devnull = open("/dev/null", O_RDWR);
      dup2(devnull, 0);
      dup2(devnull, 1);
      dup2(devnull, 2);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
  }
  ~Background() { Kill(SIGKILL); }
  void Kill(int sig) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

bool WaitForSocket(const std::string& path) {
  for (int i = 0; i < 1000; i++) {
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

void MustRun(const std::vector<std::string>& argv) {
  auto r = RunCommand(argv);
  ASSERT_EQ(r.exit_code, 0) << argv[0] << " " << (argv.size() > 1 ? argv[1] : "") << ": " << r.err;
}

// The dirty ranges of a bitmap, read with nbdinfo from a qemu-nbd that
// exports it: "offset+length" for each dirty extent.
std::vector<std::string> DirtyRanges(const std::string& img, const std::string& bitmap) {
  auto r = RunCommand({"nbdinfo", "--map=qemu:dirty-bitmap:" + bitmap, "--", "[", "qemu-nbd", "-r",
                       "-f", "qcow2", "-B", bitmap, img, "]"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> dirty;
  std::istringstream in(r.out);
  uint64_t offset, length, type;
  std::string rest;
  while (in >> offset >> length >> type && std::getline(in, rest)) {
    if (type & 1) dirty.push_back(std::to_string(offset) + "+" + std::to_string(length));
  }
  return dirty;
}

std::string R(uint64_t offset, uint64_t length) {
  return std::to_string(offset) + "+" + std::to_string(length);
}

const ImageBitmap* FindBitmap(const ImageInfo& info, const std::string& name) {
  for (const auto& b : info.bitmaps) {
    if (b.name == name) return &b;
  }
  return nullptr;
}

class ImageBitmapsTest : public ::testing::Test {
 protected:
  std::string NewQcow2(const std::string& name, const char* size = "16M") {
    std::string img = dir_.Sub(name);
    MustRun({"qemu-img", "create", "-q", "-f", "qcow2", img, size});
    return img;
  }
  ScratchDir dir_;
};

TEST_F(ImageBitmapsTest, InspectQcow2WithBitmaps) {
  std::string img = NewQcow2("a.qcow2", "32M");
  ASSERT_TRUE(AddBitmap(img, "b1", true).ok());
  ASSERT_TRUE(AddBitmap(img, "b2", false).ok());
  auto info = InspectImage(img, "qcow2");
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->path, img);
  EXPECT_EQ(info->format, "qcow2");
  EXPECT_EQ(info->virtual_size, 32 * MiB);
  ASSERT_EQ(info->bitmaps.size(), 2u);
  const ImageBitmap* b1 = FindBitmap(*info, "b1");
  const ImageBitmap* b2 = FindBitmap(*info, "b2");
  ASSERT_TRUE(b1 && b2);
  EXPECT_EQ(b1->granularity, 64 * KiB);
  EXPECT_TRUE(b1->enabled);
  EXPECT_FALSE(b1->in_use);
  EXPECT_EQ(b2->granularity, 64 * KiB);
  EXPECT_FALSE(b2->enabled);
  EXPECT_FALSE(b2->in_use);
}

TEST_F(ImageBitmapsTest, InspectRawAndBadFiles) {
  std::string raw = dir_.Sub("r.raw");
  MustRun({"truncate", "-s", "3M", raw});
  auto info = InspectImage(raw, "raw");
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->format, "raw");
  EXPECT_EQ(info->virtual_size, 3 * MiB);
  EXPECT_TRUE(info->bitmaps.empty());

  info = InspectImage(dir_.Sub("missing.qcow2"), "qcow2");
  EXPECT_TRUE(info.status().IsNotFound()) << info.status().ToString();
  EXPECT_NE(info.status().message().find(dir_.Sub("missing.qcow2")), std::string::npos);

  info = InspectImage(dir_.path(), "raw");
  EXPECT_TRUE(info.status().IsInvalidArgument()) << info.status().ToString();

  // A qcow2 magic with a garbage header: qemu-img's message is kept.
  std::string bad = dir_.Sub("bad.qcow2");
  std::ofstream(bad) << "QFI\xfb" << std::string(200, 'x');
  info = InspectImage(bad, "qcow2");
  EXPECT_TRUE(info.status().IsInvalidArgument()) << info.status().ToString();
  EXPECT_NE(info.status().message().find("qcow2"), std::string::npos) << info.status().ToString();

  // The format is the caller's, never probed: a raw file is not a qcow2
  // image, and a qcow2 image read as raw is its bytes.
  info = InspectImage(raw, "qcow2");
  EXPECT_TRUE(info.status().IsInvalidArgument()) << info.status().ToString();
  std::string img = NewQcow2("q.qcow2", "32M");
  info = InspectImage(img, "raw");
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->format, "raw");
  EXPECT_LT(info->virtual_size, 32 * MiB);
  EXPECT_TRUE(InspectSourceImage(img, "vmdk", false).status().IsInvalidArgument());
  EXPECT_TRUE(InspectSourceImage(img, "qcow2", false).ok());
  EXPECT_TRUE(InspectImage(img, "").status().IsInvalidArgument());
}

TEST_F(ImageBitmapsTest, RelativePathWithColon) {
  // "x:y.qcow2" would be a protocol prefix to qemu; it is a file here.
  std::string img = NewQcow2("x:y.qcow2");
  char old_cwd[4096];
  ASSERT_NE(getcwd(old_cwd, sizeof(old_cwd)), nullptr);
  ASSERT_EQ(chdir(dir_.path().c_str()), 0);
  Status add = AddBitmap("x:y.qcow2", "b", true);
  auto info = InspectImage("x:y.qcow2", "qcow2");
  ASSERT_EQ(chdir(old_cwd), 0);
  EXPECT_TRUE(add.ok()) << add.ToString();
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->format, "qcow2");
  EXPECT_EQ(info->bitmaps.size(), 1u);
}

TEST_F(ImageBitmapsTest, EnableDisableRemoveAndErrors) {
  std::string img = NewQcow2("a.qcow2");
  ASSERT_TRUE(AddBitmap(img, "b1", true).ok());
  ASSERT_TRUE(DisableBitmap(img, "b1").ok());
  EXPECT_FALSE(FindBitmap(*InspectImage(img, "qcow2"), "b1")->enabled);
  ASSERT_TRUE(EnableBitmap(img, "b1").ok());
  EXPECT_TRUE(FindBitmap(*InspectImage(img, "qcow2"), "b1")->enabled);

  Status st = AddBitmap(img, "b1", false);
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_NE(st.message().find("'b1'"), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find(img), std::string::npos) << st.ToString();

  for (Status s : {RemoveBitmap(img, "nope"), EnableBitmap(img, "nope"), DisableBitmap(img, "nope"),
                   MergeBitmap(img, "nope", "b1"), MergeBitmap(img, "b1", "nope")}) {
    EXPECT_TRUE(s.IsNotFound()) << s.ToString();
    EXPECT_NE(s.message().find("'nope'"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find(img), std::string::npos) << s.ToString();
  }
  EXPECT_TRUE(AddBitmap(img, "", true).IsInvalidArgument());
  EXPECT_TRUE(AddBitmap(dir_.Sub("missing.qcow2"), "b", true).IsNotFound());

  std::string raw = dir_.Sub("r.raw");
  MustRun({"truncate", "-s", "1M", raw});
  st = AddBitmap(raw, "b", true);
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();

  ASSERT_TRUE(RemoveBitmap(img, "b1").ok());
  EXPECT_TRUE(InspectImage(img, "qcow2")->bitmaps.empty());
  // A name that looks like an option.
  ASSERT_TRUE(AddBitmap(img, "-x", true).ok());
  EXPECT_TRUE(FindBitmap(*InspectImage(img, "qcow2"), "-x"));
  ASSERT_TRUE(RemoveBitmap(img, "-x").ok());
}

TEST_F(ImageBitmapsTest, EnabledBitmapRecordsQemuIoWritesAndMergeUnites) {
  std::string img = NewQcow2("a.qcow2");
  ASSERT_TRUE(AddBitmap(img, "b1", true).ok());
  MustRun({"qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 64k", "-c", "write 4M 100k", img});
  // qemu-io saved the bitmap when it closed the image.
  auto info = InspectImage(img, "qcow2");
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(FindBitmap(*info, "b1")->enabled);
  EXPECT_FALSE(FindBitmap(*info, "b1")->in_use);
  EXPECT_EQ(DirtyRanges(img, "b1"),
            (std::vector<std::string>{R(MiB, 64 * KiB), R(4 * MiB, 128 * KiB)}));

  // Rotation: freeze b1, record into b2 from now on.
  ASSERT_TRUE(AddBitmap(img, "b2", true).ok());
  ASSERT_TRUE(DisableBitmap(img, "b1").ok());
  MustRun({"qemu-io", "-f", "qcow2", "-c", "write 8M 4k", img});
  EXPECT_EQ(DirtyRanges(img, "b1"),
            (std::vector<std::string>{R(MiB, 64 * KiB), R(4 * MiB, 128 * KiB)}));
  EXPECT_EQ(DirtyRanges(img, "b2"), (std::vector<std::string>{R(8 * MiB, 64 * KiB)}));

  // Merge both into a new disabled bitmap: the union.
  ASSERT_TRUE(AddBitmap(img, "sum", false).ok());
  ASSERT_TRUE(MergeBitmap(img, "b1", "sum").ok());
  ASSERT_TRUE(MergeBitmap(img, "b2", "sum").ok());
  EXPECT_EQ(
      DirtyRanges(img, "sum"),
      (std::vector<std::string>{R(MiB, 64 * KiB), R(4 * MiB, 128 * KiB), R(8 * MiB, 64 * KiB)}));
  // A disabled bitmap records nothing.
  MustRun({"qemu-io", "-f", "qcow2", "-c", "write 12M 4k", img});
  EXPECT_EQ(DirtyRanges(img, "sum").size(), 3u);
  EXPECT_EQ(DirtyRanges(img, "b2").size(), 2u);
}

TEST_F(ImageBitmapsTest, ImageInUseIsBusy) {
  std::string img = NewQcow2("a.qcow2");
  ASSERT_TRUE(AddBitmap(img, "b1", true).ok());
  std::string sock = dir_.Sub("w.sock");
  Background writer({"qemu-nbd", "-f", "qcow2", "-k", sock, img});
  ASSERT_TRUE(WaitForSocket(sock));
  auto info = InspectImage(img, "qcow2");
  EXPECT_TRUE(info.status().IsBusy()) << info.status().ToString();
  EXPECT_NE(info.status().message().find(img), std::string::npos);
  EXPECT_NE(info.status().message().find("in use"), std::string::npos);
  Status st = AddBitmap(img, "b2", true);
  EXPECT_TRUE(st.IsBusy()) << st.ToString();
  st = DisableBitmap(img, "b1");
  EXPECT_TRUE(st.IsBusy()) << st.ToString();
  writer.Kill(SIGTERM);
  // Closed cleanly: usable again, and the bitmap is consistent.
  info = InspectImage(img, "qcow2");
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_FALSE(FindBitmap(*info, "b1")->in_use);
}

TEST_F(ImageBitmapsTest, ReadOnlyServerBlocksBitmapChangesButNotInspection) {
  std::string img = NewQcow2("a.qcow2");
  ASSERT_TRUE(AddBitmap(img, "b1", true).ok());
  std::string sock = dir_.Sub("r.sock");
  Background reader({"qemu-nbd", "--persistent", "-r", "-f", "qcow2", "-k", sock, img});
  ASSERT_TRUE(WaitForSocket(sock));
  auto info = InspectImage(img, "qcow2");
  EXPECT_TRUE(info.ok()) << info.status().ToString();
  Status st = DisableBitmap(img, "b1");
  EXPECT_TRUE(st.IsBusy()) << st.ToString();
  reader.Kill(SIGTERM);
  EXPECT_TRUE(DisableBitmap(img, "b1").ok());
}

TEST_F(ImageBitmapsTest, InconsistentBitmapAfterCrash) {
  std::string img = NewQcow2("a.qcow2");
  ASSERT_TRUE(AddBitmap(img, "b1", true).ok());
  {
    std::string sock = dir_.Sub("w.sock");
    Background writer({"qemu-nbd", "--persistent", "-f", "qcow2", "-k", sock, img});
    ASSERT_TRUE(WaitForSocket(sock));
    MustRun({"nbdinfo", "--size", "nbd+unix:///?socket=" + sock});
    writer.Kill(SIGKILL);
  }
  auto info = InspectImage(img, "qcow2");
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const ImageBitmap* b1 = FindBitmap(*info, "b1");
  ASSERT_TRUE(b1);
  EXPECT_TRUE(b1->in_use);
  EXPECT_TRUE(b1->enabled);

  ASSERT_TRUE(AddBitmap(img, "b2", false).ok());
  for (Status s :
       {DisableBitmap(img, "b1"), EnableBitmap(img, "b1"), MergeBitmap(img, "b1", "b2")}) {
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.message().find("'b1'"), std::string::npos) << s.ToString();
  }
  // Removing is the one thing left to do with it.
  ASSERT_TRUE(RemoveBitmap(img, "b1").ok());
  info = InspectImage(img, "qcow2");
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(FindBitmap(*info, "b1"));
}

// Series bitmap names (engine/series_bitmaps.h): two series whose VM and
// disk names run together get different prefixes, and only a name of the
// exact form PREFIX SEQ "." 8-hex-digit-nonce is taken as the series'.
TEST(SeriesBitmapsTest, NamesCannotCollideAndParseStrictly) {
  const std::string a = SeriesBitmapPrefix("0123456789abcdef", "a.b", "c");
  const std::string b = SeriesBitmapPrefix("0123456789abcdef", "a", "b.c");
  EXPECT_NE(a, b);
  EXPECT_NE(a, SeriesBitmapPrefix("fedcba9876543210", "a.b", "c"));
  EXPECT_EQ(a, SeriesBitmapPrefix("0123456789abcdef", "a.b", "c"));
  EXPECT_EQ(a.size(), std::string("vmdedup.").size() + 16 + 1);
  const std::string n1 = NewSeriesBitmapName(a, 7), n2 = NewSeriesBitmapName(a, 7);
  EXPECT_NE(n1, n2) << "the nonce tells two backups of the same seq apart";
  EXPECT_EQ(SeriesBitmapSeq(n1, a), 7u);
  EXPECT_FALSE(SeriesBitmapSeq(n1, b));
  for (const std::string& bad :
       {a, a + "7", a + "7.", a + "7.0123456", a + "7.012345678", a + "7.0123456g",
        a + "x.01234567", a + ".01234567", a + "7.0123456A", std::string("vmdedup.x.1")})
    EXPECT_FALSE(SeriesBitmapSeq(bad, a)) << bad;
  EXPECT_EQ(SeriesBitmapSeq(a + "9999999999999999999.00000000", a), 9999999999999999999ull);
  EXPECT_FALSE(SeriesBitmapSeq(a + "18446744073709551615.00000000", a)) << "20 digits";
}

}  // namespace
}  // namespace vmdedup
