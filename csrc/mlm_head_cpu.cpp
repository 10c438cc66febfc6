// The masked-LM head and loss in one call (mlm_head_cpu.h): the same GEMMs (torch's sgemm, so
// torch.mm's bits) and AVX2 kernels as the module path, with nothing between them. With gradients
// and several threads a small head's masked rows are cut into parts, one a thread (head_parts), whose
// decoder products run through small_gemm against the decoder transposed once for all parts.
//   forward:  d = h Wd^T | a = gelu(d + bd) | z = LN(0 + a) | per chunk: logits = z Wdec^T + bdec,
//             xent_rows (loss rows; the logits become softmax - onehot = dlogits)
//   gradient: per chunk dz = dlogits Wdec, dWdec += dlogits^T z, dbdec += column sums;
//             then LN backward (da), gelu backward (dd, dbd), dWd = dd^T h, dh = dd Wd.
#include "mlm_head_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "bias_gelu_cpu.h"
#include "cpu_parallel.h"
#include "layernorm_cpu.h"
#include "small_gemm_cpu.h"
#include "xent_cpu.h"

namespace xlmr_mp {

namespace {

// mlm_head_loss; with w_dec_t (the decoder's first V rows transposed, [H, V]) its three decoder products
// run through small_gemm (single-threaded: the head's parts), the decoder bias in the logits' epilogue.
double head_loss(const HeadShape& s, const float* h, const int64_t* target, const HeadParams& p, const float* w_dec_t,
                 float eps, const HeadGrads& g, int threads) {
  require_blas("mlm_head_loss");
  const int64_t M = s.rows, H = s.hidden, V = s.vocab, C = std::max<int64_t>(1, std::min(s.chunk, M));
  const bool grads = g.h != nullptr;
  // scratch: d | a | y | z | zeros | dz | da | dd  [M, H] each, mean | rstd [M], logits [C, V], loss rows [C]
  Scratch d_buf(static_cast<std::size_t>(8 * M * H + 2 * M + C * V + C), 1);
  float* d = d_buf.data();
  float *a = d + M * H, *y = a + M * H, *z = y + M * H, *zeros = z + M * H, *dz = zeros + M * H;
  float *da = dz + M * H, *dd = da + M * H, *mean = dd + M * H, *rstd = mean + M, *logits = rstd + M;
  float* loss_rows = logits + C * V;
  std::memset(zeros, 0, sizeof(float) * static_cast<std::size_t>(M * H));
  gemm(false, true, M, H, H, h, H, p.w_dense, H, 0.0f, d, H);
  bias_gelu_forward(d, p.b_dense, a, M, H, threads);
  bias_dropout_add_layernorm_forward(a, nullptr, zeros, nullptr, p.ln_weight, p.ln_bias, eps, M, H, z, y, mean, rstd,
                                     threads);
  double total = 0.0;
  for (int64_t r0 = 0; r0 < M; r0 += C) {
    const int64_t m = std::min(C, M - r0);
    if (w_dec_t) {
      small_gemm(false, m, V, H, z + r0 * H, H, w_dec_t, V, false, logits, V, p.b_dec);
    } else {
      if (p.b_dec) fill_rows(logits, p.b_dec, m, V);
      gemm(false, true, m, V, H, z + r0 * H, H, p.w_dec, H, p.b_dec ? 1.0f : 0.0f, logits, V);
    }
    xent_rows(logits, target + r0, loss_rows, m, V, threads);
    float part = 0.0f;
    for (int64_t i = 0; i < m; ++i) part += loss_rows[i];
    total += part;
    if (!grads) continue;
    if (w_dec_t) {
      small_gemm(false, m, H, V, logits, V, p.w_dec, H, false, dz + r0 * H, H, nullptr);    // dz = dlogits Wdec
      small_gemm(true, V, H, m, logits, V, z + r0 * H, H, true, g.w_dec, H, nullptr);       // dWdec += dlogits^T z
    } else {
      gemm(false, false, m, H, V, logits, V, p.w_dec, H, 0.0f, dz + r0 * H, H);       // dz = dlogits Wdec
      gemm(true, false, V, H, m, logits, V, z + r0 * H, H, 1.0f, g.w_dec, H);       // dWdec += dlogits^T z
    }
    if (g.b_dec) column_sum(logits, m, V, g.b_dec, true);
  }
  if (!grads) return total;
  bias_dropout_add_layernorm_backward(dz, y, nullptr, p.ln_weight, mean, rstd, M, H, da, nullptr, g.ln_weight,
                                      g.ln_bias, nullptr, threads);
  bias_gelu_backward(da, d, p.b_dense, dd, g.b_dense, M, H, threads);
  gemm(true, false, H, H, M, dd, H, h, H, 0.0f, g.w_dense, H);                    // dWd = dd^T h
  gemm(false, false, M, H, H, dd, H, p.w_dense, H, 0.0f, g.h, H);                 // dh = dd Wd
  return total;
}

}  // namespace

double mlm_head_loss(const HeadShape& s, const float* h, const int64_t* target, const HeadParams& p, float eps,
                     const HeadGrads& g, int threads) {
  return head_loss(s, h, target, p, nullptr, eps, g, threads);
}

namespace {

// The parameters' gradient floats of one part: w_dense H x H | b_dense | ln_weight | ln_bias H | w_dec's
// first V rows V x H | b_dec's V (when there is one).
int64_t head_param_floats(int64_t H, int64_t V, bool b_dec) { return H * H + 3 * H + V * H + (b_dec ? V : 0); }

HeadGrads head_grads_in(float* buf, int64_t H, int64_t V, bool b_dec) {
  HeadGrads g{};
  g.w_dense = buf;
  g.b_dense = g.w_dense + H * H;
  g.ln_weight = g.b_dense + H;
  g.ln_bias = g.ln_weight + H;
  g.w_dec = g.ln_bias + H;
  g.b_dec = b_dec ? g.w_dec + V * H : nullptr;
  return g;
}

// Parts the masked rows are cut into, one a thread, each running the whole head single-threaded
// (one fork instead of one per GEMM and kernel): at a small head's shapes MKL's threaded products
// gain nothing from a second thread, while two halves on two threads take about half the time
// (bench/results/README.md). Only while the parts' gradient copies stay small (<= 256k
// floats a part: the decoder's V x H is summed once per part) and each part has >= 16 rows.
constexpr int64_t kHeadMaxPartFloats = int64_t(1) << 18, kHeadMinPartRows = 16;

int head_parts(int64_t M, int64_t H, int64_t V, int threads) {
#ifdef _OPENMP
  const int64_t n = std::min<int64_t>(threads, M / kHeadMinPartRows);
  if (n < 2 || head_param_floats(H, V, true) > kHeadMaxPartFloats) return 1;
  return static_cast<int>(n);
#else
  (void)M, (void)H, (void)V, (void)threads;
  return 1;  // without OpenMP a part's GEMM would start MKL's own threads beside the parts
#endif
}

}  // namespace

int mlm_head_parts(int64_t rows, int64_t hidden, int64_t vocab, int threads) {
  return head_parts(rows, hidden, vocab, threads);
}

double mlm_head_loss_labels(const HeadShape& s, int64_t T, const float* h, const int64_t* labels, int64_t ignore,
                            int64_t offset, const HeadParams& p, float eps, const HeadGrads& g, int threads,
                            int64_t* count) {
  const int64_t H = s.hidden;
  std::vector<int64_t> rows, target;
  for (int64_t t = 0; t < T; ++t)
    if (labels[t] != ignore) {
      rows.push_back(t);
      target.push_back(labels[t] - offset);
    }
  const int64_t M = static_cast<int64_t>(rows.size());
  *count = M;
  if (g.h) std::memset(g.h, 0, sizeof(float) * static_cast<std::size_t>(T * H));
  if (M == 0) {
    if (g.h)
      for (float* w : {g.w_dense, g.b_dense, g.ln_weight, g.ln_bias})
        std::memset(w, 0, sizeof(float) * static_cast<std::size_t>(w == g.w_dense ? H * H : H));
    return 0.0;
  }
  std::vector<float> hs(static_cast<std::size_t>(M * H)), dhs(g.h ? static_cast<std::size_t>(M * H) : 0);
  for (int64_t i = 0; i < M; ++i) std::memcpy(hs.data() + i * H, h + rows[i] * H, sizeof(float) * H);
  HeadGrads gs = g;
  if (g.h) gs.h = dhs.data();
  const int n = g.h ? head_parts(M, H, s.vocab, threads) : 1;
  double total = 0.0;
  if (n == 1) {
    total = mlm_head_loss(HeadShape{M, H, s.vocab, s.chunk}, hs.data(), target.data(), p, eps, gs, threads);
  } else {
    // part k: rows [M k / n, M (k + 1) / n) on thread k, single-threaded; part 0's parameter gradients
    // into the outputs, the others' into copies (slot 5) added in part order at the end
    const int64_t V = s.vocab, np = head_param_floats(H, V, p.b_dec != nullptr);
    Scratch copies(static_cast<std::size_t>((n - 1) * np), 5);
    // the decoder transposed once for every part's small_gemm products (slot 4), over the threads in row blocks
    Scratch w_dec_t(static_cast<std::size_t>(V * H), 4);
    cpu::parallel_range((V + 7) / 8, threads, [&](int64_t lo, int64_t hi) {
      const int64_t r0 = lo * 8, r1 = std::min(V, hi * 8);
      transpose_rows(p.w_dec + r0 * H, r1 - r0, H, H, w_dec_t.data() + r0, V);
    });
    std::vector<double> totals(static_cast<std::size_t>(n));
    cpu::parallel_range(n, n, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t r0 = M * k / n, r1 = M * (k + 1) / n;
        HeadGrads gk = k == 0 ? gs : head_grads_in(copies.data() + (k - 1) * np, H, V, p.b_dec != nullptr);
        if (k > 0) std::memset(gk.w_dec, 0, sizeof(float) * static_cast<std::size_t>(V * H + (gk.b_dec ? V : 0)));
        gk.h = dhs.data() + r0 * H;
        totals[k] = head_loss(HeadShape{r1 - r0, H, V, s.chunk}, hs.data() + r0 * H, target.data() + r0, p,
                              w_dec_t.data(), eps, gk, 1);
      }
    });
    for (double t : totals) total += t;
    const HeadGrads out = gs;
    cpu::parallel_range(np, threads, [&](int64_t lo, int64_t hi) {
      // the copies' layout is head_grads_in's: walk the outputs the same way
      int64_t base = 0;
      for (float* o : {out.w_dense, out.b_dense, out.ln_weight, out.ln_bias, out.w_dec, out.b_dec}) {
        if (!o) continue;
        const int64_t len = o == out.w_dense ? H * H : o == out.w_dec ? V * H : o == out.b_dec ? V : H;
        const int64_t a = std::max(lo, base), b = std::min(hi, base + len);
        if (a < b) add_part_copies(o + (a - base), copies.data() + a, np, n - 1, b - a, false);
        base += len;
      }
    });
  }
  if (g.h)
    for (int64_t i = 0; i < M; ++i) std::memcpy(g.h + rows[i] * H, dhs.data() + i * H, sizeof(float) * H);
  return total;
}

}  // namespace xlmr_mp
