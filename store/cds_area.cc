// The CDS area's objects: encoding and checking of the pointer, the version
// manifests and the index parts (docs/format.md, "The CDS area"), writing and
// publishing a version, and finding what unfinished builds left behind.

#include "store/cds_area.h"
#include "store/framed_object.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <stdexcept>
#include <string_view>

#include "base/crc32c.h"
#include "base/encoding.h"
#include "store/container.h"
#include "store/records.h"

namespace vmdedup {
namespace {

constexpr char kPointerMagic[8] = {'V', 'M', 'D', 'D', 'C', 'D', 'S', 'P'};
constexpr char kQuarantineMagic[8] = {'V', 'M', 'D', 'D', 'Q', 'U', 'A', 'R'};
constexpr char kManifestMagic[8] = {'V', 'M', 'D', 'D', 'C', 'D', 'S', 'M'};
constexpr char kIndexMagic[8] = {'V', 'M', 'D', 'D', 'C', 'D', 'S', 'I'};
constexpr size_t kIndexHeaderSize = 32;
constexpr size_t kIndexTrailerSize = 4;
constexpr std::string_view kVersionsPrefix = "cds/versions/";
constexpr std::string_view kDataPrefix = "cds/data/";
constexpr std::string_view kIndexPrefix = "index-";
constexpr std::string_view kManifestName = "manifest";
// Container ids are (version << 20) | n: versions must leave them 64 bits.
constexpr uint64_t kMaxVersion = (1ull << 44) - 1;

// "cds/versions/V/REST" → V and REST; false for any other name.
bool ParseVersionObject(std::string_view name, uint64_t* version, std::string_view* rest) {
  if (name.substr(0, kVersionsPrefix.size()) != kVersionsPrefix) return false;
  name.remove_prefix(kVersionsPrefix.size());
  if (name.size() < 18 || name[16] != '/') return false;
  if (!ParseHex16(name.substr(0, 16), version)) return false;
  *rest = name.substr(17);
  return true;
}

// "cds/data/ID.ctr" → ID; false for any other name.
bool ParseContainerObject(std::string_view name, uint64_t* id) {
  if (name.substr(0, kDataPrefix.size()) != kDataPrefix) return false;
  name.remove_prefix(kDataPrefix.size());
  if (name.size() != 20 || name.substr(16) != ".ctr") return false;
  return ParseHex16(name.substr(0, 16), id);
}

// "index-NNNN" → NNNN (only as IndexObjectName writes it).
bool ParseIndexName(std::string_view rest, uint32_t* part) {
  if (rest.substr(0, kIndexPrefix.size()) != kIndexPrefix) return false;
  std::string_view digits = rest.substr(kIndexPrefix.size());
  if (digits.size() < 4 || digits.size() > 10) return false;
  uint64_t r = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
    r = r * 10 + static_cast<uint64_t>(c - '0');
  }
  if (r > UINT32_MAX) return false;
  *part = static_cast<uint32_t>(r);
  return CdsArea::IndexObjectName(0, *part).ends_with(rest);
}

uint64_t PartsFor(uint64_t entries) {
  return (entries + kCdsEntriesPerIndexPart - 1) / kCdsEntriesPerIndexPart;
}

const uint8_t* Bytes(std::string_view s) { return reinterpret_cast<const uint8_t*>(s.data()); }

uint32_t MaskedCrc(const void* p, size_t n) { return crc32c::Mask(crc32c::Value(p, n)); }

std::string PointerWhat() { return std::string("CDS pointer ") + CdsArea::kPointerObject; }
std::string ManifestWhat(uint64_t version) {
  return "CDS manifest " + CdsArea::ManifestObjectName(version);
}
std::string IndexWhat(uint64_t version, uint32_t part) {
  return "CDS index " + CdsArea::IndexObjectName(version, part);
}

// magic | u32 body length | body | u32 masked crc32c of all preceding bytes.
std::string EncodePointer(const CdsPointer& p) {
  ByteWriter body;
  body.Varint(p.current);
  body.Varint(p.published.size());
  for (uint64_t v : p.published) body.Varint(v);
  return FrameObject(kPointerMagic, body.buffer());
}

Status DecodePointer(std::string_view data, CdsPointer* p) {
  std::string what = PointerWhat();
  std::string_view body;
  RETURN_IF_ERROR(UnframeObject(data, kPointerMagic, what, &body));
  ByteReader in(body, what);
  uint64_t n = 0;
  RETURN_IF_ERROR(in.Varint(&p->current));
  RETURN_IF_ERROR(in.Varint(&n));
  if (n > in.remaining()) return Status::Corruption(what + ": count exceeds the record size");
  p->published.clear();
  p->published.reserve(n);
  for (uint64_t i = 0; i < n; i++) {
    uint64_t v = 0;
    RETURN_IF_ERROR(in.Varint(&v));
    if (v == 0 || v > kMaxVersion || (!p->published.empty() && v <= p->published.back()))
      return Status::Corruption(what + ": published versions are not ascending");
    p->published.push_back(v);
  }
  if (in.remaining() != 0)
    return Status::Corruption(what + ": " + std::to_string(in.remaining()) + " trailing bytes");
  if (p->current != 0 && !std::binary_search(p->published.begin(), p->published.end(), p->current))
    return Status::Corruption(what + ": current version " + std::to_string(p->current) +
                              " is not published");
  return Status::OK();
}

std::string EncodeManifest(const CdsVersionInfo& info) {
  nlohmann::json j = {
      {"format_version", kCdsFormatVersion},
      {"version", info.version},
      {"created", info.created},
      {"block_count", info.block_count},
      {"raw_bytes", info.raw_bytes},
      {"stored_bytes", info.stored_bytes},
      {"index_parts", info.index_parts},
      {"chunker", info.chunker},
      {"selection", info.selection},
      {"seeds", info.seeds},
      {"containers", info.containers},
  };
  return FrameObject(kManifestMagic,
                     j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
}

uint64_t UnsignedField(const nlohmann::json& j, const char* key) {
  const nlohmann::json& v = j.at(key);
  if (!v.is_number_unsigned())
    throw std::invalid_argument(std::string("'") + key + "' is not an unsigned integer");
  return v.get<uint64_t>();
}

std::string StringField(const nlohmann::json& j, const char* key) {
  const nlohmann::json& v = j.at(key);
  if (!v.is_string()) throw std::invalid_argument(std::string("'") + key + "' is not a string");
  return v.get<std::string>();
}

Status DecodeManifest(std::string_view data, uint64_t version, CdsVersionInfo* info) {
  std::string what = ManifestWhat(version);
  std::string_view body;
  RETURN_IF_ERROR(UnframeObject(data, kManifestMagic, what, &body));
  uint64_t format_version = 0;
  uint64_t parts = 0;
  try {
    nlohmann::json j = nlohmann::json::parse(body);
    if (!j.is_object()) return Status::Corruption(what + ": not a JSON object");
    format_version = UnsignedField(j, "format_version");
    if (format_version != kCdsFormatVersion)
      return Status::NotSupported(what + ": format version " + std::to_string(format_version) +
                                  ", this vmdedup reads version " +
                                  std::to_string(kCdsFormatVersion));
    info->version = UnsignedField(j, "version");
    const nlohmann::json& created = j.at("created");
    if (!created.is_number_integer()) throw std::invalid_argument("'created' is not an integer");
    info->created = created.get<int64_t>();
    info->block_count = UnsignedField(j, "block_count");
    info->raw_bytes = UnsignedField(j, "raw_bytes");
    info->stored_bytes = UnsignedField(j, "stored_bytes");
    parts = UnsignedField(j, "index_parts");
    info->chunker = StringField(j, "chunker");
    info->selection = StringField(j, "selection");
    const nlohmann::json& seeds = j.at("seeds");
    const nlohmann::json& containers = j.at("containers");
    if (!seeds.is_array() || !containers.is_array())
      throw std::invalid_argument("'seeds' and 'containers' must be arrays");
    info->seeds.clear();
    for (const nlohmann::json& s : seeds) {
      if (!s.is_string()) throw std::invalid_argument("a seed is not a string");
      info->seeds.push_back(s.get<std::string>());
    }
    info->containers.clear();
    for (const nlohmann::json& c : containers) {
      if (!c.is_number_unsigned()) throw std::invalid_argument("a container is not an id");
      info->containers.push_back(c.get<uint64_t>());
    }
  } catch (const std::exception& e) {
    return Status::Corruption(what + ": " + e.what());
  }
  if (info->version != version)
    return Status::Corruption(what + ": holds version " + std::to_string(info->version));
  if (parts != PartsFor(info->block_count))
    return Status::Corruption(what + ": " + std::to_string(parts) + " index parts for " +
                              std::to_string(info->block_count) + " entries");
  info->index_parts = static_cast<uint32_t>(parts);
  for (size_t i = 0; i < info->containers.size(); i++) {
    uint64_t c = info->containers[i];
    uint64_t v = CdsArea::VersionOfContainer(c);
    if (v == 0 || v > version || (i > 0 && c <= info->containers[i - 1]))
      return Status::Corruption(what + ": bad container list (" + Hex16(c) + ")");
  }
  if (info->block_count > 0 && info->containers.empty())
    return Status::Corruption(what + ": entries but no containers");
  return Status::OK();
}

// What is wrong with an entry of `version` on its own ("" if nothing).
std::string CheckEntry(const CdsEntry& e, uint64_t version) {
  if (e.length == 0 || e.length > kMaxBlockSize)
    return "block length " + std::to_string(e.length) + " out of range";
  if (e.record_len < kBlockRecordHeaderSize ||
      e.record_len > kBlockRecordHeaderSize + kMaxBlockSize)
    return "record length " + std::to_string(e.record_len) + " out of range";
  if (e.offset < kContainerHeaderSize ||
      uint64_t{e.offset} + e.record_len + kContainerTrailerSize > kMaxContainerSize)
    return "record offset " + std::to_string(e.offset) + " out of range";
  uint64_t v = CdsArea::VersionOfContainer(e.container);
  if (v == 0 || v > version) return "container " + Hex16(e.container) + " is not of this version";
  return "";
}

std::string EncodeIndexPart(uint64_t version, uint32_t part, std::span<const CdsEntry> entries) {
  std::string out(kIndexHeaderSize + entries.size() * kCdsIndexEntrySize + kIndexTrailerSize, '\0');
  uint8_t* p = reinterpret_cast<uint8_t*>(out.data());
  std::memcpy(p, kIndexMagic, 8);
  EncodeU32(p + 8, kCdsFormatVersion);
  EncodeU32(p + 12, part);
  EncodeU64(p + 16, version);
  EncodeU32(p + 24, static_cast<uint32_t>(entries.size()));
  EncodeU32(p + 28, MaskedCrc(p, 28));
  for (size_t i = 0; i < entries.size(); i++) {
    const CdsEntry& e = entries[i];
    uint8_t* q = p + CdsArea::IndexEntryOffset(static_cast<uint32_t>(i));
    std::memcpy(q, e.fingerprint.bytes.data(), 32);
    EncodeU32(q + 32, e.length);
    EncodeU64(q + 36, e.container);
    EncodeU32(q + 44, e.offset);
    EncodeU32(q + 48, e.record_len);
    EncodeU32(q + 52, MaskedCrc(q, 52));
  }
  EncodeU32(p + out.size() - 4, MaskedCrc(p, out.size() - 4));
  return out;
}

// Checks one index object of (version, part) and calls `fn` with its entries
// in order. `prev`, when set, is the last fingerprint of the previous part:
// every entry must sort strictly after it (it is updated as entries pass).
Status DecodeIndexPart(std::string_view data, uint64_t version, uint32_t part,
                       std::optional<Fingerprint>* prev,
                       const std::function<Status(uint32_t i, const CdsEntry&)>& fn) {
  std::string what = IndexWhat(version, part);
  if (data.size() < kIndexHeaderSize + kIndexTrailerSize)
    return Status::Corruption(what + ": truncated (" + std::to_string(data.size()) + " bytes)");
  const uint8_t* p = Bytes(data);
  if (std::memcmp(p, kIndexMagic, 8) != 0) return Status::Corruption(what + ": bad magic");
  if (crc32c::Unmask(DecodeU32(p + 28)) != crc32c::Value(p, 28))
    return Status::Corruption(what + ": header checksum mismatch");
  uint32_t format = DecodeU32(p + 8);
  if (format != kCdsFormatVersion)
    return Status::NotSupported(what + ": format version " + std::to_string(format) +
                                ", this vmdedup reads version " +
                                std::to_string(kCdsFormatVersion));
  if (DecodeU32(p + 12) != part)
    return Status::Corruption(what + ": holds part " + std::to_string(DecodeU32(p + 12)));
  if (DecodeU64(p + 16) != version)
    return Status::Corruption(what + ": holds version " + std::to_string(DecodeU64(p + 16)));
  uint32_t count = DecodeU32(p + 24);
  if (count > kCdsEntriesPerIndexPart)
    return Status::Corruption(what + ": " + std::to_string(count) + " entries, more than a part");
  uint64_t expected_size =
      kIndexHeaderSize + uint64_t{count} * kCdsIndexEntrySize + kIndexTrailerSize;
  if (data.size() != expected_size)
    return Status::Corruption(what + ": " + std::to_string(data.size()) + " bytes, " +
                              std::to_string(expected_size) + " expected for " +
                              std::to_string(count) + " entries");
  if (crc32c::Unmask(DecodeU32(p + data.size() - 4)) != crc32c::Value(p, data.size() - 4))
    return Status::Corruption(what + ": checksum mismatch");
  for (uint32_t i = 0; i < count; i++) {
    const uint8_t* q = p + CdsArea::IndexEntryOffset(i);
    std::string entry = what + ": entry " + std::to_string(i);
    if (crc32c::Unmask(DecodeU32(q + 52)) != crc32c::Value(q, 52))
      return Status::Corruption(entry + ": checksum mismatch");
    CdsEntry e;
    std::memcpy(e.fingerprint.bytes.data(), q, 32);
    e.length = DecodeU32(q + 32);
    e.container = DecodeU64(q + 36);
    e.offset = DecodeU32(q + 44);
    e.record_len = DecodeU32(q + 48);
    std::string bad = CheckEntry(e, version);
    if (!bad.empty()) return Status::Corruption(entry + ": " + bad);
    if (prev->has_value() && !(**prev < e.fingerprint))
      return Status::Corruption(entry + ": not sorted after the entry before it");
    *prev = e.fingerprint;
    RETURN_IF_ERROR(fn(i, e));
  }
  return Status::OK();
}

}  // namespace

std::string CdsArea::ContainerObjectName(uint64_t container_id) {
  return CdsContainerObjectName(container_id);
}

std::string CdsArea::IndexObjectName(uint64_t version, uint32_t part) {
  char b[16];
  std::snprintf(b, sizeof(b), "%04u", part);
  return std::string(kVersionsPrefix) + Hex16(version) + "/" + std::string(kIndexPrefix) + b;
}

std::string CdsArea::ManifestObjectName(uint64_t version) {
  return std::string(kVersionsPrefix) + Hex16(version) + "/" + std::string(kManifestName);
}

uint64_t CdsArea::IndexEntryOffset(uint32_t i) {
  return kIndexHeaderSize + uint64_t{i} * kCdsIndexEntrySize;
}

Result<CdsPointer> CdsArea::ReadPointer() {
  std::string data;
  Status st = objects_->Get(kPointerObject, &data);
  if (st.IsNotFound()) return CdsPointer{};
  RETURN_IF_ERROR(st);
  CdsPointer p;
  RETURN_IF_ERROR(DecodePointer(data, &p));
  return p;
}

Result<CdsVersionInfo> CdsArea::ReadManifest(uint64_t version) {
  std::string data;
  RETURN_IF_ERROR(objects_->Get(ManifestObjectName(version), &data));
  CdsVersionInfo info;
  RETURN_IF_ERROR(DecodeManifest(data, version, &info));
  return info;
}

Status CdsArea::ReadIndexPart(uint64_t version, uint32_t part, std::vector<CdsEntry>* out) {
  out->clear();
  std::string data;
  RETURN_IF_ERROR(objects_->Get(IndexObjectName(version, part), &data));
  std::optional<Fingerprint> prev;
  return DecodeIndexPart(data, version, part, &prev, [&](uint32_t, const CdsEntry& e) {
    out->push_back(e);
    return Status::OK();
  });
}

Status CdsArea::ScanEntries(const CdsVersionInfo& info,
                            const std::function<void(uint64_t entry, const CdsEntry&)>& fn) {
  std::optional<Fingerprint> prev;
  uint64_t n = 0, raw = 0, stored = 0;
  std::string data;
  for (uint32_t part = 0; part < info.index_parts; part++) {
    std::string what = IndexWhat(info.version, part);
    RETURN_IF_ERROR(objects_->Get(IndexObjectName(info.version, part), &data));
    uint64_t first = n;
    RETURN_IF_ERROR(
        DecodeIndexPart(data, info.version, part, &prev, [&](uint32_t i, const CdsEntry& e) {
          if (!std::binary_search(info.containers.begin(), info.containers.end(), e.container))
            return Status::Corruption(what + ": entry " + std::to_string(i) + ": container " +
                                      Hex16(e.container) + " is not in the manifest");
          fn(n++, e);
          raw += e.length;
          stored += e.record_len;
          return Status::OK();
        }));
    uint64_t count = n - first;
    bool last = part + 1 == info.index_parts;
    if (last ? count == 0 : count != kCdsEntriesPerIndexPart)
      return Status::Corruption(what + ": " + std::to_string(count) + " entries, " +
                                (last ? "none in the last part" : "a part short"));
  }
  std::string manifest = ManifestWhat(info.version);
  if (n != info.block_count)
    return Status::Corruption(manifest + ": " + std::to_string(info.block_count) +
                              " entries, its index holds " + std::to_string(n));
  if (raw != info.raw_bytes || stored != info.stored_bytes)
    return Status::Corruption(manifest + ": byte counts do not match its index");
  return Status::OK();
}

Status CdsArea::ReadEntries(uint64_t version, std::vector<CdsEntry>* out) {
  out->clear();
  ASSIGN_OR_RETURN(CdsVersionInfo info, ReadManifest(version));
  out->reserve(info.block_count);
  Status st = ScanEntries(info, [&](uint64_t, const CdsEntry& e) { out->push_back(e); });
  if (!st.ok()) out->clear();
  return st;
}

Result<uint64_t> CdsArea::NextVersion() {
  ASSIGN_OR_RETURN(CdsPointer pointer, ReadPointer());
  uint64_t max = pointer.current;
  if (!pointer.published.empty()) max = std::max(max, pointer.published.back());
  std::vector<std::string> names;
  RETURN_IF_ERROR(objects_->List(std::string(kVersionsPrefix), &names));
  for (const std::string& name : names) {
    uint64_t v = 0;
    std::string_view rest;
    if (ParseVersionObject(name, &v, &rest)) max = std::max(max, v);
  }
  RETURN_IF_ERROR(objects_->List(std::string(kDataPrefix), &names));
  for (const std::string& name : names) {
    uint64_t id = 0;
    if (ParseContainerObject(name, &id)) max = std::max(max, VersionOfContainer(id));
  }
  if (max >= kMaxVersion)
    return Status::InvalidArgument("CDS area " + objects_->Describe() +
                                   ": no version number left above " + std::to_string(max));
  return max + 1;
}

Status CdsArea::WriteVersion(CdsVersionInfo* info, const std::vector<CdsEntry>& entries) {
  const uint64_t version = info->version;
  std::string what = "CDS version " + std::to_string(version);
  if (version == 0 || version > kMaxVersion)
    return Status::InvalidArgument(what + ": version out of range");
  if (entries.size() > uint64_t{UINT32_MAX})
    return Status::InvalidArgument(what + ": too many entries");
  ASSIGN_OR_RETURN(CdsPointer pointer, ReadPointer());
  if (std::binary_search(pointer.published.begin(), pointer.published.end(), version))
    return Status::InvalidArgument(what + " is already published");

  // Per container, the end of its last record: the object must reach it.
  std::map<uint64_t, uint64_t> ends;
  uint64_t raw = 0, stored = 0;
  for (size_t i = 0; i < entries.size(); i++) {
    const CdsEntry& e = entries[i];
    std::string bad = CheckEntry(e, version);
    if (!bad.empty())
      return Status::InvalidArgument(what + ": entry " + std::to_string(i) + ": " + bad);
    if (i > 0 && !(entries[i - 1].fingerprint < e.fingerprint))
      return Status::InvalidArgument(what + ": entry " + std::to_string(i) +
                                     " is not sorted strictly after the entry before it");
    uint64_t& end = ends[e.container];
    end = std::max(end, uint64_t{e.offset} + e.record_len);
    raw += e.length;
    stored += e.record_len;
  }
  info->containers.clear();
  for (const auto& [id, end] : ends) {
    std::string name = ContainerObjectName(id);
    Result<uint64_t> size = objects_->Size(name);
    if (size.status().IsNotFound())
      return Status::InvalidArgument(what + ": its entries reference container " + name +
                                     ", which does not exist");
    RETURN_IF_ERROR(size.status());
    if (end + kContainerTrailerSize > *size)
      return Status::InvalidArgument(what + ": its entries reference records past the end of " +
                                     name);
    info->containers.push_back(id);
  }
  info->block_count = entries.size();
  info->raw_bytes = raw;
  info->stored_bytes = stored;
  info->index_parts = static_cast<uint32_t>(PartsFor(entries.size()));

  std::span<const CdsEntry> all(entries);
  for (uint32_t part = 0; part < info->index_parts; part++) {
    size_t first = size_t{part} * kCdsEntriesPerIndexPart;
    size_t count = std::min<size_t>(kCdsEntriesPerIndexPart, entries.size() - first);
    std::string data = EncodeIndexPart(version, part, all.subspan(first, count));
    RETURN_IF_ERROR(objects_->Put(IndexObjectName(version, part),
                                  {reinterpret_cast<const uint8_t*>(data.data()), data.size()}));
  }
  std::string manifest = EncodeManifest(*info);
  return objects_->Put(ManifestObjectName(version),
                       {reinterpret_cast<const uint8_t*>(manifest.data()), manifest.size()});
}

Status CdsArea::Publish(uint64_t version) {
  std::string what = "publish CDS version " + std::to_string(version);
  Result<CdsVersionInfo> info = ReadManifest(version);
  RETURN_IF_ERROR(info.status().WithContext(what));
  // The index parts must be there and whole: a pointer to a version that
  // cannot be loaded would fail every backup's level 3.
  uint64_t left = info->block_count;
  for (uint32_t part = 0; part < info->index_parts; part++) {
    uint64_t count = std::min<uint64_t>(left, kCdsEntriesPerIndexPart);
    left -= count;
    Result<uint64_t> size = objects_->Size(IndexObjectName(version, part));
    RETURN_IF_ERROR(size.status().WithContext(what));
    if (*size != kIndexHeaderSize + count * kCdsIndexEntrySize + kIndexTrailerSize)
      return Status::Corruption(what + ": " + IndexWhat(version, part) + " has the wrong size");
  }
  ASSIGN_OR_RETURN(CdsPointer pointer, ReadPointer());
  pointer.current = version;
  auto it = std::lower_bound(pointer.published.begin(), pointer.published.end(), version);
  if (it == pointer.published.end() || *it != version) pointer.published.insert(it, version);
  std::string data = EncodePointer(pointer);
  return objects_->Put(kPointerObject,
                       {reinterpret_cast<const uint8_t*>(data.data()), data.size()});
}

Result<std::set<uint64_t>> CdsArea::ReadQuarantine() {
  const std::string what = std::string("CDS quarantine ") + kQuarantineObject;
  std::string data;
  Status st = objects_->Get(kQuarantineObject, &data);
  if (st.IsNotFound()) return std::set<uint64_t>{};
  RETURN_IF_ERROR(st);
  std::string_view body;
  RETURN_IF_ERROR(UnframeObject(data, kQuarantineMagic, what, &body));
  ByteReader in(body, what);
  uint64_t n = 0;
  RETURN_IF_ERROR(in.Varint(&n));
  if (n > in.remaining()) return Status::Corruption(what + ": count exceeds the record size");
  std::set<uint64_t> ids;
  uint64_t last = 0;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t id = 0;
    RETURN_IF_ERROR(in.Varint(&id));
    if (i > 0 && id <= last) return Status::Corruption(what + ": ids are not ascending");
    ids.insert(id);
    last = id;
  }
  if (in.remaining() != 0)
    return Status::Corruption(what + ": " + std::to_string(in.remaining()) + " trailing bytes");
  return ids;
}

