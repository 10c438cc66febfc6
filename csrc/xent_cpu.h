// Softmax cross-entropy of logit rows with their gradient, for CPU (fp32, AVX2 + FMA): the row pass
// of the chunked masked-LM loss at TP = 1 (xlmr_mp/parallel/vocab.py), whose torch reference is the
// amax / exp / sum / log / gather / divide / scatter sequence beside it there.
#pragma once
#include <cstdint>

namespace xlmr_mp {

// For each of the M rows of logits [M, V] (row stride V), target t = target[i]:
//   loss[i] = log(sum_j exp(l_j - max)) - (l_t - max)   (without the target term when t is outside
//             [0, V): another vocabulary shard's id, as the reference's local_targets gives -1)
//   logits row <- softmax(row) - onehot(t)                (the gradient of loss[i], in place)
void xent_rows(float* logits, const int64_t* target, float* loss, int64_t M, int64_t V, int threads);

}  // namespace xlmr_mp
