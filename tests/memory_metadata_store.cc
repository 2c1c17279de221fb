// In-memory MetadataStore for tests: a sorted map under a mutex.

#include <map>
#include <mutex>

#include "tests/memory_metadata_store.h"

namespace vmdedup {
namespace {

class MemoryMetadataStore final : public MetadataStore {
 public:
  Status Get(std::string_view key, std::string* value) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    if (it == map_.end()) return Status::NotFound("metadata key not found");
    *value = it->second;
    return Status::OK();
  }

  Status Write(const WriteBatch& batch, bool /*sync*/) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, value] : batch.ops()) {
      if (value) {
        map_.insert_or_assign(key, *value);
      } else {
        map_.erase(key);
      }
    }
    return Status::OK();
  }

  Status Scan(std::string_view prefix,
              const std::function<bool(std::string_view, std::string_view)>& fn) override {
    // Copy the range under the lock so that `fn` sees a consistent view and
    // may itself call into the store.
    std::vector<std::pair<std::string, std::string>> view;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = map_.lower_bound(prefix);
           it != map_.end() && std::string_view(it->first).substr(0, prefix.size()) == prefix;
           ++it) {
        view.emplace_back(it->first, it->second);
      }
    }
    for (const auto& [k, v] : view) {
      if (!fn(k, v)) break;
    }
    return Status::OK();
  }

  uint64_t ApproximateBytes() override {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t total = 0;
    for (const auto& [k, v] : map_) total += k.size() + v.size();
    return total;
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::string, std::less<>> map_;
};

}  // namespace

std::unique_ptr<MetadataStore> NewMemoryMetadataStore() {
  return std::make_unique<MemoryMetadataStore>();
}

}  // namespace vmdedup
