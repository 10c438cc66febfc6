// Exact GELU of x + bias for CPU (fp32, AVX2 + FMA), forward and backward (autograd wrapper and
// dispatch: xlmr_mp/kernels/ops.py:bias_gelu). Needs cpu_kernels_supported() (AVX2 and FMA).
#pragma once
#include <cstdint>

namespace xlmr_mp {

// y [rows, cols] = gelu(x + bias), bias [cols].
void bias_gelu_forward(const float* x, const float* bias, float* y, int64_t rows, int64_t cols, int threads);

// dx [rows, cols] = grad * gelu'(x + bias); dbias [cols] = dx summed over rows (same bits at any
// thread count).
void bias_gelu_backward(const float* grad, const float* x, const float* bias, float* dx, float* dbias,
                        int64_t rows, int64_t cols, int threads);

}  // namespace xlmr_mp
