// Fused multi-head self-attention for CPU (fp32, AVX2 + FMA), forward and backward, over the fused
// QKV projection's output; the torch reference is scaled_dot_product_attention (the autograd
// wrapper and the dispatch are xlmr_mp/kernels/attention_cpu.py). Per (batch, head): K^T copied
// once (8 x 8 register transposes), query rows in blocks of 24 through scores -> softmax -> P V while
// they are hot in L1, the probabilities kept for the backward (so it is meant for short sequences:
// S x S floats a head). The small GEMMs are small_gemm_avx2.h's register-blocked 6 x 16 tiles of FMAs
// over broadcast A and contiguous B rows.
#include "attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_target_begin.h"
#if XLMR_MP_AVX2
#include "small_gemm_avx2.h"

namespace xlmr_mp {
namespace {

using namespace cpu;

// C [M x N] = alpha * A B (+ colbias): small_gemm_avx2.h's tiles.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ai, int64_t ak, const float* B, int64_t ldb,
                 float* C, int64_t ldc, float alpha, const float* colbias) {
  small_gemm<false>(M, N, K, A, ai, ak, B, ldb, C, ldc, alpha, colbias);
}

// In-place softmax of each of the M rows of length S (row stride S).
void softmax_rows(float* P, int64_t M, int64_t S) {
  for (int64_t i = 0; i < M; ++i) {
    float* row = P + i * S;
    scale_row(row, S, 1.f / exp_sub_sum(row, S, row_max(row, S)));
  }
}

}  // namespace

void attention_forward(const AttentionShape& s, const float* qkv, const float* key_bias, float scale,
                       float* out, float* probs, int threads) {
  const int64_t S = s.seq, D = s.head_dim, NH = s.heads;
  const int64_t ss = NH * 3 * D, so = NH * D;
  parallel_range(s.batch * NH, threads, [&](int64_t lo, int64_t hi) {
    std::vector<float> kT(static_cast<size_t>(D * S));
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / NH, h = bh % NH;
      const float* q = qkv + b * S * ss + h * 3 * D;
      const float* k = q + D;
      const float* v = q + 2 * D;
      transpose(k, S, D, ss, kT.data(), S);
      float* P = probs + bh * S * S;
      const float* kb = key_bias ? key_bias + b * S : nullptr;
      float* o = out + b * S * so + h * D;
      // blocks of query rows, hot in L1 from scores through softmax to P V
      for (int64_t i0 = 0; i0 < S; i0 += 24) {
        const int64_t m = std::min<int64_t>(24, S - i0);
        gemm(m, S, D, q + i0 * ss, ss, 1, kT.data(), S, P + i0 * S, S, scale, kb);
        softmax_rows(P + i0 * S, m, S);
        gemm(m, D, S, P + i0 * S, S, 1, v, ss, o + i0 * so, so, 1.f, nullptr);
      }
    }
  });
}

void attention_backward(const AttentionShape& s, const float* qkv, const float* probs, const float* out,
                        const float* grad_out, float scale, float* grad_qkv, int threads) {
  const int64_t S = s.seq, D = s.head_dim, NH = s.heads;
  const int64_t ss = NH * 3 * D, so = NH * D;
  parallel_range(s.batch * NH, threads, [&](int64_t lo, int64_t hi) {
    std::vector<float> vT(static_cast<size_t>(D * S)), ds(static_cast<size_t>(S * S)), delta(static_cast<size_t>(S));
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / NH, h = bh % NH;
      const float* q = qkv + b * S * ss + h * 3 * D;
      const float* k = q + D;
      const float* v = q + 2 * D;
      const float* P = probs + bh * S * S;
      const float* dO = grad_out + b * S * so + h * D;
      const float* O = out + b * S * so + h * D;
      float* gq = grad_qkv + b * S * ss + h * 3 * D;
      transpose(v, S, D, ss, vT.data(), S);
      for (int64_t i = 0; i < S; ++i) delta[i] = dot(dO + i * so, O + i * so, D);  // sum_j P_ij dP_ij = dO_i . O_i
      gemm(S, D, S, P, 1, S, dO, so, gq + 2 * D, ss, 1.f, nullptr);          // dV = P^T dO
      gemm(S, S, D, dO, so, 1, vT.data(), S, ds.data(), S, 1.f, nullptr);    // dP = dO V^T
      for (int64_t i = 0; i < S; ++i) {                                       // dS = scale P (dP - delta)
        const float* pr = P + i * S;
        float* dr = ds.data() + i * S;
        const __m256 vd = _mm256_set1_ps(delta[i]), vsc = _mm256_set1_ps(scale);
        int64_t j = 0;
        for (; j + W <= S; j += W)
          _mm256_storeu_ps(dr + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(pr + j), vsc),
                                                 _mm256_sub_ps(_mm256_loadu_ps(dr + j), vd)));
        for (; j < S; ++j) dr[j] = pr[j] * scale * (dr[j] - delta[i]);
      }
      gemm(S, D, S, ds.data(), S, 1, k, ss, gq, ss, 1.f, nullptr);           // dQ = dS K
      gemm(S, D, S, ds.data(), 1, S, q, ss, gq + D, ss, 1.f, nullptr);       // dK = dS^T Q
    }
  });
}

}  // namespace xlmr_mp

#include "cpu_target_end.h"

#else  // not x86-64 (or -DXLMR_MP_NO_X86_KERNELS): no kernel; the model uses scaled_dot_product_attention

#include <stdexcept>

void xlmr_mp::attention_forward(const AttentionShape&, const float*, const float*, float, float*, float*, int) {
  throw std::runtime_error("attention_forward: built without the x86-64 AVX2 kernel");
}

void xlmr_mp::attention_backward(const AttentionShape&, const float*, const float*, const float*, const float*,
                                 float, float*, int) {
  throw std::runtime_error("attention_backward: built without the x86-64 AVX2 kernel");
}

#endif
