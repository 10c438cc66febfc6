// AVX2 + FMA helpers shared by the CPU kernels (attention_cpu.cpp, bias_gelu_cpu.cpp). Include it
// inside a region compiled for avx2,fma (the kernels' target pragmas), after <immintrin.h>.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_parallel.h"  // parallel_range

namespace xlmr_mp {
namespace cpu {

constexpr int W = 8;  // floats per __m256

// exp(x) for x <= 0 (softmax arguments after the row max is subtracted), ~1 ulp in [-87, 0]:
// Cephes' expf range reduction and degree-5 polynomial; below -87 it flushes to 0.
inline __m256 exp_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(below, y);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The softmax row passes shared by the attention and cross-entropy kernels: the row's max; the row
// replaced by exp(row - m), returning the sum; the row scaled by s.
inline float row_max(const float* row, int64_t n) {
  __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + j));
  float m = hmax(vm);
  for (; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

inline float exp_sub_sum(float* row, int64_t n, float m) {
  const __m256 vmm = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  float s = 0.f;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(row + j), vmm));
    _mm256_storeu_ps(row + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  for (; j < n; ++j) { row[j] = std::exp(row[j] - m); s += row[j]; }
  return s + hsum(vs);
}

inline void scale_row(float* row, int64_t n, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + W <= n; j += W) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), vs));
  for (; j < n; ++j) row[j] *= s;
}

}  // namespace cpu
}  // namespace xlmr_mp
