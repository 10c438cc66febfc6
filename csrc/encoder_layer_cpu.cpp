// The post-LN encoder layer as two C++ calls (encoder_layer_cpu.h):
//
//   qkv = x Wqkv^T + bqkv                        ctx, probs = attention(qkv, key_bias)
//   y1  = x + keep_a * (ctx Wo^T + bo)           h1  = LN1(y1)
//   f1  = h1 W1^T                                act = gelu(f1 + b1)
//   y2  = h1 + keep_f * (act W2^T + b2)          out = LN2(y2)
//
// and the backward, written out as xlmr_mp/kernels/encoder_layer_cpu.py's node did it in Python:
// the same GEMMs (torch's own BLAS sgemm, so each product has torch.mm's bits, or for small layers
// small_gemm's register tiles: see small_products) and the same AVX2 kernels, with no Python, tensor
// allocation or autograd bookkeeping between them. A residual gradient is the output the branch's
// input-gradient GEMM accumulates into (beta = 1), as torch.addmm(residual, a, b) computes it.
//
// With several threads a call is cut into parts, ranges of batch rows, one a thread (layer_parts):
// each part runs the whole layer on its rows with single-threaded kernels and GEMMs, so the call
// forks once instead of once per kernel and product. The backward's parts > 0 write their rows'
// parameter gradients into copies that are added to part 0's at the end.
#include "encoder_layer_cpu.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>

#include "attention_cpu.h"
#include "bias_gelu_cpu.h"
#include "blas_cpu.h"
#include "cpu_parallel.h"
#include "layernorm_cpu.h"
#include "small_gemm_cpu.h"

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

// The workspace from batch row b0 on: every array in it is [B, ...] row-major, so a range of batch
// rows is one contiguous piece of each.
Workspace from_row(const Workspace& w, const LayerShape& s, int64_t b0) {
  const int64_t r = b0 * s.seq, H = s.hidden, F = s.ffn;
  return Workspace{w.qkv + r * 3 * H, w.probs + b0 * s.heads * s.seq * s.seq, w.ctx + r * H, w.y1 + r * H,
                   w.h1 + r * H,      w.f1 + r * F,  w.act + r * F,  w.y2 + r * H,
                   w.mean1 + r,       w.rstd1 + r,   w.mean2 + r,    w.rstd2 + r};
}

const float* rows_of(const float* a, int64_t r, int64_t cols) { return a ? a + r * cols : nullptr; }

// The twelve tensors' sizes, in LayerTensors order, and the members to walk them by.
constexpr float* LayerGrads::*kGradMembers[12] = {
    &LayerGrads::w_qkv, &LayerGrads::b_qkv, &LayerGrads::w_o, &LayerGrads::b_o, &LayerGrads::g1, &LayerGrads::beta1,
    &LayerGrads::w_1,   &LayerGrads::b_1,   &LayerGrads::w_2, &LayerGrads::b_2, &LayerGrads::g2, &LayerGrads::beta2};

std::array<int64_t, 12> param_sizes(const LayerShape& s) {
  const int64_t H = s.hidden, F = s.ffn;
  return {3 * H * H, 3 * H, H * H, H, H, H, F * H, F, H * F, H, H, H};
}

int64_t param_floats(const LayerShape& s) {
  int64_t n = 0;
  for (int64_t v : param_sizes(s)) n += v;
  return n;
}

// Gradients laid out one after another in `buf` (param_floats floats).
LayerGrads grads_in(const LayerShape& s, float* buf) {
  LayerGrads g{};
  const auto sizes = param_sizes(s);
  for (int i = 0; i < 12; ++i) {
    g.*kGradMembers[i] = buf;
    buf += sizes[i];
  }
  return g;
}

// Parts the batch is cut into, one a thread. A part runs every layer of the call on its batch rows
// with single-threaded kernels and GEMMs (MKL runs sequentially inside an OpenMP region), so a call
// has one fork and join instead of one per kernel and GEMM (about 25 a layer), and each GEMM keeps
// a core's full speed (two threads on one small product reach less than twice one thread's rate:
// bench/results/README.md). Rows must split evenly enough: B a multiple of the threads, or
// at least 4 rows a thread. The backward's parts write the parameters' gradients of their rows into
// their own copies (the first part into the outputs), added in part order at the end: only while
// those stay small (copied_layers x the layer's parameters <= kMaxPartialFloats), else one part
// and threaded kernels.
constexpr int64_t kMaxPartialFloats = int64_t(1) << 20;

