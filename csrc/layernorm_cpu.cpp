// LayerNorm(residual + Dropout(x + bias)) for CPU (fp32, AVX2 + FMA), forward and backward; the torch
// reference is xlmr_mp/kernels/ops.py:bias_dropout_add_layernorm_ref (an add, dropout's multiply, an
// add and F.layer_norm; backward: their autograd nodes and the bias column sum). One row of H floats
// stays in L1 between its passes: the sum and its mean, the centred variance, then the output; four
// rows are in flight at a time.
// Backward per row: xhat = (y - mean) rstd, g = grad * weight,
//   dresidual = rstd (g - mean(g) - xhat mean(g xhat)),  dx = dresidual * keep,
// and the column sums dweight = sum grad xhat, dln_bias = sum grad, dbias = sum dx over fixed blocks.
#include "layernorm_cpu.h"

#include <cmath>
#include <vector>

#include "cpu_target_begin.h"
#if XLMR_MP_AVX2

namespace xlmr_mp {
namespace {

using namespace cpu;

constexpr int64_t kRowBlock = 64;          // rows per partial column sum
constexpr int64_t kMinParallel = 1 << 15;  // elements below which one thread does it all

// Lanes [0, n) of an 8-float vector, n in [0, 8].
inline __m256i lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

// With TAIL (H % 8 != 0) the last vector of a row is masked: loads give 0 there, stores skip it.
template <bool TAIL>
inline __m256 load(const float* p, int64_t c, int64_t cols, __m256i tail) {
  return !TAIL || c + W <= cols ? _mm256_loadu_ps(p + c) : _mm256_maskload_ps(p + c, tail);
}

template <bool TAIL>
inline void store(float* p, int64_t c, int64_t cols, __m256i tail, __m256 v) {
  if (!TAIL || c + W <= cols) _mm256_storeu_ps(p + c, v);
  else _mm256_maskstore_ps(p + c, tail, v);
}

template <bool TAIL>
inline __m256 keep_lanes(__m256 v, int64_t c, int64_t cols, __m256i tail) {
  return !TAIL || c + W <= cols ? v : _mm256_and_ps(v, _mm256_castsi256_ps(tail));
}

// R rows at a time: a row's passes are chains of dependent adds (and a horizontal sum, a square
// root and a division between them), so R independent rows in flight keep the FMA units busy.
template <bool TAIL, int R>
inline void forward_group(const float* x, const float* bias, const float* residual, const float* keep,
                          const float* weight, const float* ln_bias, float eps, int64_t r0, int64_t cols, float* out,
                          float* y, float* mean, float* rstd, __m256i tail, float inv_cols) {
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  // y = residual + keep * (x + bias) in fp32. The compiler may contract the multiply and the add into
  // one fused multiply-add (one rounding instead of two), so y can differ from the reference's in the
  // last bit.
  for (int64_t c = 0; c < cols; c += W) {
    const __m256 bv = bias ? load<TAIL>(bias, c, cols, tail) : _mm256_setzero_ps();
    for (int i = 0; i < R; ++i) {
      const int64_t o = (r0 + i) * cols;
      __m256 v = load<TAIL>(x + o, c, cols, tail);
      if (bias) v = _mm256_add_ps(v, bv);
      if (keep) v = _mm256_mul_ps(v, load<TAIL>(keep + o, c, cols, tail));
      v = _mm256_add_ps(load<TAIL>(residual + o, c, cols, tail), v);
      store<TAIL>(y + o, c, cols, tail, v);
      acc[i] = _mm256_add_ps(acc[i], keep_lanes<TAIL>(v, c, cols, tail));
    }
  }
  __m256 muv[R], sq[R];
  for (int i = 0; i < R; ++i) {
    mean[r0 + i] = hsum(acc[i]) * inv_cols;
    muv[i] = _mm256_set1_ps(mean[r0 + i]);
    sq[i] = _mm256_setzero_ps();
  }
  for (int64_t c = 0; c < cols; c += W)
    for (int i = 0; i < R; ++i) {
      const __m256 d = keep_lanes<TAIL>(_mm256_sub_ps(load<TAIL>(y + (r0 + i) * cols, c, cols, tail), muv[i]), c, cols, tail);
      sq[i] = _mm256_fmadd_ps(d, d, sq[i]);
    }
  __m256 rsv[R];
  for (int i = 0; i < R; ++i) {
    rstd[r0 + i] = 1.0f / std::sqrt(hsum(sq[i]) * inv_cols + eps);
    rsv[i] = _mm256_set1_ps(rstd[r0 + i]);
  }
  for (int64_t c = 0; c < cols; c += W) {
    const __m256 wv = load<TAIL>(weight, c, cols, tail), bv = load<TAIL>(ln_bias, c, cols, tail);
    for (int i = 0; i < R; ++i) {
      const int64_t o = (r0 + i) * cols;
      const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load<TAIL>(y + o, c, cols, tail), muv[i]), rsv[i]);
      store<TAIL>(out + o, c, cols, tail, _mm256_fmadd_ps(xhat, wv, bv));
    }
  }
}

