#include "cpu/thread_pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define STB_PAUSE() _mm_pause()
#else
#define STB_PAUSE() ((void)0)
#endif

namespace stb::cpu {

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    quit_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

bool ThreadPool::claim_and_run() {
  const uint64_t word = claim_.fetch_add(1, std::memory_order_acq_rel);
  const int64_t next = int64_t(word & kIndexMask), n = int64_t((word >> kIndexBits) & kIndexMask);
  if (next >= n) return false;
  // A valid claim keeps its job alive (the caller waits for every task), so fn_ is still that job's function.
  try {
    (*fn_)(next);
  } catch (...) {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (!error_) error_ = std::current_exception();
  }
  done_.fetch_add(1, std::memory_order_acq_rel);
  return true;
}

void ThreadPool::work_loop() {
  uint64_t seen_tag = 0;
  for (;;) {
    // Wait for a job with a new tag: spin a little, then sleep until woken.
    auto fresh = [&] { return (claim_.load(std::memory_order_acquire) >> (2 * kIndexBits)) != seen_tag; };
    for (int spin = 0; spin < 20000 && !fresh(); ++spin) STB_PAUSE();
    if (!fresh()) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return quit_ || fresh(); });
      if (quit_) return;
    }
    seen_tag = claim_.load(std::memory_order_acquire) >> (2 * kIndexBits);
    while (claim_and_run()) {
    }
  }
}

void ThreadPool::run(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  if (workers_.empty() || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  if (uint64_t(n_tasks) > kIndexMask / 2) throw std::length_error("ThreadPool::run: too many tasks");
  fn_ = &fn;
  error_ = nullptr;
  done_.store(0, std::memory_order_relaxed);
  tag_ = (tag_ + 1) & ((1ull << (64 - 2 * kIndexBits)) - 1);
  if (tag_ == 0) tag_ = 1;  // tag 0 is the idle state workers start from
  {
    std::lock_guard<std::mutex> lock(mutex_);
    claim_.store(tag_ << (2 * kIndexBits) | uint64_t(n_tasks) << kIndexBits, std::memory_order_release);
  }
  wake_.notify_all();
  while (claim_and_run()) {
  }
  // Wait for tasks other threads still hold; yield the core when that takes long (another process may need it).
  for (int spin = 0; done_.load(std::memory_order_acquire) != n_tasks; ++spin) {
    if (spin < 4096) {
      STB_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
  if (error_) std::rethrow_exception(error_);
}

}  // namespace stb::cpu
