// parallel_range: how the CPU kernels and the C++ layer split work over threads (no AVX2 needed,
// so code outside the kernels' target regions can use it too).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#else
#include <thread>
#endif

namespace xlmr_mp {
namespace cpu {

// Runs f(lo, hi) over [0, n) split in `threads` contiguous ranges (the calling thread takes one).
// Built with OpenMP (setup.py, on Linux) the ranges run on the process's OpenMP team: torch's own
// intra-op pool (torch loads libgomp.so.1 first and this module resolves to that same runtime), so
// the kernels share its threads. The std::thread fallback spawns threads per call; those compete
// with torch's OpenMP workers still spinning after the previous op, so a kernel runs measurably slower
// there than on the OpenMP team (bench/results/README.md, Attention).
template <typename F>
void parallel_range(int64_t n, int threads, F f) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (threads == 1) { f(0, n); return; }
  const int64_t per = (n + threads - 1) / threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    // The split is fixed by `threads`; a smaller team (nested, or limited) takes several ranges each.
    for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) {
      const int64_t lo = t * per, hi = std::min(n, lo + per);
      if (lo < hi) f(lo, hi);
    }
  }
#else
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    const int64_t lo = t * per, hi = std::min(n, lo + per);
    if (lo < hi) pool.emplace_back([=] { f(lo, hi); });
  }
  f(0, std::min(n, per));
  for (auto& th : pool) th.join();
#endif
}

}  // namespace cpu
}  // namespace xlmr_mp