int layer_parts(const LayerShape& s, int threads, int copied_layers) {
#ifdef _OPENMP
  const int64_t n = std::min<int64_t>(threads, s.batch);
  if (n < 2 || (s.batch % n && s.batch < 4 * n)) return 1;
  if (copied_layers * param_floats(s) > kMaxPartialFloats) return 1;
  return static_cast<int>(n);
#else
  (void)s, (void)threads, (void)copied_layers;
  return 1;  // without OpenMP a part's GEMM would start MKL's own threads beside the parts
#endif
}

// f(k, part shape, first batch row) for each of the n parts, one a thread: part k has batch rows
// [B k / n, B (k + 1) / n).
template <typename Fn>
void for_each_part(const LayerShape& s, int n, Fn f) {
  cpu::parallel_range(n, n, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t b0 = s.batch * k / n, b1 = s.batch * (k + 1) / n;
      f(k, LayerShape{b1 - b0, s.seq, s.hidden, s.heads, s.ffn}, b0);
    }
  });
}

// Which GEMM a part's products take: small_gemm (small_gemm_cpu.h: register tiles, no packing, the
// bias in the tile's epilogue) where it measured faster than the BLAS per product: single-threaded at
// hidden <= 64, ffn <= 256 and a part of <= 2048 rows (the measurements: bench/results/README.md);
// else the BLAS sgemm (threaded when the call is not cut into parts).
constexpr int64_t kSmallMaxHidden = 64, kSmallMaxFfn = 256, kSmallMaxRows = 2048;

// parts: layer_parts' count for the call (one part: its kernels run on all `threads`).
bool small_products(const LayerShape& s, int parts, int threads) {
  const int64_t rows = (s.batch + parts - 1) / parts * s.seq;
  return (parts > 1 || threads == 1) && s.hidden <= kSmallMaxHidden && s.ffn <= kSmallMaxFfn && rows <= kSmallMaxRows &&
         cpu_kernels_supported();
}

// A layer's four weights transposed for small_gemm's [K, N] B operand: Wqkv^T [H, 3H] | Wo^T [H, H] |
// W1^T [H, F] | W2^T [F, H].
int64_t transposed_floats(const LayerShape& s) { return 4 * s.hidden * s.hidden + 2 * s.hidden * s.ffn; }

// Every layer's transposed weights into wt (layers x transposed_floats), the 4 x layers matrices over
// `threads`.
void transpose_weights(const LayerShape& s, int layers, const LayerParams* p, float* wt, int threads) {
  const int64_t H = s.hidden, F = s.ffn, per = transposed_floats(s);
  cpu::parallel_range(4 * layers, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const LayerParams& q = p[i / 4];
      float* t = wt + (i / 4) * per;
      switch (i % 4) {
        case 0: transpose_rows(q.w_qkv, 3 * H, H, H, t, 3 * H); break;
        case 1: transpose_rows(q.w_o, H, H, H, t + 3 * H * H, H); break;
        case 2: transpose_rows(q.w_1, F, H, H, t + 4 * H * H, F); break;
        default: transpose_rows(q.w_2, H, F, F, t + 4 * H * H + H * F, H); break;
      }
    }
  });
}

// C [M, N] = A [M, K] W^T (+ bias [N]), W [N, K] in torch's layout: with Wt (W^T [K, N]) through
// small_gemm, else the BLAS (the bias first filled into C, as torch.addmm(bias, a, w.t()) adds it).
void linear(int64_t M, int64_t N, int64_t K, const float* A, const float* W, const float* Wt, const float* bias,
            float* C) {
  if (Wt) {
    small_gemm(false, M, N, K, A, K, Wt, N, false, C, N, bias);
    return;
  }
  if (bias) fill_rows(C, bias, M, N);
  gemm(false, true, M, N, K, A, K, W, K, bias ? 1.0f : 0.0f, C, N);
}

// C [M, N] (+)= op(A) B, B [K, N]: small_gemm or the BLAS.
void product(bool small, bool ta, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  if (small)
    small_gemm(ta, M, N, K, A, lda, B, ldb, accumulate, C, ldc, nullptr);
  else
    gemm(ta, false, M, N, K, A, lda, B, ldb, accumulate ? 1.0f : 0.0f, C, ldc);
}

