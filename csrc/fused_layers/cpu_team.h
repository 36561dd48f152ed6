// A team of threads for the CPU kernels that split one small product many times
// a second (a decoding step runs ~20 of them in well under a millisecond).
//
// Starting threads, or waking sleeping ones, per product would cost as much as
// the product, and torch's OpenMP pool cannot be used by the model workers: a
// process forked from one that ran an OpenMP team hangs when it starts its own
// (GNU libgomp is not fork-safe). So the team is plain std::threads owned by
// this extension: the caller publishes a job by bumping an epoch counter, the
// helpers spin on it (with `pause`) for a short while after each job and only
// then sleep on a condition variable, so back-to-back jobs cost a cache-line
// round trip (~1 us) and an idle team costs nothing. A team found in a forked
// child (whose helper threads do not exist there) is abandoned and rebuilt.
#pragma once

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace realhf {

class CpuTeam {
 public:
  // The process's team of ``n_threads`` (the caller counts as one), built on first use.
  static CpuTeam& of_size(int n_threads) {
    static CpuTeam* team = nullptr;
    static std::mutex guard;
    std::lock_guard<std::mutex> lock(guard);
    if (team == nullptr || team->pid_ != getpid() || team->size() != n_threads) {
      // A team of this process with another size is retired (its helpers exit);
      // one inherited through fork has no threads here and is simply dropped.
      if (team != nullptr && team->pid_ == getpid()) delete team;
      team = new CpuTeam(n_threads);
    }
    return *team;
  }

  int size() const { return static_cast<int>(helpers_.size()) + 1; }

  // Runs fn(i) for i in [0, size()) at the same time, i == 0 on the calling
  // thread, and returns when all have returned. The first exception thrown by
  // any of them is rethrown here. Not reentrant: one caller at a time.
  void run(const std::function<void(int)>& fn) {
    if (helpers_.empty()) return fn(0);
    job_ = &fn;
    error_ = nullptr;
    finished_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    call(0);
    const int n = static_cast<int>(helpers_.size());
    while (finished_.load(std::memory_order_acquire) != n) pause();
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  ~CpuTeam() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      epoch_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& t : helpers_) t.join();
  }

 private:
  // How long a helper keeps spinning for the next job before it sleeps: longer
  // than the Python between two decoding steps (sampling, bookkeeping).
  static constexpr std::chrono::microseconds kSpin{2000};

  explicit CpuTeam(int n_threads) : pid_(getpid()) {
    for (int i = 1; i < n_threads; ++i) helpers_.emplace_back([this, i] { loop(i); });
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  void call(int i) {
    try {
      (*job_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void loop(int i) {
    uint64_t seen = 0;  // the epoch at construction: a job published before this thread ran is still seen
    while (true) {
      uint64_t now = epoch_.load(std::memory_order_acquire);
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int n = 0; now == seen; ++n) {
        pause();
        now = epoch_.load(std::memory_order_acquire);
        if ((n & 255) == 255 && now == seen && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          wake_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          now = epoch_.load(std::memory_order_acquire);
        }
      }
      seen = now;
      if (stop_) return;
      call(i);
      finished_.fetch_add(1, std::memory_order_release);
    }
  }

  const pid_t pid_;
  std::vector<std::thread> helpers_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> finished_{0};
  std::atomic<int> sleepers_{0};
  std::mutex mu_;
  std::condition_variable wake_;
  const std::function<void(int)>* job_ = nullptr;
  std::exception_ptr error_;
  bool stop_ = false;
};

// Splits [0, n) into ``parts`` contiguous parts; part i is [begin, end) (empty when n < parts).
inline void team_part(int64_t n, int i, int parts, int64_t* begin, int64_t* end) {
  *begin = n * i / parts;
  *end = n * (i + 1) / parts;
}

}  // namespace realhf
