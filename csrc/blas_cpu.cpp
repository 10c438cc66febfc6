// The BLAS entry point and row helpers of blas_cpu.h.
#include "blas_cpu.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace xlmr_mp {
namespace {
SgemmFn g_sgemm = nullptr;
}  // namespace

void set_blas_sgemm(SgemmFn fn) { g_sgemm = fn; }

void require_blas(const char* who) {
  if (!g_sgemm) throw std::runtime_error(std::string(who) + ": no BLAS sgemm was set (set_blas_sgemm)");
}

// Row-major X is column-major X^T: C^T = op(B)^T op(A)^T, the operands swapped, the flags kept.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  const float alpha = 1.0f;
  g_sgemm(&cb, &ca, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

bool blas_sgemm_selftest() {
  if (!g_sgemm) return false;
  // C [3, 5] = A [3, 4] B^T (B [5, 4]) + C against the loops: catches an ILP64 or otherwise foreign sgemm_
  float A[12], B[20], C[15], R[15];
  for (int i = 0; i < 12; ++i) A[i] = static_cast<float>(i % 5) - 1.5f;
  for (int i = 0; i < 20; ++i) B[i] = static_cast<float>(i % 7) * 0.25f - 0.5f;
  for (int i = 0; i < 15; ++i) C[i] = R[i] = static_cast<float>(i) * 0.5f;
  gemm(false, true, 3, 5, 4, A, 4, B, 4, 1.0f, C, 5);
  for (int m = 0; m < 3; ++m)
    for (int n = 0; n < 5; ++n) {
      float acc = 0.0f;
      for (int k = 0; k < 4; ++k) acc += A[m * 4 + k] * B[n * 4 + k];
      R[m * 5 + n] += acc;
    }
  for (int i = 0; i < 15; ++i)
    if (std::fabs(C[i] - R[i]) > 1e-5f) return false;
  return true;
}

void fill_rows(float* C, const float* v, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) C[r * cols + c] = v[c];
}

void column_sum(const float* X, int64_t rows, int64_t cols, float* out, bool accumulate) {
  if (!accumulate)
    for (int64_t c = 0; c < cols; ++c) out[c] = 0.0f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c] += X[r * cols + c];
}

void add_part_copies(float* __restrict out, const float* __restrict copies, int64_t stride, int ncopies, int64_t len,
                     bool accumulate) {
  if (!accumulate) {
    for (int k = 0; k < ncopies; ++k) {
      const float* c = copies + k * stride;
      for (int64_t j = 0; j < len; ++j) out[j] += c[j];
    }
    return;
  }
  constexpr int64_t kBlock = 256;
  float sum[kBlock];
  for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
    const int64_t m = std::min(kBlock, len - j0);
    for (int64_t j = 0; j < m; ++j) sum[j] = copies[j0 + j];
    for (int k = 1; k < ncopies; ++k) {
      const float* c = copies + k * stride + j0;
      for (int64_t j = 0; j < m; ++j) sum[j] += c[j];
    }
    for (int64_t j = 0; j < m; ++j) out[j0 + j] += sum[j];
  }
}


namespace {
std::vector<float>& kept(int slot) {
  thread_local std::vector<float> buffers[kScratchSlots];
  if (slot < 0 || slot >= kScratchSlots) throw std::invalid_argument("Scratch: no slot " + std::to_string(slot));
  return buffers[slot];
}
}  // namespace

Scratch::Scratch(std::size_t n, int slot) {
  std::vector<float>& b = kept(slot);
  if (n > kScratchKeepFloats) {
    own_.reset(new float[n]);
    p_ = own_.get();
    return;
  }
  if (b.size() < n) b.resize(n);
  p_ = b.data();
}

std::size_t scratch_kept_floats(int slot) { return kept(slot).size(); }

}  // namespace xlmr_mp