template <bool TAIL>
void forward_rows(const float* x, const float* bias, const float* residual, const float* keep, const float* weight,
                  const float* ln_bias, float eps, int64_t rows, int64_t cols, float* out, float* y, float* mean,
                  float* rstd, int threads) {
  const int use = rows * cols >= kMinParallel ? threads : 1;
  const __m256i tail = lane_mask(cols % W);
  const float inv_cols = 1.0f / static_cast<float>(cols);
  parallel_range((rows + 3) / 4, use, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t r0 = g * 4;
      if (r0 + 4 <= rows) {
        forward_group<TAIL, 4>(x, bias, residual, keep, weight, ln_bias, eps, r0, cols, out, y, mean, rstd, tail, inv_cols);
      } else {
        for (int64_t r = r0; r < rows; ++r)
          forward_group<TAIL, 1>(x, bias, residual, keep, weight, ln_bias, eps, r, cols, out, y, mean, rstd, tail, inv_cols);
      }
    }
  });
}

// Backward of R rows at a time; pw, pb, px are this block's column partial sums (dweight, dln_bias,
// dbias), added to in row order within each group, groups in order: fixed by the block, so the same
// bits at every thread count.
template <bool TAIL, int R>
inline void backward_group(const float* grad, const float* y, const float* keep, const float* weight,
                           const float* mean, const float* rstd, int64_t r0, int64_t cols, float* dresidual, float* dx,
                           float* pw, float* pb, float* px, __m256i tail, float inv_cols) {
  __m256 muv[R], rsv[R], sg[R], sgx[R];
  for (int i = 0; i < R; ++i) {
    muv[i] = _mm256_set1_ps(mean[r0 + i]);
    rsv[i] = _mm256_set1_ps(rstd[r0 + i]);
    sg[i] = sgx[i] = _mm256_setzero_ps();  // sum g, sum g * xhat (masked-off tail lanes load as 0)
  }
  for (int64_t c = 0; c < cols; c += W) {
    const __m256 wv = load<TAIL>(weight, c, cols, tail);
    __m256 accw = _mm256_loadu_ps(pw + c), accb = _mm256_loadu_ps(pb + c);
    for (int i = 0; i < R; ++i) {
      const int64_t o = (r0 + i) * cols;
      const __m256 gr = load<TAIL>(grad + o, c, cols, tail);
      const __m256 xhat = keep_lanes<TAIL>(_mm256_mul_ps(_mm256_sub_ps(load<TAIL>(y + o, c, cols, tail), muv[i]), rsv[i]),
                                           c, cols, tail);
      const __m256 g = _mm256_mul_ps(gr, wv);
      sg[i] = _mm256_add_ps(sg[i], g);
      sgx[i] = _mm256_fmadd_ps(g, xhat, sgx[i]);
      accw = _mm256_fmadd_ps(gr, xhat, accw);
      accb = _mm256_add_ps(gr, accb);
    }
    _mm256_storeu_ps(pw + c, accw);
    _mm256_storeu_ps(pb + c, accb);
  }
  __m256 m1[R], m2[R];
  for (int i = 0; i < R; ++i) {
    m1[i] = _mm256_set1_ps(hsum(sg[i]) * inv_cols);
    m2[i] = _mm256_set1_ps(hsum(sgx[i]) * inv_cols);
  }
  for (int64_t c = 0; c < cols; c += W) {
    const __m256 wv = load<TAIL>(weight, c, cols, tail);
    __m256 accx = px ? _mm256_loadu_ps(px + c) : _mm256_setzero_ps();
    for (int i = 0; i < R; ++i) {
      const int64_t o = (r0 + i) * cols;
      const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load<TAIL>(y + o, c, cols, tail), muv[i]), rsv[i]);
      const __m256 g = _mm256_mul_ps(load<TAIL>(grad + o, c, cols, tail), wv);
      const __m256 dr = _mm256_mul_ps(rsv[i], _mm256_sub_ps(_mm256_sub_ps(g, m1[i]), _mm256_mul_ps(xhat, m2[i])));
      store<TAIL>(dresidual + o, c, cols, tail, dr);
      const __m256 d = keep ? _mm256_mul_ps(dr, load<TAIL>(keep + o, c, cols, tail)) : dr;
      if (dx) store<TAIL>(dx + o, c, cols, tail, d);
      if (px) accx = _mm256_add_ps(keep_lanes<TAIL>(d, c, cols, tail), accx);
    }
    if (px) _mm256_storeu_ps(px + c, accx);
  }
}

