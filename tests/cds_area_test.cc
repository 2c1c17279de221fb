// Unit tests of the CDS area (store/cds_area.h): the pointer, manifests and
// index parts round trip (an index of more than one part included), every
// damaged or truncated object is Corruption naming it, the index layout is
// the one docs/format.md gives, versions are numbered above leftovers,
// leftovers are listed, and WriteVersion refuses bad entries.
#include "store/cds_area.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>

#include "base/crc32c.h"
#include "base/encoding.h"
#include "store/container.h"
#include "tests/test_util.h"

namespace vmdedup {
namespace {

// Objects in memory, so that the damage tests can rewrite objects by the
// thousand without fsyncs. Follows the ObjectStore contract.
class MemoryObjectStore final : public ObjectStore {
 public:
  Status Put(const std::string& name, std::span<const uint8_t> data) override {
    std::lock_guard<std::mutex> l(mu_);
    objects_[name].assign(reinterpret_cast<const char*>(data.data()), data.size());
    return Status::OK();
  }
  Status Get(const std::string& name, std::string* out) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = objects_.find(name);
    if (it == objects_.end()) return Status::NotFound("object " + name);
    *out = it->second;
    return Status::OK();
  }
  Status GetRange(const std::string& name, uint64_t offset, uint64_t length,
                  std::string* out) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = objects_.find(name);
    if (it == objects_.end()) return Status::NotFound("object " + name);
    if (offset > it->second.size() || length > it->second.size() - offset)
      return Status::Corruption("object " + name + " truncated");
    *out = it->second.substr(offset, length);
    return Status::OK();
  }
  Result<uint64_t> Size(const std::string& name) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = objects_.find(name);
    if (it == objects_.end()) return Status::NotFound("object " + name);
    return static_cast<uint64_t>(it->second.size());
  }
  Status Delete(const std::string& name) override {
    std::lock_guard<std::mutex> l(mu_);
    objects_.erase(name);
    return Status::OK();
  }
  Status List(const std::string& prefix, std::vector<std::string>* names) override {
    std::lock_guard<std::mutex> l(mu_);
    names->clear();
    for (auto it = objects_.lower_bound(prefix);
         it != objects_.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it)
      names->push_back(it->first);
    return Status::OK();
  }
  std::string Describe() const override { return "memory"; }

 private:
  std::mutex mu_;
  std::map<std::string, std::string> objects_;
};

std::span<const uint8_t> AsBytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// A stand-in CDS container object of `size` bytes (WriteVersion only checks
// that the container exists and reaches the records).
void PutContainer(ObjectStore* objects, uint64_t id, size_t size = 1 << 20) {
  ASSERT_TRUE(objects->Put(CdsArea::ContainerObjectName(id), AsBytes(std::string(size, 'c'))).ok());
}

// `n` entries with distinct random fingerprints, sorted, spread over the
// containers of version 1 numbered 0 .. containers-1.
std::vector<CdsEntry> MakeEntries(size_t n, uint64_t seed, uint32_t containers = 3) {
  std::mt19937_64 rng(seed);
  std::vector<CdsEntry> out(n);
  for (size_t i = 0; i < n; i++) {
    CdsEntry& e = out[i];
    for (size_t k = 0; k < 32; k += 8) {
      uint64_t r = rng();
      std::memcpy(e.fingerprint.bytes.data() + k, &r, 8);
    }
    e.length = 4096 + static_cast<uint32_t>(i % 7);
    e.container = CdsArea::ContainerId(1, static_cast<uint32_t>(i % containers));
    e.offset = 32 + static_cast<uint32_t>((i % 100) * 100);
    e.record_len = 48 + static_cast<uint32_t>(i % 4000);
  }
  std::sort(out.begin(), out.end(),
            [](const CdsEntry& a, const CdsEntry& b) { return a.fingerprint < b.fingerprint; });
  out.erase(std::unique(out.begin(), out.end(),
                        [](const CdsEntry& a, const CdsEntry& b) {
                          return a.fingerprint == b.fingerprint;
                        }),
            out.end());
  return out;
}

