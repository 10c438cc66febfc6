// Torch launchers for the masked-LM vocabulary-shard cross-entropy (mlm_xent.cuh).
// logits [M, V] (row stride may exceed V), target [M] int64 local column or -1.
#include "host_common.h"
#include "mlm_xent.cuh"

namespace xlmr_mp {

namespace {

void check_logits(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  TORCH_CHECK(logits.is_cuda() && target.is_cuda(), op, ": logits and target must be CUDA tensors");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, op, ": logits must be [M, V] with unit column stride");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong &&
                  target.is_contiguous(),
              op, ": target must be a contiguous int64 [M]");
}

}  // namespace

// Returns (lse_local [M] fp32, target_logit [M] fp32, 0 where the target is not in this shard).
std::vector<at::Tensor> mlm_xent_stats(const at::Tensor& logits, const at::Tensor& target) {
  const char* op = "mlm_xent_stats";
  check_logits(logits, target, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const long long M = logits.size(0);
  const int V = (int)logits.size(1);
  auto tgt_logit = at::zeros({M}, logits.options().dtype(at::kFloat));
  at::Tensor lse;
  if (M == 0 || V == 0) return {at::full({M}, -INFINITY, tgt_logit.options()), tgt_logit};
  const int threads = 256;
  int splits = 1;
  dispatch_float_types(logits.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = 16 / sizeof(T);
    const bool wide = V % W == 0 && logits.stride(0) % W == 0 && aligned16(logits);
    const int vec = wide ? W : 1;
    // Split columns until M * splits fills the device (2 waves), but keep >= 8 packs per thread.
    const long long want = (2LL * sm_count() * 8 + M - 1) / M;
    const long long max_splits = std::max<long long>(1, V / (threads * vec * 8));
    splits = (int)std::max<long long>(1, std::min(want, max_splits));
    const int chunk = ((V + splits - 1) / splits + vec - 1) / vec * vec;
    splits = (V + chunk - 1) / chunk;
    auto pmax = at::empty({M, splits}, tgt_logit.options());
    auto psum = at::empty({M, splits}, tgt_logit.options());
    const dim3 grid((unsigned)M, (unsigned)splits);
    if (wide)
      xent_stats_kernel<T, W><<<grid, threads, 0, stream()>>>(cptr<T>(logits), logits.stride(0), V, chunk,
                                                              reinterpret_cast<const long long*>(target.data_ptr<int64_t>()), ptr<float>(pmax),
                                                              ptr<float>(psum), ptr<float>(tgt_logit));
    else
      xent_stats_kernel<T, 1><<<grid, threads, 0, stream()>>>(cptr<T>(logits), logits.stride(0), V, chunk,
                                                              reinterpret_cast<const long long*>(target.data_ptr<int64_t>()), ptr<float>(pmax),
                                                              ptr<float>(psum), ptr<float>(tgt_logit));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Merge the chunk partials: lse = max + log(sum_s psum_s * exp(pmax_s - max)).
    auto gmax = std::get<0>(pmax.max(1, /*keepdim=*/true));
    lse = gmax.squeeze(1) + (psum * (pmax - gmax).exp()).sum(1).log();
  });
  return {lse, tgt_logit};
}

// In place: logits <- gscale[:, None] * (softmax(logits; lse) - onehot(target)). Returns logits.
at::Tensor mlm_xent_grad_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                          const at::Tensor& gscale) {
  const char* op = "mlm_xent_grad_";
  check_logits(logits, target, op);
  for (const at::Tensor* t : {&lse, &gscale})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == logits.size(0),
                op, ": lse and grad scale must be contiguous float32 [M] CUDA tensors");
  const c10::cuda::CUDAGuard guard(logits.device());
  const long long M = logits.size(0);
  const int V = (int)logits.size(1);
  if (M == 0 || V == 0) return logits;
  const int threads = 256;
  dispatch_float_types(logits.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = 16 / sizeof(T);
    const bool wide = V % W == 0 && logits.stride(0) % W == 0 && aligned16(logits);
    const int vec = wide ? W : 1;
    const dim3 grid((unsigned)M, (unsigned)((V + threads * vec - 1) / (threads * vec)));
    if (wide)
      xent_grad_kernel<T, W><<<grid, threads, 0, stream()>>>(ptr<T>(logits), logits.stride(0), V,
                                                             reinterpret_cast<const long long*>(target.data_ptr<int64_t>()), cptr<float>(lse),
                                                             cptr<float>(gscale));
    else
      xent_grad_kernel<T, 1><<<grid, threads, 0, stream()>>>(ptr<T>(logits), logits.stride(0), V,
                                                             reinterpret_cast<const long long*>(target.data_ptr<int64_t>()), cptr<float>(lse),
                                                             cptr<float>(gscale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return logits;
}

}  // namespace xlmr_mp
