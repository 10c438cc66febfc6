// XLM-R's input embeddings as two C++ calls on a CPU (fp32, AVX2 + FMA):
//   pos = fairseq positions of ids (real tokens count from pad_id + 1, pads stay at pad_id)
//   y   = (word[ids] + token_type) + position[pos]        out = keep * LayerNorm(y)
// and the backward: LayerNorm's (layernorm_cpu), then the rows' gradients added into the word
// and position tables (their padding rows get none, as nn.Embedding(padding_idx=...)). The torch
// reference is xlmr_mp/model/xlmr.py's Embeddings module; the Python wrapper (the autograd node)
// is xlmr_mp/kernels/embeddings_cpu.py.
#pragma once
#include <cstdint>

#include "cpu_kernels.h"

namespace xlmr_mp {

struct EmbeddingShape {
  int64_t batch, seq, hidden, vocab, positions, pad_id;
};

// ids [B, S]; word [vocab, H]; token_type [H]; position [positions, H]; keep [T, H] or null (the
// dropout multiplier after the LayerNorm); writes pos [T] (int64), y, out [T, H], mean, rstd [T].
// Throws std::out_of_range naming the first id outside [0, vocab) or position outside the table.
void embeddings_forward(const EmbeddingShape& s, const int64_t* ids, const float* word, const float* token_type,
                        const float* position, const float* ln_weight, const float* ln_bias, const float* keep,
                        float eps, int64_t* pos, float* y, float* out, float* mean, float* rstd, int threads);

// From grad [T, H]: d word (added to, [vocab, H]), d position (added to), d LN weight / bias (written).
void embeddings_backward(const EmbeddingShape& s, const float* grad, const int64_t* ids, const int64_t* pos,
                         const float* keep, const float* ln_weight, const float* y, const float* mean,
                         const float* rstd, float* dword, float* dposition, float* dln_weight, float* dln_bias,
                         int threads);

}  // namespace xlmr_mp
