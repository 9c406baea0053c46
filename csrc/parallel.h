// parallel_for: split [0, n) over up to num_threads std::threads (0 = the module default).
// Each index is processed by exactly one thread; the caller must not hold the GIL-protected objects.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lens_fast {

// The module-wide default (set_num_threads / get_num_threads in Python); 1 until changed.
int default_num_threads();
void set_default_num_threads(int n);

template <typename F>
void parallel_for(int64_t n, int num_threads, F&& body) {
  if (num_threads <= 0) num_threads = default_num_threads();
  const int64_t workers = std::min<int64_t>(std::max(num_threads, 1), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    try {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(n);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int64_t t = 1; t < workers; ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace lens_fast
