// Torch launchers for the scaled masked softmax (masked_softmax.cuh).
// scores [B, heads, Sq, Sk] contiguous; mask bool/uint8 broadcastable to it (True = masked out),
// last dim Sk or 1 is not allowed to broadcast: it must be Sk with stride 1.
#include "host_common.h"
#include "masked_softmax.cuh"

namespace xlmr_mp {

namespace {

constexpr int kWarpThreads = 128;  // 4 rows per block

// Warp kernels: smallest ITEMS in {1, 2, 4, 8, 16} with Sk <= 32 * VEC * ITEMS; 0 = use block kernel.
int warp_items(int Sk, int vec) {
  for (int it : {1, 2, 4, 8, 16})
    if (Sk <= 32 * vec * it) return it;
  return 0;
}

}  // namespace

at::Tensor scaled_masked_softmax_fwd(const at::Tensor& scores, const c10::optional<at::Tensor>& mask,
                                     double scale) {
  const char* op = "scaled_masked_softmax_fwd";
  check_cuda(scores, op, "scores");
  TORCH_CHECK(scores.dim() == 4, op, ": scores must be [B, heads, Sq, Sk]");
  const int B = (int)scores.size(0), heads = (int)scores.size(1), Sq = (int)scores.size(2),
            Sk = (int)scores.size(3);
  const c10::cuda::CUDAGuard guard(scores.device());
  MaskView mv{nullptr, 0, 0, 0, heads, Sq};
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->is_cuda(), op, ": mask must be a CUDA tensor");
    TORCH_CHECK(mask->dim() == 4, op, ": mask must be 4-d, broadcastable to [B, heads, Sq, Sk]");
    m = mask->scalar_type() == at::kBool ? mask->view(at::kByte) : *mask;
    TORCH_CHECK(m.scalar_type() == at::kByte, op, ": mask must be bool or uint8");
    m = m.expand({B, heads, Sq, Sk});
    if (m.stride(3) != 1) m = m.contiguous();
    mv.ptr = m.data_ptr<uint8_t>();
    mv.sb = m.stride(0);
    mv.sh = m.stride(1);
    mv.sq = m.stride(2);
  }
  auto out = at::empty_like(scores);
  const long long rows = (long long)B * heads * Sq;
  if (rows == 0 || Sk == 0) return out;
  dispatch_float_types(scores.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const bool vec4 = Sk % 4 == 0 && reinterpret_cast<std::uintptr_t>(scores.data_ptr()) % (4 * sizeof(T)) == 0;
    const int items = warp_items(Sk, vec4 ? 4 : 1);
    const unsigned blocks = (unsigned)((rows + kWarpThreads / 32 - 1) / (kWarpThreads / 32));
    if (items == 0) {
      softmax_block_fwd_kernel<T><<<(unsigned)rows, 256, 0, stream()>>>(cptr<T>(scores), mv, ptr<T>(out), Sk,
                                                                       (float)scale);
    } else {
      dispatch_items<16>(items, [&](auto it_c) {
        constexpr int I = decltype(it_c)::value;
        if (vec4)
          softmax_warp_fwd_kernel<T, 4, I><<<blocks, kWarpThreads, 0, stream()>>>(
              cptr<T>(scores), mv, ptr<T>(out), rows, Sk, (float)scale);
        else
          softmax_warp_fwd_kernel<T, 1, I><<<blocks, kWarpThreads, 0, stream()>>>(
              cptr<T>(scores), mv, ptr<T>(out), rows, Sk, (float)scale);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor scaled_masked_softmax_bwd(const at::Tensor& dy, const at::Tensor& y, double scale) {
  const char* op = "scaled_masked_softmax_bwd";
  check_cuda(dy, op, "grad_out");
  check_cuda(y, op, "y");
  TORCH_CHECK(dy.sizes() == y.sizes() && dy.scalar_type() == y.scalar_type(), op,
              ": grad_out must match the saved output");
  const c10::cuda::CUDAGuard guard(y.device());
  const int Sk = (int)y.size(-1);
  const long long rows = Sk == 0 ? 0 : y.numel() / Sk;
  auto ds = at::empty_like(y);
  if (rows == 0) return ds;
  dispatch_float_types(y.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const bool vec4 = Sk % 4 == 0 && aligned16(dy) && aligned16(y) && aligned16(ds);
    const int items = warp_items(Sk, vec4 ? 4 : 1);
    const unsigned blocks = (unsigned)((rows + kWarpThreads / 32 - 1) / (kWarpThreads / 32));
    if (items == 0) {
      softmax_block_bwd_kernel<T><<<(unsigned)rows, 256, 0, stream()>>>(cptr<T>(dy), cptr<T>(y), ptr<T>(ds), Sk,
                                                                       (float)scale);
    } else {
      dispatch_items<16>(items, [&](auto it_c) {
        constexpr int I = decltype(it_c)::value;
        if (vec4)
          softmax_warp_bwd_kernel<T, 4, I><<<blocks, kWarpThreads, 0, stream()>>>(
              cptr<T>(dy), cptr<T>(y), ptr<T>(ds), rows, Sk, (float)scale);
        else
          softmax_warp_bwd_kernel<T, 1, I><<<blocks, kWarpThreads, 0, stream()>>>(
              cptr<T>(dy), cptr<T>(y), ptr<T>(ds), rows, Sk, (float)scale);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ds;
}

}  // namespace xlmr_mp