// `n` entries in fingerprint order without sorting (cheap for a million):
// the first 8 bytes count up, big-endian, the rest is random.
std::vector<CdsEntry> MakeSortedEntries(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<CdsEntry> out(n);
  const uint64_t step = ~uint64_t{0} / (n + 1);
  for (size_t i = 0; i < n; i++) {
    CdsEntry& e = out[i];
    uint64_t prefix = (i + 1) * step;
    for (int k = 0; k < 8; k++)
      e.fingerprint.bytes[k] = static_cast<uint8_t>(prefix >> (56 - 8 * k));
    for (size_t k = 8; k < 32; k += 8) {
      uint64_t r = rng();
      std::memcpy(e.fingerprint.bytes.data() + k, &r, 8);
    }
    e.length = 4096;
    e.container = CdsArea::ContainerId(1, static_cast<uint32_t>(i % 3));
    e.offset = 32;
    e.record_len = 48 + static_cast<uint32_t>(i % 4000);
  }
  return out;
}

bool SameEntry(const CdsEntry& a, const CdsEntry& b) {
  return a.fingerprint == b.fingerprint && a.length == b.length && a.container == b.container &&
         a.offset == b.offset && a.record_len == b.record_len;
}

// An index part encoded independently of the library, straight from
// docs/format.md ("Index parts").
std::string EncodeIndexPartPerSpec(uint64_t version, uint32_t part,
                                   const std::vector<CdsEntry>& entries) {
  auto masked = [](const std::string& s) {
    return crc32c::Mask(crc32c::Value(s.data(), s.size()));
  };
  ByteWriter w;
  w.Bytes("VMDDCDSI", 8);
  w.U32(1);
  w.U32(part);
  w.U64(version);
  w.U32(static_cast<uint32_t>(entries.size()));
  w.U32(masked(w.buffer()));
  for (const CdsEntry& e : entries) {
    ByteWriter x;
    x.Bytes(e.fingerprint.bytes.data(), 32);
    x.U32(e.length);
    x.U64(e.container);
    x.U32(e.offset);
    x.U32(e.record_len);
    x.U32(masked(x.buffer()));
    w.Bytes(x.buffer().data(), x.size());
  }
  w.U32(masked(w.buffer()));
  return w.Take();
}

CdsVersionInfo Info(uint64_t version) {
  CdsVersionInfo info;
  info.version = version;
  info.created = 1764000000 + static_cast<int64_t>(version);
  info.chunker = "cdc 4096/1024/16384";
  info.selection = "fraction 1%";
  info.seeds = {"file:/images/debian-12.qcow2", "nbd://host/ubuntu"};
  return info;
}

class CdsAreaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (uint32_t c = 0; c < 3; c++) PutContainer(&objects_, CdsArea::ContainerId(1, c));
  }
  // Writes `version` over `entries` and returns its filled-in info.
  CdsVersionInfo Write(uint64_t version, const std::vector<CdsEntry>& entries) {
    CdsVersionInfo info = Info(version);
    Status st = area_.WriteVersion(&info, entries);
    EXPECT_TRUE(st.ok()) << st.ToString();
    return info;
  }
  std::string Object(const std::string& name) {
    std::string data;
    EXPECT_TRUE(objects_.Get(name, &data).ok()) << name;
    return data;
  }

  MemoryObjectStore objects_;
  CdsArea area_{&objects_};
};

TEST_F(CdsAreaTest, NamesAndOffsets) {
  EXPECT_EQ(CdsArea::IndexObjectName(0x2a, 3), "cds/versions/000000000000002a/index-0003");
  EXPECT_EQ(CdsArea::ManifestObjectName(1), "cds/versions/0000000000000001/manifest");
  EXPECT_EQ(CdsArea::ContainerObjectName(CdsArea::ContainerId(2, 5)),
            "cds/data/0000000000200005.ctr");
  EXPECT_EQ(CdsArea::VersionOfContainer(CdsArea::ContainerId(7, (1 << 20) - 1)), 7u);
  EXPECT_EQ(CdsArea::IndexEntryOffset(0), 32u);
  EXPECT_EQ(CdsArea::IndexEntryOffset(kCdsEntriesPerIndexPart - 1),
            32u + uint64_t{kCdsEntriesPerIndexPart - 1} * 56);
}

TEST_F(CdsAreaTest, NoPointerMeansNoCds) {
  Result<CdsPointer> p = area_.ReadPointer();
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->current, 0u);
  EXPECT_TRUE(p->published.empty());
}