Status CdsArea::AddToQuarantine(const std::set<uint64_t>& ids) {
  // A damaged quarantine is replaced: what it held cannot be read anyway,
  // and check reports the damage.
  auto read = ReadQuarantine();
  if (!read.ok() && !read.status().IsCorruption()) return read.status();
  std::set<uint64_t> all = read.ok() ? std::move(read).value() : std::set<uint64_t>{};
  const size_t before = all.size();
  all.insert(ids.begin(), ids.end());
  if (read.ok() && all.size() == before) return Status::OK();
  ByteWriter body;
  body.Varint(all.size());
  for (uint64_t id : all) body.Varint(id);
  std::string data = FrameObject(kQuarantineMagic, body.buffer());
  return objects_->Put(kQuarantineObject,
                       {reinterpret_cast<const uint8_t*>(data.data()), data.size()});
}

Result<std::set<uint64_t>> CdsArea::UnusableContainers(const std::vector<uint64_t>& containers) {
  ASSIGN_OR_RETURN(std::set<uint64_t> quarantined, ReadQuarantine());
  std::vector<std::string> listed;
  RETURN_IF_ERROR(objects_->List(std::string(kDataPrefix), &listed));
  std::set<uint64_t> present;
  for (const std::string& name : listed) {
    uint64_t id = 0;
    if (ParseContainerObject(name, &id)) present.insert(id);
  }
  std::set<uint64_t> out;
  for (uint64_t id : containers)
    if (quarantined.count(id) || !present.count(id)) out.insert(id);
  return out;
}

