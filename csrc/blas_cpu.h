// Row-major GEMM for the C++ layer and head calls (encoder_layer_cpu, mlm_head_cpu) through the
// Fortran BLAS sgemm_ that torch itself calls on a CPU (MKL's in the x86 wheels): Python finds it in
// libtorch_cpu once (xlmr_mp/kernels/cpu_fast_path.py) and hands it over with set_blas_sgemm, so every
// product has torch.mm's bits and runs on torch's MKL threads. Plus the small row helpers around it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace xlmr_mp {

// Fortran BLAS sgemm_ (LP64: 32-bit integers), column-major.
using SgemmFn = void (*)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                         const float* beta, float* c, const int* ldc);
void set_blas_sgemm(SgemmFn fn);
// One small product through it against plain loops (false: no sgemm set, or one with another ABI).
bool blas_sgemm_selftest();
// Throws std::runtime_error naming `who` when no sgemm was set.
void require_blas(const char* who);

// Row-major C [M, N] = op(A) op(B) + beta C, op(A) [M, K], op(B) [K, N] (ta / tb: transposed).
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc);
// Each row of C [rows, cols] set to v [cols] (what addmm's beta = 1 then adds the product to).
void fill_rows(float* C, const float* v, int64_t rows, int64_t cols);
// out [cols] (+)= the sum over the rows of X [rows, cols], row by row (a fixed order).
void column_sum(const float* X, int64_t rows, int64_t cols, float* out, bool accumulate);
// out[0, len) (+)= the ncopies copies at copies + k * stride (the per-part parameter-gradient copies of
// the encoder's and the head's parts): with `accumulate` their sum, taken in order, is added to out once
// (as autograd's `grad += new`), else out (part 0's gradient) is the first term and each copy is added
// in turn. In blocks, each loop a plain vectorisable pass.
void add_part_copies(float* out, const float* copies, int64_t stride, int ncopies, int64_t len, bool accumulate);
// Temporary floats for one call: up to kScratchKeepFloats from a per-thread buffer kept for the
// thread's life (no allocation and no fresh pages, so no page faults once grown, where a buffer per
// call faults its pages in anew: bench/results/README.md); a larger request gets its own buffer, freed at
// the end of the call (a [rows, 250k] logits chunk is not worth holding between steps). `slot`
// keeps users apart: 0 the encoder layer, 1 the head, 2 the embeddings, 3 the encoder layer's
// per-part gradient copies (taken by the calling thread beside its slot 0), 4 the encoder's
// transposed weights (its forward, read by every part), 5 the head's per-part gradient copies.
constexpr int kScratchSlots = 6;
constexpr std::size_t kScratchKeepFloats = std::size_t(1) << 22;  // 16 MiB
class Scratch {
 public:
  Scratch(std::size_t n, int slot);
  float* data() const { return p_; }

 private:
  std::unique_ptr<float[]> own_;  // not zero-filled
  float* p_;
};
// Floats this thread keeps in `slot` between calls (at most kScratchKeepFloats).
std::size_t scratch_kept_floats(int slot);

}  // namespace xlmr_mp
