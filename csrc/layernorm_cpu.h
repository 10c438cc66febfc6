// The post-LN sublayer epilogue for CPU (fp32, AVX2 + FMA): out = LayerNorm(residual + keep * (x + bias))
// over rows of H, forward and backward in one pass each (autograd wrapper and dispatch:
// xlmr_mp/kernels/layernorm_cpu.py; torch reference: ops.bias_dropout_add_layernorm_ref).
#pragma once
#include <cstdint>

#include "cpu_kernels.h"  // cpu_kernels_supported(): the kernels below need AVX2 and FMA

namespace xlmr_mp {

// x, residual, out, y [rows, cols]; bias [cols] or null; keep [rows, cols] or null: the dropout
// multiplier (0 or 1 / (1 - p)); weight, ln_bias [cols]. y receives residual + keep * (x + bias)
// (kept for the backward), mean and rstd [rows] its row statistics.
void bias_dropout_add_layernorm_forward(const float* x, const float* bias, const float* residual, const float* keep,
                                        const float* weight, const float* ln_bias, float eps, int64_t rows,
                                        int64_t cols, float* out, float* y, float* mean, float* rstd, int threads);

// From grad [rows, cols] and the forward's y, keep (or null), weight, mean, rstd: dresidual [rows, cols],
// dx [rows, cols] (= dresidual * keep, or dresidual without keep; null: not written), dweight,
// dln_bias and dbias [cols] (dbias may be null: dx summed over rows). The column sums add fixed blocks
// of rows and then the blocks in order, so they have the same bits at every thread count.
void bias_dropout_add_layernorm_backward(const float* grad, const float* y, const float* keep, const float* weight,
                                         const float* mean, const float* rstd, int64_t rows, int64_t cols,
                                         float* dresidual, float* dx, float* dweight, float* dln_bias, float* dbias,
                                         int threads);

}  // namespace xlmr_mp