Status CdsArea::ListLeftovers(std::vector<std::string>* names) {
  names->clear();
  ASSIGN_OR_RETURN(CdsPointer pointer, ReadPointer());
  // What the published versions reach: their index parts and manifests, and
  // the containers their manifests list. A published manifest that cannot be
  // read stops the listing: nothing could be called unreferenced then.
  std::map<uint64_t, uint32_t> parts;  // published version → index parts
  std::set<uint64_t> referenced;
  for (uint64_t v : pointer.published) {
    ASSIGN_OR_RETURN(CdsVersionInfo info, ReadManifest(v));
    parts[v] = info.index_parts;
    referenced.insert(info.containers.begin(), info.containers.end());
  }
  std::vector<std::string> listed;
  RETURN_IF_ERROR(objects_->List(std::string(kVersionsPrefix), &listed));
  for (std::string& name : listed) {
    uint64_t v = 0;
    std::string_view rest;
    if (!ParseVersionObject(name, &v, &rest)) continue;
    auto it = parts.find(v);
    uint32_t part = 0;
    bool reached = it != parts.end() &&
                   (rest == kManifestName || (ParseIndexName(rest, &part) && part < it->second));
    if (!reached) names->push_back(std::move(name));
  }
  RETURN_IF_ERROR(objects_->List(std::string(kDataPrefix), &listed));
  for (std::string& name : listed) {
    uint64_t id = 0;
    if (ParseContainerObject(name, &id) && !referenced.contains(id))
      names->push_back(std::move(name));
  }
  std::sort(names->begin(), names->end());
  return Status::OK();
}

}  // namespace vmdedup
