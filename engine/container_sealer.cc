// ContainerSealer implementation; see container_sealer.h.
#include "engine/container_sealer.h"

#include <cstdint>
#include <span>
#include <utility>

namespace vmdedup {

ContainerSealer::ContainerSealer(ObjectStore* objects, MetadataStore* meta, std::string vm)
    : objects_(objects), meta_(meta), vm_(std::move(vm)) {}

ContainerSealer::~ContainerSealer() { pool_.Wait(); }

Status ContainerSealer::Submit(std::string object, std::string bytes, WriteBatch batch) {
  pool_.Wait();
  {
    std::lock_guard<std::mutex> lock(mu_);
    RETURN_IF_ERROR(status_);
  }
  object_ = std::move(object);
  bytes_ = std::move(bytes);
  batch_ = std::move(batch);
  pool_.Submit([this] { Store(); });
  return Status::OK();
}

Status ContainerSealer::Drain() {
  pool_.Wait();
  std::lock_guard<std::mutex> lock(mu_);
  return status_;
}

std::string ContainerSealer::TakeBuffer() {
  std::lock_guard<std::mutex> lock(mu_);
  return std::move(spare_);
}

void ContainerSealer::Store() {
  Status st;
  if (!object_.empty()) {
    st =
        objects_->PutNew(object_, {reinterpret_cast<const uint8_t*>(bytes_.data()), bytes_.size()});
    if (!st.ok()) st = st.WithContext("store container " + object_);
  }
  if (st.ok() && !batch_.empty()) {
    st = meta_->Write(batch_, false);
    if (!st.ok()) st = st.WithContext("write metadata of VM '" + vm_ + "'");
  }
  batch_.Clear();
  std::lock_guard<std::mutex> lock(mu_);
  if (status_.ok()) status_ = st;
  if (!object_.empty()) {
    bytes_.clear();
    spare_ = std::move(bytes_);
    bytes_ = std::string();
  }
}

}  // namespace vmdedup
