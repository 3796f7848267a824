// A fixed pool of worker threads running one parallel loop at a time. The calling thread works too.
// Workers spin briefly before sleeping: a decode step issues hundreds of short loops, and a sleep/wake per loop
// would cost more than the work.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace stb::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);  // total threads including the caller; >= 1
  ~ThreadPool();
  int size() const { return int(workers_.size()) + 1; }
  // Calls fn(task) for every task in [0, n_tasks), spread over the pool; returns when all are done.
  // The first exception thrown by a task is rethrown here.
  void run(int64_t n_tasks, const std::function<void(int64_t)>& fn);

 private:
  void work_loop();
  void drain();
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_task_{0};
  std::atomic<int> busy_{0};
  int64_t n_tasks_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::exception_ptr error_;
  std::mutex error_mutex_;
  bool quit_ = false;
};

}  // namespace stb::cpu