TEST_F(CdsAreaTest, VersionRoundTripAndPublish) {
  std::vector<CdsEntry> entries = MakeEntries(200, 1);
  CdsVersionInfo written = Write(1, entries);
  uint64_t raw = 0, stored = 0;
  for (const CdsEntry& e : entries) {
    raw += e.length;
    stored += e.record_len;
  }
  EXPECT_EQ(written.block_count, 200u);
  EXPECT_EQ(written.raw_bytes, raw);
  EXPECT_EQ(written.stored_bytes, stored);
  EXPECT_EQ(written.index_parts, 1u);
  EXPECT_EQ(written.containers,
            (std::vector<uint64_t>{CdsArea::ContainerId(1, 0), CdsArea::ContainerId(1, 1),
                                   CdsArea::ContainerId(1, 2)}));

  Result<CdsVersionInfo> m = area_.ReadManifest(1);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->version, 1u);
  EXPECT_EQ(m->created, written.created);
  EXPECT_EQ(m->block_count, 200u);
  EXPECT_EQ(m->raw_bytes, raw);
  EXPECT_EQ(m->stored_bytes, stored);
  EXPECT_EQ(m->index_parts, 1u);
  EXPECT_EQ(m->chunker, "cdc 4096/1024/16384");
  EXPECT_EQ(m->selection, "fraction 1%");
  EXPECT_EQ(m->seeds, written.seeds);
  EXPECT_EQ(m->containers, written.containers);
  // The manifest body is JSON inside the documented frame.
  std::string manifest = Object(CdsArea::ManifestObjectName(1));
  EXPECT_EQ(manifest.substr(0, 8), "VMDDCDSM");
  EXPECT_NE(manifest.find("\"format_version\": 1"), std::string::npos);

  std::vector<CdsEntry> back;
  ASSERT_TRUE(area_.ReadEntries(1, &back).ok());
  ASSERT_EQ(back.size(), entries.size());
  for (size_t i = 0; i < back.size(); i++) EXPECT_TRUE(SameEntry(back[i], entries[i])) << i;
  ASSERT_TRUE(area_.ReadIndexPart(1, 0, &back).ok());
  EXPECT_EQ(back.size(), entries.size());
  uint64_t seen = 0;
  ASSERT_TRUE(area_
                  .ScanEntries(*m,
                               [&](uint64_t i, const CdsEntry& e) {
                                 if (i == seen && SameEntry(e, entries[i])) seen++;
                               })
                  .ok());
  EXPECT_EQ(seen, entries.size());

  // The index object is byte for byte the documented layout, so one entry's
  // fingerprint can be read alone at IndexEntryOffset.
  std::string index = Object(CdsArea::IndexObjectName(1, 0));
  EXPECT_EQ(index, EncodeIndexPartPerSpec(1, 0, entries));
  std::string fp;
  ASSERT_TRUE(
      objects_.GetRange(CdsArea::IndexObjectName(1, 0), CdsArea::IndexEntryOffset(17), 32, &fp)
          .ok());
  EXPECT_EQ(0, std::memcmp(fp.data(), entries[17].fingerprint.bytes.data(), 32));

  // Publishing: current and the published list.
  ASSERT_TRUE(area_.Publish(1).ok());
  Result<CdsPointer> p = area_.ReadPointer();
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->current, 1u);
  EXPECT_EQ(p->published, (std::vector<uint64_t>{1}));
  PutContainer(&objects_, CdsArea::ContainerId(3, 0));
  std::vector<CdsEntry> v3 = MakeEntries(10, 2, 1);
  for (CdsEntry& e : v3) e.container = CdsArea::ContainerId(3, 0);
  Write(3, v3);
  ASSERT_TRUE(area_.Publish(3).ok());
  ASSERT_TRUE(area_.Publish(1).ok());  // back to an older version
  p = area_.ReadPointer();
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->current, 1u);
  EXPECT_EQ(p->published, (std::vector<uint64_t>{1, 3}));
}

TEST_F(CdsAreaTest, EmptyVersion) {
  CdsVersionInfo info = Write(1, {});
  EXPECT_EQ(info.index_parts, 0u);
  EXPECT_EQ(info.block_count, 0u);
  EXPECT_TRUE(info.containers.empty());
  std::vector<CdsEntry> back = MakeEntries(3, 1);
  ASSERT_TRUE(area_.ReadEntries(1, &back).ok());
  EXPECT_TRUE(back.empty());
  EXPECT_TRUE(area_.Publish(1).ok());
}

