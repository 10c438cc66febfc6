// small_gemm_avx2.h's register-blocked GEMM as a call for code outside the AVX2 regions (the encoder
// layer's per-part products, encoder_layer_cpu.cpp), plus the 8 x 8 block transpose. The torch reference
// is torch.mm (tests/kernels/test_small_gemm_cpu.py). Only where cpu_kernels_supported(); elsewhere they throw.
#pragma once
#include <cstdint>

namespace xlmr_mp {

// Row-major C [M, N] = op(A) B (+ colbias [N]) (+ C with `accumulate`): op(A) [M, K] is A [M, K] (row
// stride lda), or with ta A [K, M] transposed; B [K, N] (row stride ldb). Single-threaded; each output's
// sum runs over k in order (one FMA chain). For products a core keeps in L1/L2 (small layers' per-part
// shapes), where it measured faster than MKL's sgemm; where it is used is encoder_layer_cpu.cpp's
// small_products rule (the measurements: bench/results/README.md).
void small_gemm(bool ta, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                bool accumulate, float* C, int64_t ldc, const float* colbias);

// dst [cols, rows] (row stride ldd) = src [rows, cols]^T (row stride lds).
void transpose_rows(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd);

}  // namespace xlmr_mp
