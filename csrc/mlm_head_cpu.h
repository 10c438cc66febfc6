// The masked-LM head and its loss over the masked rows as ONE C++ call on a CPU (fp32, AVX2 + FMA):
//   d = h Wd^T,  a = gelu(d + bd),  z = LN(a),  loss = sum_i CE(z_i Wdec^T + bdec, target_i)
// with the gradients for an upstream gradient of 1 computed in the same call (the loss's softmax
// rows never outlive their chunk), as parallel/vocab.py's chunked loss does at TP = 1. The torch
// reference is the module path (MLMHead.transform + vocab_parallel_masked_lm_loss); the Python
// wrapper is xlmr_mp/kernels/mlm_head_cpu.py.
#pragma once
#include <cstdint>

#include "blas_cpu.h"
#include "cpu_kernels.h"

namespace xlmr_mp {

struct HeadShape {
  int64_t rows, hidden, vocab, chunk;  // M masked rows, H, the decoder's real rows (n_real), rows per chunk
};

struct HeadParams {
  const float *w_dense, *b_dense, *ln_weight, *ln_bias, *w_dec, *b_dec;  // b_dec may be null
};

// Gradients written (w_dec / b_dec: added to, over their first `vocab` rows; the caller zeroes
// them); all null: forward only.
struct HeadGrads {
  float *h, *w_dense, *b_dense, *ln_weight, *ln_bias, *w_dec, *b_dec;
};

// Sum over the rows of the cross-entropy against target (ids of the decoder's rows; an id outside
// [0, vocab) adds no target term, as xent_rows), from h [M, H]; gradients into g when g.h != null.
double mlm_head_loss(const HeadShape& s, const float* h, const int64_t* target, const HeadParams& p, float eps,
                     const HeadGrads& g, int threads);

// The same over the rows of h [T, H] whose label is not `ignore`, against label - offset: the masked
// rows gathered here (s.rows is ignored), g.h [T, H] written whole (0 at the other rows), and
// *count set to the number of masked rows. No masked row: loss 0, g.h and the written gradients 0.
// With gradients and several threads the masked rows may be cut into parts (mlm_head_parts), one a
// thread, each running mlm_head_loss single-threaded; their parameter gradients are summed in part order.
double mlm_head_loss_labels(const HeadShape& s, int64_t T, const float* h, const int64_t* labels, int64_t ignore,
                            int64_t offset, const HeadParams& p, float eps, const HeadGrads& g, int threads,
                            int64_t* count);

// Parts mlm_head_loss_labels cuts `rows` masked rows into at `threads` threads (1: one threaded pass).
int mlm_head_parts(int64_t rows, int64_t hidden, int64_t vocab, int threads);

}  // namespace xlmr_mp