// More than one index part, at the real part size (1M entries, 56 MiB).
TEST_F(CdsAreaTest, SeveralIndexParts) {
  const size_t n = size_t{kCdsEntriesPerIndexPart} + 3;
  std::vector<CdsEntry> entries = MakeSortedEntries(n, 3);
  CdsVersionInfo info = Write(1, entries);
  EXPECT_EQ(info.index_parts, 2u);
  EXPECT_EQ(*objects_.Size(CdsArea::IndexObjectName(1, 0)), 36u + 56u * kCdsEntriesPerIndexPart);
  EXPECT_EQ(*objects_.Size(CdsArea::IndexObjectName(1, 1)), 36u + 56u * 3);

  std::vector<CdsEntry> back;
  ASSERT_TRUE(area_.ReadEntries(1, &back).ok());
  ASSERT_EQ(back.size(), n);
  EXPECT_TRUE(std::equal(back.begin(), back.end(), entries.begin(), SameEntry));
  ASSERT_TRUE(area_.ReadIndexPart(1, 1, &back).ok());
  ASSERT_EQ(back.size(), 3u);
  EXPECT_TRUE(SameEntry(back[0], entries[kCdsEntriesPerIndexPart]));
  std::string fp;
  ASSERT_TRUE(
      objects_.GetRange(CdsArea::IndexObjectName(1, 1), CdsArea::IndexEntryOffset(2), 32, &fp)
          .ok());
  EXPECT_EQ(0, std::memcmp(fp.data(), entries[n - 1].fingerprint.bytes.data(), 32));

  // Part 1 replaced by a well-formed part whose entries sort before the end
  // of part 0: the order across parts is checked.
  std::vector<CdsEntry> low(entries.begin() + kCdsEntriesPerIndexPart - 4,
                            entries.begin() + kCdsEntriesPerIndexPart - 1);
  for (size_t i = 0; i < low.size(); i++) {
    low[i].length = entries[kCdsEntriesPerIndexPart + i].length;
    low[i].record_len = entries[kCdsEntriesPerIndexPart + i].record_len;
  }
  ASSERT_TRUE(
      objects_.Put(CdsArea::IndexObjectName(1, 1), AsBytes(EncodeIndexPartPerSpec(1, 1, low)))
          .ok());
  ASSERT_TRUE(area_.ReadIndexPart(1, 1, &back).ok()) << "sorted within the part";
  Status st = area_.ReadEntries(1, &back);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("index-0001: entry 0"), std::string::npos) << st.ToString();
  EXPECT_TRUE(back.empty());

  // A short part that is not the last.
  std::vector<CdsEntry> first(entries.begin(), entries.begin() + 5);
  ASSERT_TRUE(
      objects_.Put(CdsArea::IndexObjectName(1, 0), AsBytes(EncodeIndexPartPerSpec(1, 0, first)))
          .ok());
  st = area_.ReadEntries(1, &back);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("index-0000"), std::string::npos) << st.ToString();
}

// Every single-byte change and every truncation of `name` makes `read` fail
// with Corruption whose message names the object.
void ExpectEveryDamageDetected(ObjectStore* objects, const std::string& name,
                               const std::function<Status()>& read) {
  std::string good;
  ASSERT_TRUE(objects->Get(name, &good).ok());
  ASSERT_TRUE(read().ok()) << "undamaged " << name;
  for (size_t i = 0; i < good.size(); i++) {
    for (uint8_t flip : {0x01, 0x80, 0xff}) {
      std::string bad = good;
      bad[i] = static_cast<char>(bad[i] ^ flip);
      ASSERT_TRUE(objects->Put(name, AsBytes(bad)).ok());
      Status st = read();
      EXPECT_TRUE(st.IsCorruption())
          << name << " byte " << i << " ^ " << int(flip) << ": " << st.ToString();
      EXPECT_NE(st.message().find(name), std::string::npos) << st.ToString();
    }
  }
  for (size_t n = 0; n < good.size(); n++) {
    ASSERT_TRUE(objects->Put(name, AsBytes(good.substr(0, n))).ok());
    Status st = read();
    EXPECT_TRUE(st.IsCorruption()) << name << " truncated to " << n << ": " << st.ToString();
    EXPECT_NE(st.message().find(name), std::string::npos) << st.ToString();
  }
  ASSERT_TRUE(objects->Put(name, AsBytes(good + "x")).ok());
  EXPECT_TRUE(read().IsCorruption()) << name << " with a byte appended";
  ASSERT_TRUE(objects->Put(name, AsBytes(good)).ok());
  ASSERT_TRUE(read().ok());
}

