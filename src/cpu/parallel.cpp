// The CPU backend's parallel-for: a small persistent worker pool, or the host framework's pool
// when one is installed with set_cpu_parallel_for (the PyTorch binding installs at::parallel_for
// so modnorm shares torch's threads and honours torch.set_num_threads).
//
// Results never depend on how tasks land on threads: every caller splits its work into a fixed
// number of tasks that depends only on the problem's shape, and reduces their partials in order.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "../backend.h"

namespace modnorm {
namespace {

std::atomic<ParallelForFn> g_parallel_for{nullptr};

class WorkerPool {
 public:
  static WorkerPool& instance() {
    static WorkerPool pool;
    return pool;
  }

  void run(int64_t n, void* ctx, ParallelBody body) {
    if (workers_.empty() || n <= 1) {
      if (n > 0) body(ctx, 0, n);
      return;
    }
    std::lock_guard<std::mutex> one_region(region_mutex_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      n_ = n;
      ctx_ = ctx;
      body_ = body;
      next_.store(0);
      busy_ = workers_.size();
      ++generation_;
    }
    wake_.notify_all();
    drain();  // the calling thread works too
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
  }

 private:
  WorkerPool() {
    int threads = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("MODNORM_NUM_THREADS")) threads = std::atoi(env);
    threads = std::max(1, threads);
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void drain() {
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) body_(ctx_, i, i + 1);
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex region_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::atomic<int64_t> next_{0};
  int64_t n_ = 0;
  void* ctx_ = nullptr;
  ParallelBody body_ = nullptr;
  size_t busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace

void set_cpu_parallel_for(ParallelForFn fn) { g_parallel_for.store(fn); }

namespace detail {
void parallel_for(int64_t n, void* ctx, ParallelBody body) {
  if (n <= 0) return;
  if (ParallelForFn fn = g_parallel_for.load()) {
    fn(n, ctx, body);
  } else {
    WorkerPool::instance().run(n, ctx, body);
  }
}
}  // namespace detail

}  // namespace modnorm
