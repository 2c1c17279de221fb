// ThreadPool implementation; see thread_pool.h.
//
// Tasks must not throw: an exception escaping a task ends the process
// (std::terminate), as it would on a bare std::thread. A task may Submit more
// tasks; it must not call Wait (it would wait for itself).
#include "engine/thread_pool.h"

#include <utility>

namespace vmdedup {

ThreadPool::ThreadPool(size_t threads) {
  if (threads == 0) threads = 1;
  workers_.reserve(threads);
  for (size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { Run(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  // Workers leave only once the queue is empty, so queued tasks all run.
  for (auto& t : workers_) t.join();
}

void ThreadPool::Submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(task));
  }
  work_cv_.notify_one();
}

void ThreadPool::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [this] { return queue_.empty() && active_ == 0; });
}

void ThreadPool::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping_ and drained
    std::function<void()> task = std::move(queue_.front());
    queue_.pop_front();
    ++active_;
    lock.unlock();
    task();
    task = nullptr;  // destroy captures outside the lock, before counting done
    lock.lock();
    --active_;
    if (active_ == 0 && queue_.empty()) idle_cv_.notify_all();
  }
}

}  // namespace vmdedup