TEST_F(CdsAreaTest, EveryDamagedObjectIsCorruptionNamingIt) {
  std::vector<CdsEntry> entries = MakeEntries(4, 4);
  Write(1, entries);
  Write(2, entries);
  ASSERT_TRUE(area_.Publish(1).ok());
  ASSERT_TRUE(area_.Publish(2).ok());

  ExpectEveryDamageDetected(&objects_, CdsArea::kPointerObject,
                            [&] { return area_.ReadPointer().status(); });
  ExpectEveryDamageDetected(&objects_, CdsArea::ManifestObjectName(2),
                            [&] { return area_.ReadManifest(2).status(); });
  std::vector<CdsEntry> out;
  ExpectEveryDamageDetected(&objects_, CdsArea::IndexObjectName(2, 0),
                            [&] { return area_.ReadIndexPart(2, 0, &out); });
  ExpectEveryDamageDetected(&objects_, CdsArea::IndexObjectName(2, 0),
                            [&] { return area_.ReadEntries(2, &out); });
  // The other version's objects were never touched.
  EXPECT_TRUE(area_.ReadEntries(1, &out).ok());
  EXPECT_EQ(out.size(), 4u);
}

TEST_F(CdsAreaTest, DamagedEntryIsNamedByNumber) {
  std::vector<CdsEntry> entries = MakeEntries(5, 5);
  Write(1, entries);
  const std::string name = CdsArea::IndexObjectName(1, 0);
  std::vector<CdsEntry> out;
  // Well-formed checksums around fields that are wrong: each is Corruption
  // naming the object and the entry.
  auto expect_bad_entry_2 = [&](CdsEntry bad, const char* why) {
    std::vector<CdsEntry> e = entries;
    e[2] = bad;
    ASSERT_TRUE(objects_.Put(name, AsBytes(EncodeIndexPartPerSpec(1, 0, e))).ok());
    Status st = area_.ReadIndexPart(1, 0, &out);
    EXPECT_TRUE(st.IsCorruption()) << why << ": " << st.ToString();
    EXPECT_NE(st.message().find(name + ": entry 2"), std::string::npos)
        << why << ": " << st.ToString();
  };
  CdsEntry e = entries[2];
  e.length = 0;
  expect_bad_entry_2(e, "empty block");
  e = entries[2];
  e.length = kMaxBlockSize + 1;
  expect_bad_entry_2(e, "block too long");
  e = entries[2];
  e.record_len = 47;
  expect_bad_entry_2(e, "record shorter than its header");
  e = entries[2];
  e.offset = 31;
  expect_bad_entry_2(e, "record inside the container header");
  e = entries[2];
  e.container = CdsArea::ContainerId(2, 0);
  expect_bad_entry_2(e, "container of a later version");
  e = entries[2];
  e.fingerprint = entries[1].fingerprint;
  expect_bad_entry_2(e, "duplicate fingerprint");
  e = entries[2];
  e.fingerprint = entries[0].fingerprint;
  expect_bad_entry_2(e, "out of order");

  // A container the manifest does not list is caught by ReadEntries.
  PutContainer(&objects_, CdsArea::ContainerId(1, 9));
  e = entries[2];
  e.container = CdsArea::ContainerId(1, 9);
  std::vector<CdsEntry> with = entries;
  with[2] = e;
  ASSERT_TRUE(objects_.Put(name, AsBytes(EncodeIndexPartPerSpec(1, 0, with))).ok());
  EXPECT_TRUE(area_.ReadIndexPart(1, 0, &out).ok());
  Status st = area_.ReadEntries(1, &out);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find(name + ": entry 2"), std::string::npos) << st.ToString();

  // Entries that do not add up to the manifest.
  with = entries;
  with[3].length += 1;
  ASSERT_TRUE(objects_.Put(name, AsBytes(EncodeIndexPartPerSpec(1, 0, with))).ok());
  EXPECT_TRUE(area_.ReadEntries(1, &out).IsCorruption());
  with = entries;
  with.pop_back();
  ASSERT_TRUE(objects_.Put(name, AsBytes(EncodeIndexPartPerSpec(1, 0, with))).ok());
  EXPECT_TRUE(area_.ReadEntries(1, &out).IsCorruption());
  // The part of another version, or another part number, under this name.
  ASSERT_TRUE(objects_.Put(name, AsBytes(EncodeIndexPartPerSpec(2, 0, entries))).ok());
  EXPECT_TRUE(area_.ReadIndexPart(1, 0, &out).IsCorruption());
  ASSERT_TRUE(objects_.Put(name, AsBytes(EncodeIndexPartPerSpec(1, 1, entries))).ok());
  EXPECT_TRUE(area_.ReadIndexPart(1, 0, &out).IsCorruption());
}

