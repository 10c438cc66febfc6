// Exact-GELU of x + bias for CPU (fp32, AVX2 + FMA), forward and backward in one pass each; the
// torch reference is xlmr_mp/kernels/ops.py:bias_gelu_ref (F.gelu(x + bias)). erf is Abramowitz &
// Stegun 7.1.26 (absolute error <= 1.5e-7), whose exp(-z^2 / 2) is also the backward's normal pdf.
// The bias gradient sums fixed blocks of rows and then the blocks in order, so it has the same bits
// at every thread count.
#include "bias_gelu_cpu.h"

#include <cmath>
#include <vector>

#include "cpu_target_begin.h"
#if XLMR_MP_AVX2

namespace xlmr_mp {
namespace {

using namespace cpu;

constexpr int64_t kRowBlock = 64;        // rows per partial bias-gradient sum
constexpr int64_t kMinParallel = 1 << 15;  // elements below which one thread does it all

// Phi(z) (the normal CDF) and exp(-z^2 / 2) for 8 lanes.
inline void cdf_and_gauss(__m256 z, __m256& cdf, __m256& gauss) {
  const __m256 sign = _mm256_and_ps(z, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), z), _mm256_set1_ps(0.70710678118654752f));
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  gauss = exp_nonpos(_mm256_mul_ps(_mm256_set1_ps(-1.0f), _mm256_mul_ps(a, a)));
  const __m256 erf_abs = _mm256_fnmadd_ps(p, gauss, _mm256_set1_ps(1.0f));   // erf(|z| / sqrt 2)
  cdf = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_xor_ps(erf_abs, sign)));
}

inline float cdf_scalar(float z) { return 0.5f * std::erfc(-z * 0.70710678118654752f); }

}  // namespace

void bias_gelu_forward(const float* x, const float* bias, float* y, int64_t rows, int64_t cols, int threads) {
  const int use = rows * cols >= kMinParallel ? threads : 1;
  parallel_range(rows, use, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = x + r * cols;
      float* yr = y + r * cols;
      int64_t c = 0;
      for (; c + W <= cols; c += W) {
        const __m256 z = _mm256_add_ps(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(bias + c));
        __m256 cdf, gauss;
        cdf_and_gauss(z, cdf, gauss);
        _mm256_storeu_ps(yr + c, _mm256_mul_ps(z, cdf));
      }
      for (; c < cols; ++c) {
        const float z = xr[c] + bias[c];
        yr[c] = z * cdf_scalar(z);
      }
    }
  });
}

void bias_gelu_backward(const float* grad, const float* x, const float* bias, float* dx, float* dbias,
                        int64_t rows, int64_t cols, int threads) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<float> partial(static_cast<size_t>(blocks * cols), 0.0f);
  const int use = rows * cols >= kMinParallel ? threads : 1;
  const __m256 inv_sqrt_2pi = _mm256_set1_ps(0.39894228040143268f);
  parallel_range(blocks, use, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      float* part = partial.data() + blk * cols;
      const int64_t r1 = std::min(rows, (blk + 1) * kRowBlock);
      for (int64_t r = blk * kRowBlock; r < r1; ++r) {
        const float* xr = x + r * cols;
        const float* gr = grad + r * cols;
        float* dr = dx + r * cols;
        int64_t c = 0;
        for (; c + W <= cols; c += W) {
          const __m256 z = _mm256_add_ps(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(bias + c));
          __m256 cdf, gauss;
          cdf_and_gauss(z, cdf, gauss);
          const __m256 d = _mm256_mul_ps(_mm256_loadu_ps(gr + c),
                                         _mm256_fmadd_ps(_mm256_mul_ps(z, gauss), inv_sqrt_2pi, cdf));
          _mm256_storeu_ps(dr + c, d);
          _mm256_storeu_ps(part + c, _mm256_add_ps(_mm256_loadu_ps(part + c), d));
        }
        for (; c < cols; ++c) {
          const float z = xr[c] + bias[c];
          const float d = gr[c] * (cdf_scalar(z) + z * 0.39894228040143268f * std::exp(-0.5f * z * z));
          dr[c] = d;
          part[c] += d;
        }
      }
    }
  });
  for (int64_t c = 0; c < cols; ++c) dbias[c] = 0.0f;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* part = partial.data() + blk * cols;
    for (int64_t c = 0; c < cols; ++c) dbias[c] += part[c];
  }
}

}  // namespace xlmr_mp

#include "cpu_target_end.h"

#else  // not x86-64 (or -DXLMR_MP_NO_X86_KERNELS): no kernel; the model uses the torch reference

#include <stdexcept>

void xlmr_mp::bias_gelu_forward(const float*, const float*, float*, int64_t, int64_t, int) {
  throw std::runtime_error("bias_gelu_forward: built without the x86-64 AVX2 kernel");
}

void xlmr_mp::bias_gelu_backward(const float*, const float*, const float*, float*, float*, int64_t, int64_t, int) {
  throw std::runtime_error("bias_gelu_backward: built without the x86-64 AVX2 kernel");
}

#endif
