// Tests for engine/thread_pool.h.
#include "engine/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace vmdedup {
namespace {

TEST(ThreadPoolTest, AllTasksRun) {
  ThreadPool pool(4);
  EXPECT_EQ(pool.size(), 4u);
  std::atomic<int> count{0};
  for (int i = 0; i < 1000; ++i) pool.Submit([&] { count.fetch_add(1); });
  pool.Wait();
  EXPECT_EQ(count.load(), 1000);
}

TEST(ThreadPoolTest, WaitWithNothingQueuedReturns) {
  ThreadPool pool(2);
  pool.Wait();
  pool.Wait();
}

TEST(ThreadPoolTest, WaitCoversSlowTasksAndCanRepeat) {
  ThreadPool pool(2);
  std::atomic<int> done{0};
  for (int round = 1; round <= 3; ++round) {
    for (int i = 0; i < 6; ++i) {
      pool.Submit([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        done.fetch_add(1);
      });
    }
    pool.Wait();
    EXPECT_EQ(done.load(), 6 * round);
  }
}

TEST(ThreadPoolTest, ManySmallTasks) {
  ThreadPool pool(3);
  constexpr int kTasks = 200000;
  std::vector<int> hits(kTasks, 0);
  for (int i = 0; i < kTasks; ++i) pool.Submit([&hits, i] { hits[i]++; });
  pool.Wait();
  for (int i = 0; i < kTasks; ++i) ASSERT_EQ(hits[i], 1) << i;
}

TEST(ThreadPoolTest, DestructorDrainsQueue) {
  std::atomic<int> count{0};
  {
    ThreadPool pool(2);
    for (int i = 0; i < 50; ++i) {
      pool.Submit([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        count.fetch_add(1);
      });
    }
  }  // no Wait: the destructor must run everything queued
  EXPECT_EQ(count.load(), 50);
}

TEST(ThreadPoolTest, SingleThreadRunsInFifoOrder) {
  ThreadPool pool(1);
  std::vector<int> order;  // touched by the one worker only, read after Wait
  for (int i = 0; i < 100; ++i) pool.Submit([&order, i] { order.push_back(i); });
  pool.Wait();
  ASSERT_EQ(order.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(order[i], i);
}

TEST(ThreadPoolTest, ZeroThreadsMeansOne) {
  ThreadPool pool(0);
  EXPECT_EQ(pool.size(), 1u);
  std::atomic<bool> ran{false};
  pool.Submit([&] { ran = true; });
  pool.Wait();
  EXPECT_TRUE(ran.load());
}

// All workers run at once: each task waits until every worker has started one.
TEST(ThreadPoolTest, WorkersRunConcurrently) {
  constexpr int kThreads = 4;
  ThreadPool pool(kThreads);
  std::atomic<int> started{0};
  std::atomic<int> all_met{0};
  for (int i = 0; i < kThreads; ++i) {
    pool.Submit([&] {
      started.fetch_add(1);
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (started.load() < kThreads && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::yield();
      }
      if (started.load() == kThreads) all_met.fetch_add(1);
    });
  }
  pool.Wait();
  EXPECT_EQ(all_met.load(), kThreads);
}

TEST(ThreadPoolTest, TasksMaySubmitTasksAndWaitSeesThem) {
  ThreadPool pool(2);
  std::atomic<int> count{0};
  for (int i = 0; i < 10; ++i) {
    pool.Submit([&] {
      for (int j = 0; j < 10; ++j) pool.Submit([&] { count.fetch_add(1); });
      count.fetch_add(1);
    });
  }
  pool.Wait();
  EXPECT_EQ(count.load(), 110);
}

TEST(ThreadPoolTest, SubmitFromManyThreads) {
  ThreadPool pool(2);
  std::atomic<int> count{0};
  std::vector<std::thread> submitters;
  for (int t = 0; t < 4; ++t) {
    submitters.emplace_back([&] {
      for (int i = 0; i < 5000; ++i) pool.Submit([&] { count.fetch_add(1); });
    });
  }
  for (auto& t : submitters) t.join();
  pool.Wait();
  EXPECT_EQ(count.load(), 20000);
}

}  // namespace
}  // namespace vmdedup