TEST_F(CdsAreaTest, MissingObjectsAreNotFound) {
  std::vector<CdsEntry> out;
  EXPECT_TRUE(area_.ReadManifest(7).status().IsNotFound());
  EXPECT_TRUE(area_.ReadIndexPart(7, 0, &out).IsNotFound());
  EXPECT_TRUE(area_.ReadEntries(7, &out).IsNotFound());
  EXPECT_TRUE(area_.Publish(7).IsNotFound());
  Write(1, MakeEntries(5, 6));
  ASSERT_TRUE(objects_.Delete(CdsArea::IndexObjectName(1, 0)).ok());
  EXPECT_TRUE(area_.ReadEntries(1, &out).IsNotFound());
  EXPECT_FALSE(area_.Publish(1).ok()) << "a version whose index is gone is not published";
  Result<CdsPointer> p = area_.ReadPointer();
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->current, 0u);
}

TEST_F(CdsAreaTest, NextVersionIsAboveEverythingPresent) {
  Result<uint64_t> next = area_.NextVersion();
  ASSERT_TRUE(next.ok());
  // The containers put by SetUp carry version 1.
  EXPECT_EQ(*next, 2u);
  Write(1, MakeEntries(5, 7));
  ASSERT_TRUE(area_.Publish(1).ok());
  EXPECT_EQ(*area_.NextVersion(), 2u);
  // A crashed build left an index part of version 5.
  ASSERT_TRUE(objects_.Put(CdsArea::IndexObjectName(5, 0), AsBytes("partial")).ok());
  EXPECT_EQ(*area_.NextVersion(), 6u);
  // ... and another one a container of version 9, but nothing else.
  PutContainer(&objects_, CdsArea::ContainerId(9, 3), 100);
  EXPECT_EQ(*area_.NextVersion(), 10u);
  // Names that are not the area's do not count.
  ASSERT_TRUE(objects_.Put("cds/data/notes.txt", AsBytes("x")).ok());
  ASSERT_TRUE(objects_.Put("cds/versions/zzzz/manifest", AsBytes("x")).ok());
  EXPECT_EQ(*area_.NextVersion(), 10u);
  // A damaged pointer is not guessed around.
  ASSERT_TRUE(objects_.Put(CdsArea::kPointerObject, AsBytes("VMDDCDSPjunk")).ok());
  EXPECT_TRUE(area_.NextVersion().status().IsCorruption());
}

TEST_F(CdsAreaTest, ListLeftovers) {
  std::vector<std::string> names;
  ASSERT_TRUE(area_.ListLeftovers(&names).ok());
  // Nothing is published: the containers SetUp put are all leftovers.
  EXPECT_EQ(names,
            (std::vector<std::string>{CdsArea::ContainerObjectName(CdsArea::ContainerId(1, 0)),
                                      CdsArea::ContainerObjectName(CdsArea::ContainerId(1, 1)),
                                      CdsArea::ContainerObjectName(CdsArea::ContainerId(1, 2))}));

  // Version 1 uses containers (1,0) and (1,1) and is published.
  std::vector<CdsEntry> v1 = MakeEntries(20, 8, 2);
  Write(1, v1);
  ASSERT_TRUE(area_.Publish(1).ok());
  // Version 2 shares (1,0), adds (2,0) and is never published.
  PutContainer(&objects_, CdsArea::ContainerId(2, 0));
  std::vector<CdsEntry> v2 = MakeEntries(20, 9, 2);
  for (size_t i = 0; i < v2.size(); i++)
    v2[i].container = i % 2 ? CdsArea::ContainerId(1, 0) : CdsArea::ContainerId(2, 0);
  Write(2, v2);
  // A stray index part in the published version, names not of the area.
  ASSERT_TRUE(objects_.Put(CdsArea::IndexObjectName(1, 7), AsBytes("stray")).ok());
  ASSERT_TRUE(objects_.Put("cds/data/notes.txt", AsBytes("x")).ok());
  ASSERT_TRUE(area_.ListLeftovers(&names).ok());
  EXPECT_EQ(names, (std::vector<std::string>{
                       CdsArea::ContainerObjectName(CdsArea::ContainerId(1, 2)),
                       CdsArea::ContainerObjectName(CdsArea::ContainerId(2, 0)),
                       CdsArea::IndexObjectName(1, 7),
                       CdsArea::IndexObjectName(2, 0),
                       CdsArea::ManifestObjectName(2),
                   }));

  // Publishing version 2 makes its objects and containers reachable; version
  // 1 stays published, so its containers stay too.
  ASSERT_TRUE(area_.Publish(2).ok());
  ASSERT_TRUE(area_.ListLeftovers(&names).ok());
  EXPECT_EQ(names, (std::vector<std::string>{
                       CdsArea::ContainerObjectName(CdsArea::ContainerId(1, 2)),
                       CdsArea::IndexObjectName(1, 7),
                   }));

  // A published manifest that cannot be read: nothing can be called
  // unreferenced, the listing fails.
  ASSERT_TRUE(objects_.Put(CdsArea::ManifestObjectName(1), AsBytes("VMDDCDSM")).ok());
  Status st = area_.ListLeftovers(&names);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
}

