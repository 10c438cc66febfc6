// The post-LN encoder layer as two C++ calls (encoder_layer_cpu.h):
//
//   qkv = x Wqkv^T + bqkv                        ctx, probs = attention(qkv, key_bias)
//   y1  = x + keep_a * (ctx Wo^T + bo)           h1  = LN1(y1)
//   f1  = h1 W1^T                                act = gelu(f1 + b1)
//   y2  = h1 + keep_f * (act W2^T + b2)          out = LN2(y2)
//
// and the backward, written out as xlmr_mp/kernels/encoder_layer_cpu.py's node did it in Python:
// the same GEMMs (torch's own BLAS sgemm, so each product has torch.mm's bits) and the same AVX2
// kernels, with no Python, tensor allocation or autograd bookkeeping between them. A residual
// gradient is the output the branch's input-gradient GEMM accumulates into (beta = 1), as
// torch.addmm(residual, a, b) computes it.
#include "encoder_layer_cpu.h"

#include <cmath>
#include <stdexcept>

#include "attention_cpu.h"
#include "bias_gelu_cpu.h"
#include "blas_cpu.h"
#include "layernorm_cpu.h"

namespace xlmr_mp {
namespace {

struct Workspace {
  float *qkv, *probs, *ctx, *y1, *h1, *f1, *act, *y2, *mean1, *rstd1, *mean2, *rstd2;
};

template <typename P>
Workspace carve(const LayerShape& s, P ws) {
  const int64_t T = s.batch * s.seq, H = s.hidden, F = s.ffn;
  float* p = const_cast<float*>(ws);
  Workspace w;
  w.qkv = p;    p += T * 3 * H;
  w.probs = p;  p += s.batch * s.heads * s.seq * s.seq;
  w.ctx = p;    p += T * H;
  w.y1 = p;     p += T * H;
  w.h1 = p;     p += T * H;
  w.f1 = p;     p += T * F;
  w.act = p;    p += T * F;
  w.y2 = p;     p += T * H;
  w.mean1 = p;  p += T;
  w.rstd1 = p;  p += T;
  w.mean2 = p;  p += T;
  w.rstd2 = p;
  return w;
}

void check(const LayerShape& s) {
  require_blas("encoder_layer");
  if (s.heads < 1 || s.hidden % s.heads) throw std::invalid_argument("encoder_layer: hidden % heads != 0");
  const int64_t T = s.batch * s.seq;
  if (T * 3 * s.hidden >= (int64_t(1) << 31) || T * s.ffn >= (int64_t(1) << 31))
    throw std::invalid_argument("encoder_layer: a matrix over 2^31 elements (LP64 BLAS)");
}

}  // namespace

int64_t layer_workspace_floats(const LayerShape& s) {
  const int64_t T = s.batch * s.seq, H = s.hidden, F = s.ffn;
  return T * 3 * H + s.batch * s.heads * s.seq * s.seq + 5 * T * H + 2 * T * F + 4 * T;
}

void encoder_layer_forward(const LayerShape& s, const float* x, const float* key_bias, const LayerParams& p,
                           const float* keep_a, const float* keep_f, float eps, float* ws, float* out, int threads) {
  check(s);
  const int64_t T = s.batch * s.seq, H = s.hidden, F = s.ffn, D = H / s.heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttentionShape as{s.batch, s.seq, s.heads, D};
  Workspace w = carve(s, ws);
  Scratch branch_buf(static_cast<size_t>(T * H), 0);
  float* branch = branch_buf.data();
  fill_rows(w.qkv, p.b_qkv, T, 3 * H);
  gemm(false, true, T, 3 * H, H, x, H, p.w_qkv, H, 1.0f, w.qkv, 3 * H);
  attention_forward(as, w.qkv, key_bias, scale, w.ctx, w.probs, threads);
  gemm(false, true, T, H, H, w.ctx, H, p.w_o, H, 0.0f, branch, H);
  bias_dropout_add_layernorm_forward(branch, p.b_o, x, keep_a, p.g1, p.beta1, eps, T, H, w.h1, w.y1, w.mean1,
                                     w.rstd1, threads);
  gemm(false, true, T, F, H, w.h1, H, p.w_1, H, 0.0f, w.f1, F);
  bias_gelu_forward(w.f1, p.b_1, w.act, T, F, threads);
  gemm(false, true, T, H, F, w.act, F, p.w_2, F, 0.0f, branch, H);
  bias_dropout_add_layernorm_forward(branch, p.b_2, w.h1, keep_f, p.g2, p.beta2, eps, T, H, out, w.y2, w.mean2,
                                     w.rstd2, threads);
}

void encoder_layer_backward(const LayerShape& s, const float* grad_out, const float* x, const LayerParams& p,
                            const float* keep_a, const float* keep_f, const float* ws, float* dx,
                            const LayerGrads& g, int threads) {
  check(s);
  const int64_t T = s.batch * s.seq, H = s.hidden, F = s.ffn, D = H / s.heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttentionShape as{s.batch, s.seq, s.heads, D};
  const Workspace w = carve(s, ws);
  // scratch: d branch [T, H] | d h1 [T, H] | d act [T, F] | d f1 [T, F] | d ctx [T, H] | d qkv [T, 3H]
  Scratch dbr_buf(static_cast<size_t>(T * (6 * H + 2 * F)), 0);
  float* dbr = dbr_buf.data();
  float* dh1 = dbr + T * H;
  float* dact = dh1 + T * H;
  float* df1 = dact + T * F;
  float* dctx = df1 + T * F;
  float* dqkv = dctx + T * H;
  // FFN sublayer: out = LN2(h1 + keep_f * (act W2^T + b2)); d h1 starts as the residual's gradient
  bias_dropout_add_layernorm_backward(grad_out, w.y2, keep_f, p.g2, w.mean2, w.rstd2, T, H, dh1, dbr, g.g2,
                                      g.beta2, g.b_2, threads);
  gemm(true, false, H, F, T, dbr, H, w.act, F, 0.0f, g.w_2, F);        // dW2 = dbr^T act
  gemm(false, false, T, F, H, dbr, H, p.w_2, F, 0.0f, dact, F);        // d act = dbr W2
  bias_gelu_backward(dact, w.f1, p.b_1, df1, g.b_1, T, F, threads);
  gemm(true, false, F, H, T, df1, F, w.h1, H, 0.0f, g.w_1, H);         // dW1 = df1^T h1
  gemm(false, false, T, H, F, df1, F, p.w_1, H, 1.0f, dh1, H);         // d h1 += df1 W1
  // attention sublayer: h1 = LN1(x + keep_a * (ctx Wo^T + bo)); dx starts as the residual's gradient
  bias_dropout_add_layernorm_backward(dh1, w.y1, keep_a, p.g1, w.mean1, w.rstd1, T, H, dx, dbr, g.g1, g.beta1,
                                      g.b_o, threads);
  gemm(true, false, H, H, T, dbr, H, w.ctx, H, 0.0f, g.w_o, H);        // dWo = dbr^T ctx
  gemm(false, false, T, H, H, dbr, H, p.w_o, H, 0.0f, dctx, H);        // d ctx = dbr Wo
  attention_backward(as, w.qkv, w.probs, w.ctx, dctx, scale, dqkv, threads);
  column_sum(dqkv, T, 3 * H, g.b_qkv, false);
  gemm(true, false, 3 * H, H, T, dqkv, 3 * H, x, H, 0.0f, g.w_qkv, H);  // dWqkv = dqkv^T x
  gemm(false, false, T, H, 3 * H, dqkv, 3 * H, p.w_qkv, H, 1.0f, dx, H);  // dx += dqkv Wqkv
}

}  // namespace xlmr_mp