// wt: the layer's transposed weights (transpose_weights) to run the products through small_gemm, or null.
void forward_rows(const LayerShape& s, const float* x, const float* key_bias, const LayerParams& p, const float* wt,
                  const float* keep_a, const float* keep_f, float eps, const Workspace& w, float* out, int threads) {
  const int64_t T = s.batch * s.seq, H = s.hidden, F = s.ffn, D = H / s.heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttentionShape as{s.batch, s.seq, s.heads, D};
  Scratch branch_buf(static_cast<size_t>(T * H), 0);
  float* branch = branch_buf.data();
  const float* wt_o = wt ? wt + 3 * H * H : nullptr;
  const float* wt_1 = wt ? wt + 4 * H * H : nullptr;
  const float* wt_2 = wt ? wt + 4 * H * H + H * F : nullptr;
  linear(T, 3 * H, H, x, p.w_qkv, wt, p.b_qkv, w.qkv);
  attention_forward(as, w.qkv, key_bias, scale, w.ctx, w.probs, threads);
  linear(T, H, H, w.ctx, p.w_o, wt_o, nullptr, branch);
  bias_dropout_add_layernorm_forward(branch, p.b_o, x, keep_a, p.g1, p.beta1, eps, T, H, w.h1, w.y1, w.mean1,
                                     w.rstd1, threads);
  linear(T, F, H, w.h1, p.w_1, wt_1, nullptr, w.f1);
  bias_gelu_forward(w.f1, p.b_1, w.act, T, F, threads);
  linear(T, H, F, w.act, p.w_2, wt_2, nullptr, branch);
  bias_dropout_add_layernorm_forward(branch, p.b_2, w.h1, keep_f, p.g2, p.beta2, eps, T, H, out, w.y2, w.mean2,
                                     w.rstd2, threads);
}

// grad_out is read (by the first LayerNorm backward) before dx is written, so they may be one buffer.
// small: the products through small_gemm, else the BLAS.
void backward_rows(const LayerShape& s, const float* grad_out, const float* x, const LayerParams& p,
                   const float* keep_a, const float* keep_f, const Workspace& w, float* dx, const LayerGrads& g,
                   bool small, int threads) {
  const int64_t T = s.batch * s.seq, H = s.hidden, F = s.ffn, D = H / s.heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttentionShape as{s.batch, s.seq, s.heads, D};
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
  product(small, true, H, F, T, dbr, H, w.act, F, false, g.w_2, F);      // dW2 = dbr^T act
  product(small, false, T, F, H, dbr, H, p.w_2, F, false, dact, F);      // d act = dbr W2
  bias_gelu_backward(dact, w.f1, p.b_1, df1, g.b_1, T, F, threads);
  product(small, true, F, H, T, df1, F, w.h1, H, false, g.w_1, H);       // dW1 = df1^T h1
  product(small, false, T, H, F, df1, F, p.w_1, H, true, dh1, H);        // d h1 += df1 W1
  // attention sublayer: h1 = LN1(x + keep_a * (ctx Wo^T + bo)); dx starts as the residual's gradient
  bias_dropout_add_layernorm_backward(dh1, w.y1, keep_a, p.g1, w.mean1, w.rstd1, T, H, dx, dbr, g.g1, g.beta1,
                                      g.b_o, threads);
  product(small, true, H, H, T, dbr, H, w.ctx, H, false, g.w_o, H);      // dWo = dbr^T ctx
  product(small, false, T, H, H, dbr, H, p.w_o, H, false, dctx, H);      // d ctx = dbr Wo
  attention_backward(as, w.qkv, w.probs, w.ctx, dctx, scale, dqkv, threads);
  column_sum(dqkv, T, 3 * H, g.b_qkv, false);
  product(small, true, 3 * H, H, T, dqkv, 3 * H, x, H, false, g.w_qkv, H);  // dWqkv = dqkv^T x
  product(small, false, T, H, 3 * H, dqkv, 3 * H, p.w_qkv, H, true, dx, H);  // dx += dqkv Wqkv
}

}  // namespace

int64_t layer_workspace_floats(const LayerShape& s) {
  const int64_t T = s.batch * s.seq, H = s.hidden, F = s.ffn;
  return T * 3 * H + s.batch * s.heads * s.seq * s.seq + 4 * T * H + 2 * T * F + 4 * T;  // carve's arrays
}

int64_t encoder_workspace_floats(const LayerShape& s, int layers) {
  return layers * layer_workspace_floats(s) + (layers - 1) * s.batch * s.seq * s.hidden;
}

bool encoder_small_products(const LayerShape& s, int layers, int threads, bool backward) {
  const int n = layer_parts(s, threads, backward ? layers : 0);
  return small_products(s, n, threads);
}

int encoder_parts(const LayerShape& s, int layers, int threads, bool backward) {
  return layer_parts(s, threads, backward ? layers : 0);
}