TEST_F(CdsAreaTest, WriteVersionRejectsBadEntries) {
  std::vector<CdsEntry> good = MakeEntries(10, 10);
  auto expect_rejected = [&](const std::vector<CdsEntry>& entries, uint64_t version,
                             const char* why) {
    CdsVersionInfo info = Info(version);
    Status st = area_.WriteVersion(&info, entries);
    EXPECT_TRUE(st.IsInvalidArgument()) << why << ": " << st.ToString();
    std::vector<std::string> names;
    ASSERT_TRUE(objects_.List("cds/versions/", &names).ok());
    for (const std::string& n : names)
      EXPECT_EQ(n.find(CdsArea::ManifestObjectName(version)), std::string::npos)
          << why << ": wrote " << n;
  };
  std::vector<CdsEntry> e = good;
  std::swap(e[3], e[4]);
  expect_rejected(e, 2, "unsorted");
  e = good;
  e[5].fingerprint = e[4].fingerprint;
  expect_rejected(e, 2, "duplicate");
  e = good;
  e[6].container = CdsArea::ContainerId(1, 17);
  expect_rejected(e, 2, "missing container");
  e = good;
  e[6].offset = (1 << 20) - 40;  // + 48 bytes of record header + 32 of trailer
  expect_rejected(e, 2, "record past the container's end");
  e = good;
  e[1].length = 0;
  expect_rejected(e, 2, "empty block");
  e = good;
  PutContainer(&objects_, CdsArea::ContainerId(3, 0));
  e[1].container = CdsArea::ContainerId(3, 0);
  expect_rejected(e, 2, "container of a later version");
  expect_rejected(good, 0, "version 0");
  Write(2, good);
  ASSERT_TRUE(area_.Publish(2).ok());
  CdsVersionInfo info = Info(2);
  EXPECT_TRUE(area_.WriteVersion(&info, good).IsInvalidArgument()) << "already published";
}

TEST_F(CdsAreaTest, LocalObjectStoreRoundTrip) {
  testing::ScratchDir dir;
  std::unique_ptr<ObjectStore> local = NewLocalObjectStore(dir.path());
  CdsArea area(local.get());
  PutContainer(local.get(), CdsArea::ContainerId(1, 0));
  std::vector<CdsEntry> entries = MakeEntries(50, 11, 1);
  CdsVersionInfo info = Info(*area.NextVersion());
  ASSERT_EQ(info.version, 2u);
  for (CdsEntry& x : entries) x.container = CdsArea::ContainerId(1, 0);
  ASSERT_TRUE(area.WriteVersion(&info, entries).ok());
  ASSERT_TRUE(area.Publish(2).ok());
  std::vector<CdsEntry> back;
  ASSERT_TRUE(area.ReadEntries(2, &back).ok());
  EXPECT_TRUE(std::equal(back.begin(), back.end(), entries.begin(), entries.end(), SameEntry));
  std::vector<std::string> names;
  ASSERT_TRUE(area.ListLeftovers(&names).ok());
  EXPECT_TRUE(names.empty());
}

}  // namespace
}  // namespace vmdedup
