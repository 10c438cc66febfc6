// The input embeddings in one call each way (embeddings_cpu.h): the gathers and the position ids
// here, the sum's LayerNorm (and its backward) through layernorm_cpu's kernel.
#include "embeddings_cpu.h"

#include <stdexcept>
#include <string>

#include "blas_cpu.h"  // scratch
#include "layernorm_cpu.h"

namespace xlmr_mp {

void embeddings_forward(const EmbeddingShape& s, const int64_t* ids, const float* word, const float* token_type,
                        const float* position, const float* ln_weight, const float* ln_bias, const float* keep,
                        float eps, int64_t* pos, float* y, float* out, float* mean, float* rstd, int threads) {
  const int64_t T = s.batch * s.seq, H = s.hidden;
  for (int64_t b = 0; b < s.batch; ++b) {
    int64_t count = 0;
    for (int64_t j = 0; j < s.seq; ++j) {
      const int64_t t = b * s.seq + j, id = ids[t];
      if (id < 0 || id >= s.vocab)
        throw std::out_of_range("embeddings: token id " + std::to_string(id) + " at [" + std::to_string(b) + ", " +
                                std::to_string(j) + "] is outside the vocabulary [0, " + std::to_string(s.vocab) + ")");
      const bool real = id != s.pad_id;
      count += real;
      pos[t] = real ? count + s.pad_id : s.pad_id;
      if (pos[t] >= s.positions)
        throw std::out_of_range("embeddings: position " + std::to_string(pos[t]) + " needs more than the " +
                                std::to_string(s.positions) + " rows of the position table");
    }
  }
  // residual = word[id] + token_type (the module's first add); x = position[pos]; LN(residual + x)
  Scratch res_buf(static_cast<std::size_t>(2 * T * H), 2);
  float* res = res_buf.data();
  float* x = res + T * H;
  for (int64_t t = 0; t < T; ++t) {
    const float* w = word + ids[t] * H;
    const float* p = position + pos[t] * H;
    for (int64_t c = 0; c < H; ++c) {
      res[t * H + c] = w[c] + token_type[c];
      x[t * H + c] = p[c];
    }
  }
  bias_dropout_add_layernorm_forward(x, nullptr, res, nullptr, ln_weight, ln_bias, eps, T, H, out, y, mean, rstd,
                                     threads);
  if (keep)
    for (int64_t i = 0; i < T * H; ++i) out[i] *= keep[i];
}

void embeddings_backward(const EmbeddingShape& s, const float* grad, const int64_t* ids, const int64_t* pos,
                         const float* keep, const float* ln_weight, const float* y, const float* mean,
                         const float* rstd, float* dword, float* dposition, float* dln_weight, float* dln_bias,
                         int threads) {
  const int64_t T = s.batch * s.seq, H = s.hidden;
  Scratch dy_buf(static_cast<std::size_t>((keep ? 2 : 1) * T * H), 2);
  float* dy = dy_buf.data();
  const float* g = grad;
  if (keep) {
    float* gk = dy + T * H;
    for (int64_t i = 0; i < T * H; ++i) gk[i] = grad[i] * keep[i];
    g = gk;
  }
  bias_dropout_add_layernorm_backward(g, y, nullptr, ln_weight, mean, rstd, T, H, dy, nullptr, dln_weight, dln_bias,
                                      nullptr, threads);
  for (int64_t t = 0; t < T; ++t) {  // token order: the same sums at any thread count
    const float* d = dy + t * H;
    if (ids[t] != s.pad_id) {
      float* w = dword + ids[t] * H;
      for (int64_t c = 0; c < H; ++c) w[c] += d[c];
    }
    if (pos[t] != s.pad_id) {
      float* p = dposition + pos[t] * H;
      for (int64_t c = 0; c < H; ++c) p[c] += d[c];
    }
  }
}

}  // namespace xlmr_mp
