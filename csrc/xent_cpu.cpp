// Softmax cross-entropy rows with their gradient in place, for CPU (fp32, AVX2 + FMA); reference:
// the torch sequence in xlmr_mp/parallel/vocab.py (_ChunkedMaskedLMLoss, TP = 1). Three passes over
// a row that stays in L1/L2 (max; exp and sum, the exponentials stored; scale and subtract the
// one-hot), where the reference runs eight aten ops over the whole [M, V] block.
#include "xent_cpu.h"

#include <cmath>

#include "cpu_target_begin.h"
#if XLMR_MP_AVX2

namespace xlmr_mp {

using namespace cpu;

void xent_rows(float* logits, const int64_t* target, float* loss, int64_t M, int64_t V, int threads) {
  if (static_cast<int64_t>(M) * V < (1 << 15)) threads = 1;
  parallel_range(M, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float* row = logits + i * V;
      const float m = row_max(row, V);
      const int64_t t = target[i];
      const bool inside = t >= 0 && t < V;
      const float lt = inside ? row[t] - m : 0.f;
      const float s = exp_sub_sum(row, V, m);
      loss[i] = std::log(s) - lt;
      scale_row(row, V, 1.f / s);
      if (inside) row[t] -= 1.f;
    }
  });
}

}  // namespace xlmr_mp

#include "cpu_target_end.h"

#else  // not x86-64 (or -DXLMR_MP_NO_X86_KERNELS): no kernel; the loss uses the torch sequence

#include <stdexcept>

void xlmr_mp::xent_rows(float*, const int64_t*, float*, int64_t, int64_t, int) {
  throw std::runtime_error("xent_rows: built without the x86-64 AVX2 kernel");
}

#endif
