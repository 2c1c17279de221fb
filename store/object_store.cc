// The ObjectStore defaults: a reader that goes through GetRange, and a
// PutNew that checks first, for backends without a cheaper way.
#include "store/object_store.h"

namespace vmdedup {
namespace {

class RangeObjectReader final : public ObjectReader {
 public:
  RangeObjectReader(ObjectStore* store, std::string name) : store_(store), name_(std::move(name)) {}
  Status ReadAt(uint64_t offset, uint64_t length, std::string* out) const override {
    return store_->GetRange(name_, offset, length, out);
  }

 private:
  ObjectStore* store_;
  std::string name_;
};

}  // namespace

Status ObjectStore::PutNew(const std::string& name, std::span<const uint8_t> data) {
  Result<uint64_t> size = Size(name);
  if (size.ok())
    return Status::Corruption("object " + name + " exists already, and is never replaced");
  if (!size.status().IsNotFound()) return size.status();
  return Put(name, data);
}

Result<std::unique_ptr<ObjectReader>> ObjectStore::OpenReader(const std::string& name) {
  RETURN_IF_ERROR(Size(name).status());
  return std::unique_ptr<ObjectReader>(new RangeObjectReader(this, name));
}

}  // namespace vmdedup
