// small_gemm_cpu.h: the AVX2 tiles of small_gemm_avx2.h behind a plain call.
#include "small_gemm_cpu.h"

#include "cpu_target_begin.h"
#if XLMR_MP_AVX2
#include "small_gemm_avx2.h"

void xlmr_mp::small_gemm(bool ta, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                         int64_t ldb, bool accumulate, float* C, int64_t ldc, const float* colbias) {
  const int64_t ai = ta ? 1 : lda, ak = ta ? lda : 1;
  if (accumulate)
    cpu::small_gemm<true>(M, N, K, A, ai, ak, B, ldb, C, ldc, 1.f, colbias);
  else
    cpu::small_gemm<false>(M, N, K, A, ai, ak, B, ldb, C, ldc, 1.f, colbias);
}

void xlmr_mp::transpose_rows(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  cpu::transpose(src, rows, cols, lds, dst, ldd);
}

#include "cpu_target_end.h"

#else  // not x86-64: no kernel (encoder_layer_cpu.cpp keeps the BLAS sgemm)

#include <stdexcept>

void xlmr_mp::small_gemm(bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, bool, float*,
                         int64_t, const float*) {
  throw std::runtime_error("small_gemm: built without the x86-64 AVX2 kernel");
}

void xlmr_mp::transpose_rows(const float*, int64_t, int64_t, int64_t, float*, int64_t) {
  throw std::runtime_error("transpose_rows: built without the x86-64 AVX2 kernel");
}

#endif
