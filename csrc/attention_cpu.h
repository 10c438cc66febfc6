// Fused multi-head self-attention for CPU (fp32, AVX2 + FMA): forward and backward over the
// fused QKV projection's output [B, S, heads, 3, D] (q, k, v of a head side by side, Megatron's
// per-head interleave). The torch reference is scaled_dot_product_attention
// (xlmr_mp/kernels/attention_cpu.py holds the autograd wrapper and the dispatch).
#pragma once
#include <cstdint>

#include "cpu_kernels.h"  // cpu_kernels_supported(): the kernels below need AVX2 and FMA

namespace xlmr_mp {

struct AttentionShape {
  int64_t batch, seq, heads, head_dim;
};

// out [B, S, heads * D] = softmax(scale * q k^T + key_bias) v per head; probs [B, heads, S, S]
// receives the probabilities (kept for the backward). key_bias [B, S] (additive, per key) or null.
void attention_forward(const AttentionShape& s, const float* qkv, const float* key_bias, float scale,
                       float* out, float* probs, int threads);

// grad_qkv [B, S, heads, 3, D] (every element written) from grad_out [B, S, heads * D], the
// forward's qkv, probs and out.
void attention_backward(const AttentionShape& s, const float* qkv, const float* probs, const float* out,
                        const float* grad_out, float scale, float* grad_qkv, int threads);

}  // namespace xlmr_mp
