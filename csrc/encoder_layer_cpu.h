// Consecutive post-LN encoder layers (one, or all of a model's or a pipeline stage's), forward and
// backward, as two C++ calls on a CPU (fp32, AVX2 + FMA): the layers' GEMMs through the BLAS sgemm that
// torch itself calls (MKL's, handed over once with set_blas_sgemm, blas_cpu.h) or, for small layers cut
// into single-threaded parts, small_gemm_cpu.h's register tiles, between the AVX2 kernels of
// attention_cpu, bias_gelu_cpu and layernorm_cpu.
// The torch reference is the module path of xlmr_mp/model/encoder.py; the Python wrapper (the
// autograd node) is xlmr_mp/kernels/encoder_layer_cpu.py.
#pragma once
#include <cstdint>

#include "blas_cpu.h"    // the GEMM (set_blas_sgemm first)
#include "cpu_kernels.h"  // cpu_kernels_supported(): the kernels below need AVX2 and FMA

namespace xlmr_mp {

struct LayerShape {
  int64_t batch, seq, hidden, heads, ffn;
};

// The layer's twelve tensors in torch's nn.Linear layout ([out, in], row-major): its parameters
// (LayerParams, biases required) or their gradients (LayerGrads, written by the backward).
template <typename T>
struct LayerTensors {
  T *w_qkv, *b_qkv, *w_o, *b_o, *g1, *beta1, *w_1, *b_1, *w_2, *b_2, *g2, *beta2;
};
using LayerParams = LayerTensors<const float>;
using LayerGrads = LayerTensors<float>;

// Floats of one layer's saved activations (its part of the workspace the backward reads):
//   qkv [T, 3H] | probs [B, heads, S, S] | ctx [T, H] | y1 [T, H] | h1 [T, H] | f1 [T, F] | act [T, F]
//   | y2 [T, H] | mean1, rstd1, mean2, rstd2 [T]        (T = B * S)
int64_t layer_workspace_floats(const LayerShape& s);
// Floats of the workspace of `layers` consecutive layers: each layer's, then the inputs of layers
// 1 .. layers - 1 ([T, H] each).
int64_t encoder_workspace_floats(const LayerShape& s, int layers);

// How many parts (one a thread, each a range of batch rows run through every layer) the forward or
// the backward of `layers` layers cuts a call into at `threads` threads; 1: one pass with the
// kernels and GEMMs threaded.
int encoder_parts(const LayerShape& s, int layers, int threads, bool backward);

// Whether such a call runs its GEMMs through small_gemm (small_gemm_cpu.h: single-threaded parts of small
// layers) rather than the BLAS sgemm.
bool encoder_small_products(const LayerShape& s, int layers, int threads, bool backward);

// out [T, H] = layers[layers - 1](... layers[0](x)), the post-LN layers with parameters p[l]; key_bias
// [B, S] or null; keep_a / keep_f: null, or per layer its two hidden-dropout multipliers [T, H] (0 or
// 1 / (1 - p)) or null; ws: encoder_workspace_floats floats.
void encoder_forward(const LayerShape& s, int layers, const float* x, const float* key_bias, const LayerParams* p,
                     const float* const* keep_a, const float* const* keep_f, float eps, float* ws, float* out,
                     int threads);

// Gradients of encoder_forward: dx [T, H] (written) and each layer's parameter gradients g[l], from
// grad_out [T, H], the input x and the forward's workspace: written, or with `accumulate` added to
// g[l] (g += the call's gradient, one rounding: the bits of AccumulateGrad adding the written one).
void encoder_backward(const LayerShape& s, int layers, const float* grad_out, const float* x, const LayerParams* p,
                      const float* const* keep_a, const float* const* keep_f, const float* ws, float* dx,
                      const LayerGrads* g, bool accumulate, int threads);

}  // namespace xlmr_mp
