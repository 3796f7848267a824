// A fixed pool of worker threads running one parallel loop at a time; the calling thread works too.
//
// Tasks are claimed from one atomic word holding (job tag, task count, next task), so a worker that wakes late —
// the machine may be busy with other processes — can never claim a task of a finished or newer job by mistake,
// and the caller waits only for tasks to complete, never for every worker to check in. Workers spin briefly before
// sleeping: a decode step issues hundreds of short loops, and a sleep/wake per loop would cost more than the work.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
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
  static constexpr int kIndexBits = 22;  // task count and next-task index fields of the claim word
  static constexpr uint64_t kIndexMask = (1ull << kIndexBits) - 1;

  void work_loop();
  bool claim_and_run();  // runs one task of the current job; false when it has none left
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> claim_{0};  // tag << 44 | n_tasks << 22 | next task
  std::atomic<int64_t> done_{0};    // completed tasks of the current job
  const std::function<void(int64_t)>* fn_ = nullptr;
  uint64_t tag_ = 0;
  std::exception_ptr error_;
  std::mutex error_mutex_;
  bool quit_ = false;
};

}  // namespace stb::cpu