namespace {

// The saved state of an encoder call: layer l's workspace, and the input of layer l > 0 (the output
// of layer l - 1) after the L workspaces.
struct Stack {
  const LayerShape& s;
  int layers;
  const float* ws;
  Workspace layer(int l) const { return carve(s, ws + l * layer_workspace_floats(s)); }
  float* input(int l, const float* x) const {  // layer l's input [T, H]
    return l == 0 ? const_cast<float*>(x)
                  : const_cast<float*>(ws) + layers * layer_workspace_floats(s) + (l - 1) * s.batch * s.seq * s.hidden;
  }
};

const float* mask_of(const float* const* keep, int l) { return keep ? keep[l] : nullptr; }

}  // namespace

void encoder_forward(const LayerShape& s, int layers, const float* x, const float* key_bias, const LayerParams* p,
                     const float* const* keep_a, const float* const* keep_f, float eps, float* ws, float* out,
                     int threads) {
  check(s);
  const Stack st{s, layers, ws};
  const int n = layer_parts(s, threads, 0);
  // small_gemm's products take the weights transposed: done once for the call, read by every part
  const bool small = small_products(s, n, threads);
  Scratch wt(static_cast<size_t>(small ? layers * transposed_floats(s) : 0), 4);
  if (small) transpose_weights(s, layers, p, wt.data(), threads);
  // rows from batch row b0 (a part, or the whole batch) through every layer
  auto run = [&](const LayerShape& part, int64_t b0, int kernel_threads) {
    const int64_t r = b0 * s.seq * s.hidden;
    for (int l = 0; l < layers; ++l) {
      float* o = l == layers - 1 ? out : st.input(l + 1, x);
      forward_rows(part, st.input(l, x) + r, rows_of(key_bias, b0, s.seq), p[l],
                   small ? wt.data() + l * transposed_floats(s) : nullptr, rows_of(mask_of(keep_a, l), r, 1),
                   rows_of(mask_of(keep_f, l), r, 1), eps, from_row(st.layer(l), s, b0), o + r, kernel_threads);
    }
  };
  if (n == 1)
    run(s, 0, threads);
  else
    for_each_part(s, n, [&](int64_t, const LayerShape& part, int64_t b0) { run(part, b0, 1); });
}

void encoder_backward(const LayerShape& s, int layers, const float* grad_out, const float* x, const LayerParams* p,
                      const float* const* keep_a, const float* const* keep_f, const float* ws, float* dx,
                      const LayerGrads* g, bool accumulate, int threads) {
  check(s);
  const Stack st{s, layers, ws};
  const int n = layer_parts(s, threads, layers);
  const int64_t TH = s.batch * s.seq * s.hidden, np = param_floats(s);
  // slot 3: the gradient between layers [T, H] (a layer's dx overwrites its grad_out: backward_rows
  // reads grad_out before it writes dx) | the parameters' gradients of parts k >= first (part k's
  // block of layers x np at k - first): part 0 writes the outputs unless they are accumulated to;
  // the copies are summed in part order at the end, and that sum written or added (once, as
  // autograd's `grad += new` adds a node's whole gradient)
  const int64_t between = layers > 1 ? TH : 0;
  const int first = accumulate ? 0 : 1;
  Scratch buf(static_cast<size_t>(between + (n - first) * layers * np), 3);
  float* partial = buf.data() + between;
  const bool small = small_products(s, n, threads);
  auto run = [&](int k, const LayerShape& part, int64_t b0, int kernel_threads) {
    const int64_t r = b0 * s.seq * s.hidden;
    const float* grad = grad_out;
    for (int l = layers - 1; l >= 0; --l) {
      float* d = l == 0 ? dx : buf.data();
      backward_rows(part, grad + r, st.input(l, x) + r, p[l], rows_of(mask_of(keep_a, l), r, 1),
                    rows_of(mask_of(keep_f, l), r, 1), from_row(st.layer(l), s, b0), d + r,
                    k < first ? g[l] : grads_in(s, partial + ((k - first) * layers + l) * np), small,
                    kernel_threads);
      grad = d;
    }
  };
  if (n == 1) {
    run(0, s, 0, threads);
    if (!accumulate) return;
  } else {
    for_each_part(s, n, [&](int64_t k, const LayerShape& part, int64_t b0) { run(static_cast<int>(k), part, b0, 1); });
  }
  const auto sizes = param_sizes(s);
  cpu::parallel_range(layers * np, threads, [&](int64_t lo, int64_t hi) {
    for (int l = 0; l < layers; ++l) {
      int64_t base = l * np;
      for (int i = 0; i < 12; ++i) {
        const int64_t a = std::max(lo, base), b = std::min(hi, base + sizes[i]);
        if (a < b)
          add_part_copies(g[l].*kGradMembers[i] + (a - base), partial + a, layers * np, n - first, b - a,
                          accumulate);
        base += sizes[i];
      }
    }
  });
}

}  // namespace xlmr_mp