template <bool TAIL>
void backward_rows(const float* grad, const float* y, const float* keep, const float* weight, const float* mean,
                   const float* rstd, int64_t rows, int64_t cols, float* dresidual, float* dx, float* dweight,
                   float* dln_bias, float* dbias, int threads) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t padded = (cols + W - 1) / W * W;        // partial rows padded so every store is whole
  const int nsum = dbias ? 3 : 2;
  std::vector<float> partial(static_cast<size_t>(blocks * nsum * padded), 0.0f);
  const int use = rows * cols >= kMinParallel ? threads : 1;
  const __m256i tail = lane_mask(cols % W);
  const float inv_cols = 1.0f / static_cast<float>(cols);
  parallel_range(blocks, use, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      float* pw = partial.data() + blk * nsum * padded;  // dweight, dln_bias, dbias partials of this block
      float* pb = pw + padded;
      float* px = nsum == 3 ? pb + padded : nullptr;
      const int64_t r1 = std::min(rows, (blk + 1) * kRowBlock);
      int64_t r = blk * kRowBlock;
      for (; r + 4 <= r1; r += 4)
        backward_group<TAIL, 4>(grad, y, keep, weight, mean, rstd, r, cols, dresidual, dx, pw, pb, px, tail, inv_cols);
      for (; r < r1; ++r)
        backward_group<TAIL, 1>(grad, y, keep, weight, mean, rstd, r, cols, dresidual, dx, pw, pb, px, tail, inv_cols);
    }
  });
  float* sums[3] = {dweight, dln_bias, dbias};
  for (int s = 0; s < nsum; ++s) {
    for (int64_t c = 0; c < cols; ++c) sums[s][c] = 0.0f;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const float* part = partial.data() + (blk * nsum + s) * padded;
      for (int64_t c = 0; c < cols; ++c) sums[s][c] += part[c];
    }
  }
}

}  // namespace

void bias_dropout_add_layernorm_forward(const float* x, const float* bias, const float* residual, const float* keep,
                                        const float* weight, const float* ln_bias, float eps, int64_t rows,
                                        int64_t cols, float* out, float* y, float* mean, float* rstd, int threads) {
  (cols % W ? forward_rows<true> : forward_rows<false>)(x, bias, residual, keep, weight, ln_bias, eps, rows, cols, out,
                                                        y, mean, rstd, threads);
}

void bias_dropout_add_layernorm_backward(const float* grad, const float* y, const float* keep, const float* weight,
                                         const float* mean, const float* rstd, int64_t rows, int64_t cols,
                                         float* dresidual, float* dx, float* dweight, float* dln_bias, float* dbias,
                                         int threads) {
  (cols % W ? backward_rows<true> : backward_rows<false>)(grad, y, keep, weight, mean, rstd, rows, cols, dresidual, dx,
                                                          dweight, dln_bias, dbias, threads);
}

}  // namespace xlmr_mp

#include "cpu_target_end.h"

#else  // not x86-64 (or -DXLMR_MP_NO_X86_KERNELS): no kernel; the model uses the torch reference

#include <stdexcept>

void xlmr_mp::bias_dropout_add_layernorm_forward(const float*, const float*, const float*, const float*, const float*,
                                                 const float*, float, int64_t, int64_t, float*, float*, float*, float*,
                                                 int) {
  throw std::runtime_error("bias_dropout_add_layernorm_forward: built without the x86-64 AVX2 kernel");
}

void xlmr_mp::bias_dropout_add_layernorm_backward(const float*, const float*, const float*, const float*, const float*,
                                                  const float*, int64_t, int64_t, float*, float*, float*, float*,
                                                  float*, int) {
  throw std::runtime_error("bias_dropout_add_layernorm_backward: built without the x86-64 AVX2 kernel");
}

#endif
