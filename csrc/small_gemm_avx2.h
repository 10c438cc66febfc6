// Register-blocked fp32 GEMM for small products that a core keeps in its caches (AVX2 + FMA): the
// attention kernel's per-head products and the encoder layer's per-part products
// (small_gemm_cpu.h). Include it inside a region compiled for avx2,fma, after cpu_avx2.h.
//
// C(i, n) = alpha * sum_k A(i, k) B(k, n) [+ colbias(n)] [+ C(i, n) with ACC], A(i, k) = A[i * ai + k * ak]
// (broadcast, so A may be either orientation), B(k, :) = B + k * ldb (contiguous rows). Tiles of MR rows
// x NV vectors of 8 columns; the k loop runs in order (one FMA chain per output), no packing.
#pragma once

namespace xlmr_mp {
namespace cpu {

// One tile; with TAIL the last vector's lanes are `mask`'s (loads and stores past N masked off).
template <int MR, int NV, bool TAIL, bool ACC>
inline void gemm_tile(int64_t K, const float* A, int64_t ai, int64_t ak, const float* B, int64_t ldb, float* C,
                      int64_t ldc, float alpha, const float* colbias, __m256i mask) {
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) c[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      b[v] = (TAIL && v == NV - 1) ? _mm256_maskload_ps(B + k * ldb + v * W, mask) : _mm256_loadu_ps(B + k * ldb + v * W);
    const float* a = A + k * ak;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * ai);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(x, b[v], c[r][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const bool last = TAIL && v == NV - 1;
      float* dst = C + r * ldc + v * W;
      __m256 y = alpha == 1.f ? c[r][v] : _mm256_mul_ps(c[r][v], va);
      if (colbias) y = _mm256_add_ps(y, last ? _mm256_maskload_ps(colbias + v * W, mask) : _mm256_loadu_ps(colbias + v * W));
      if (ACC) y = _mm256_add_ps(last ? _mm256_maskload_ps(dst, mask) : _mm256_loadu_ps(dst), y);
      if (last) _mm256_maskstore_ps(dst, mask, y);
      else _mm256_storeu_ps(dst, y);
    }
}

// The strips of one row tile: 16 columns at a time, then 8, then the last N % 8 masked.
template <int MR, bool ACC>
inline void gemm_row_tile(int64_t N, int64_t K, const float* A, int64_t ai, int64_t ak, const float* B, int64_t ldb,
                          float* C, int64_t ldc, float alpha, const float* colbias, __m256i tail) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t n = 0;
  for (; n + 2 * W <= N; n += 2 * W)
    gemm_tile<MR, 2, false, ACC>(K, A, ai, ak, B + n, ldb, C + n, ldc, alpha, colbias ? colbias + n : nullptr, all);
  for (; n + W <= N; n += W)
    gemm_tile<MR, 1, false, ACC>(K, A, ai, ak, B + n, ldb, C + n, ldc, alpha, colbias ? colbias + n : nullptr, all);
  if (n < N)
    gemm_tile<MR, 1, true, ACC>(K, A, ai, ak, B + n, ldb, C + n, ldc, alpha, colbias ? colbias + n : nullptr, tail);
}

inline __m256i tail_mask(int64_t N) {
  alignas(32) int32_t lanes[W];
  for (int l = 0; l < W; ++l) lanes[l] = N % W && l < N % W ? -1 : 0;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
}

// The whole product, row tiles outer (a tile's MR x K of A stays in L1 while B streams from L2):
// 6 rows a tile (12 accumulators + 2 B vectors + 1 broadcast of the 16 ymm registers), then 4, 2, 1.
template <bool ACC>
inline void small_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ai, int64_t ak, const float* B,
                       int64_t ldb, float* C, int64_t ldc, float alpha, const float* colbias) {
  const __m256i tail = tail_mask(N);
  int64_t i = 0;
  for (; i + 6 <= M; i += 6)
    gemm_row_tile<6, ACC>(N, K, A + i * ai, ai, ak, B, ldb, C + i * ldc, ldc, alpha, colbias, tail);
  for (; i + 4 <= M; i += 4)
    gemm_row_tile<4, ACC>(N, K, A + i * ai, ai, ak, B, ldb, C + i * ldc, ldc, alpha, colbias, tail);
  for (; i + 2 <= M; i += 2)
    gemm_row_tile<2, ACC>(N, K, A + i * ai, ai, ak, B, ldb, C + i * ldc, ldc, alpha, colbias, tail);
  for (; i < M; ++i) gemm_row_tile<1, ACC>(N, K, A + i * ai, ai, ak, B, ldb, C + i * ldc, ldc, alpha, colbias, tail);
}

}  // namespace cpu
}  // namespace xlmr_mp
