// LruCache: a thread-safe cache of immutable values keyed by a 64-bit key,
// bounded by a byte budget, with least-recently-used eviction and
// single-flight loading: when several threads miss on the same key at once,
// one of them loads it and the others wait for that result instead of
// loading it again (the NBD export sees many parallel reads of one segment).
//
// Values are handed out as shared_ptr<const V>, so an evicted value stays
// valid for readers that still hold it; the budget counts only what the
// cache itself keeps. A value whose cost exceeds the whole budget is returned
// to its callers but not kept. Failed loads are not cached: the next caller
// tries again (and fails again, with a fresh error message).
//
// Thread model: every method may be called from any thread at once; the
// loader runs without the cache's lock held. Waiters of a key wait on that
// key's own condition variable (no herd of wake-ups with many threads).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "base/status.h"

namespace vmdedup {

struct LruCacheStats {
  uint64_t hits = 0;    // found in the cache
  uint64_t misses = 0;  // loaded by this caller
  uint64_t waits = 0;   // joined another caller's load of the same key
  uint64_t evictions = 0;
  uint64_t dropped = 0;  // removed by Erase
  uint64_t load_errors = 0;
  uint64_t entries = 0;
  uint64_t bytes = 0;  // cost of what is kept now
};

template <typename V>
class LruCache {
 public:
  using Ptr = std::shared_ptr<const V>;
  using CostFn = std::function<uint64_t(const V&)>;

  LruCache(uint64_t budget_bytes, CostFn cost) : budget_(budget_bytes), cost_(std::move(cost)) {}
  LruCache(const LruCache&) = delete;
  LruCache& operator=(const LruCache&) = delete;

  uint64_t budget() const { return budget_; }

  // The cached value, or null; a hit makes the entry most recently used.
  Ptr Find(uint64_t key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    if (it == map_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second.pos);
    stats_.hits++;
    return it->second.value;
  }

  // The cached value, or the result of `load` (run by exactly one of the
  // callers that miss on `key` at the same time).
  Result<Ptr> GetOrLoad(uint64_t key, const std::function<Result<Ptr>()>& load) {
    std::shared_ptr<Flight> flight;
    {
      std::unique_lock<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) {
        lru_.splice(lru_.begin(), lru_, it->second.pos);
        stats_.hits++;
        return it->second.value;
      }
      auto f = flights_.find(key);
      if (f != flights_.end()) {
        std::shared_ptr<Flight> other = f->second;
        stats_.waits++;
        other->cv.wait(lock, [&] { return other->done; });
        if (!other->status.ok()) return other->status;
        return other->value;
      }
      flight = std::make_shared<Flight>();
      flights_.emplace(key, flight);
      stats_.misses++;
    }
    Result<Ptr> loaded = load();
    {
      std::lock_guard<std::mutex> lock(mu_);
      flight->done = true;
      if (loaded.ok()) {
        flight->value = *loaded;
        Insert(key, *loaded);
      } else {
        flight->status = loaded.status();
        stats_.load_errors++;
      }
      flights_.erase(key);
    }
    flight->cv.notify_all();
    return loaded;
  }

  // Drops `key` if it is cached as `value` (readers holding the value keep
  // it); another value cached under `key` since, or a load in flight, is not
  // affected. Counted as `dropped`, not as an eviction.
  void Erase(uint64_t key, const V* value) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    if (it == map_.end() || it->second.value.get() != value) return;
    bytes_ -= it->second.cost;
    lru_.erase(it->second.pos);
    map_.erase(it);
    stats_.dropped++;
  }

  // The cached value, or null; changes neither the LRU order nor the
  // statistics.
  Ptr Peek(uint64_t key) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    return it == map_.end() ? nullptr : it->second.value;
  }

  // True when `key` is cached or being loaded; changes neither the LRU order
  // nor the statistics.
  bool Contains(uint64_t key) const {
    std::lock_guard<std::mutex> lock(mu_);
    return map_.count(key) > 0 || flights_.count(key) > 0;
  }

  LruCacheStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    LruCacheStats s = stats_;
    s.entries = map_.size();
    s.bytes = bytes_;
    return s;
  }

 private:
  struct Entry {
    Ptr value;
    uint64_t cost = 0;
    typename std::list<uint64_t>::iterator pos;
  };
  struct Flight {
    std::condition_variable cv;  // waiters of this key only
    bool done = false;
    Status status;
    Ptr value;
  };

  // Called with mu_ held.
  void Insert(uint64_t key, const Ptr& value) {
    if (!value) return;
    uint64_t cost = cost_(*value);
    if (cost > budget_) return;
    while (bytes_ + cost > budget_ && !lru_.empty()) {
      uint64_t victim = lru_.back();
      auto it = map_.find(victim);
      bytes_ -= it->second.cost;
      map_.erase(it);
      lru_.pop_back();
      stats_.evictions++;
    }
    lru_.push_front(key);
    map_.emplace(key, Entry{value, cost, lru_.begin()});
    bytes_ += cost;
  }

  const uint64_t budget_;
  const CostFn cost_;
  mutable std::mutex mu_;
  std::list<uint64_t> lru_;  // most recently used first
  std::unordered_map<uint64_t, Entry> map_;
  std::unordered_map<uint64_t, std::shared_ptr<Flight>> flights_;
  uint64_t bytes_ = 0;
  LruCacheStats stats_;
};

}  // namespace vmdedup
