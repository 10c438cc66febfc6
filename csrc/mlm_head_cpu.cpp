// The masked-LM head and loss in one call (mlm_head_cpu.h): the same GEMMs (torch's sgemm, so
// torch.mm's bits) and AVX2 kernels as the module path, with nothing between them.
//   forward:  d = h Wd^T | a = gelu(d + bd) | z = LN(0 + a) | per chunk: logits = z Wdec^T + bdec,
//             xent_rows (loss rows; the logits become softmax - onehot = dlogits)
//   gradient: per chunk dz = dlogits Wdec, dWdec += dlogits^T z, dbdec += column sums;
//             then LN backward (da), gelu backward (dd, dbd), dWd = dd^T h, dh = dd Wd.
#include "mlm_head_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "bias_gelu_cpu.h"
#include "layernorm_cpu.h"
#include "xent_cpu.h"

namespace xlmr_mp {

double mlm_head_loss(const HeadShape& s, const float* h, const int64_t* target, const HeadParams& p, float eps,
                     const HeadGrads& g, int threads) {
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
    if (p.b_dec) fill_rows(logits, p.b_dec, m, V);
    gemm(false, true, m, V, H, z + r0 * H, H, p.w_dec, H, p.b_dec ? 1.0f : 0.0f, logits, V);
    xent_rows(logits, target + r0, loss_rows, m, V, threads);
    float part = 0.0f;
    for (int64_t i = 0; i < m; ++i) part += loss_rows[i];
    total += part;
    if (!grads) continue;
    gemm(false, false, m, H, V, logits, V, p.w_dec, H, 0.0f, dz + r0 * H, H);       // dz = dlogits Wdec
    gemm(true, false, V, H, m, logits, V, z + r0 * H, H, 1.0f, g.w_dec, H);       // dWdec += dlogits^T z
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
  const double total = mlm_head_loss(HeadShape{M, H, s.vocab, s.chunk}, hs.data(), target.data(), p, eps, gs, threads);
  if (g.h)
    for (int64_t i = 0; i < M; ++i) std::memcpy(g.h + rows[i] * H, dhs.data() + i * H, sizeof(float) * H);
  return total;
}

}  // namespace xlmr_mp
