// Torch launchers for bias + GELU (bias_gelu.cuh). x [..., H] contiguous, bias [H].
#include "bias_gelu.cuh"
#include "host_common.h"

namespace xlmr_mp {

at::Tensor bias_gelu_fwd(const at::Tensor& x, const at::Tensor& bias) {
  check_cuda(x, "bias_gelu_fwd", "x");
  check_cuda(bias, "bias_gelu_fwd", "bias");
  const int H = (int)bias.numel();
  TORCH_CHECK(x.size(-1) == H && bias.dim() == 1, "bias_gelu_fwd: bias must be [x.size(-1)]");
  TORCH_CHECK(x.scalar_type() == bias.scalar_type(), "bias_gelu_fwd: x and bias dtypes differ");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  const long long n = x.numel();
  if (n == 0) return out;
  dispatch_float_types(x.scalar_type(), "bias_gelu_fwd", [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = 16 / sizeof(T);
    const bool wide = H % W == 0 && aligned16(x) && aligned16(bias) && aligned16(out);
    const int threads = 256;
    if (wide) {
      bias_gelu_fwd_kernel<T, W><<<grid_for(n / W, threads), threads, 0, stream()>>>(
          cptr<T>(x), cptr<T>(bias), ptr<T>(out), n, H);
    } else {
      bias_gelu_fwd_kernel<T, 1><<<grid_for(n, threads), threads, 0, stream()>>>(
          cptr<T>(x), cptr<T>(bias), ptr<T>(out), n, H);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Returns (dx, dbias).
std::vector<at::Tensor> bias_gelu_bwd(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& bias) {
  check_cuda(dout, "bias_gelu_bwd", "dout");
  check_cuda(x, "bias_gelu_bwd", "x");
  check_cuda(bias, "bias_gelu_bwd", "bias");
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(),
              "bias_gelu_bwd: dout must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int H = (int)bias.numel();
  const long long n = x.numel(), rows = n / std::max(H, 1);
  auto dx = at::empty_like(x);
  if (n == 0) return {dx, at::zeros_like(bias)};
  const int splits = col_splits(rows, H);
  auto partial = at::empty({splits, H}, x.options().dtype(at::kFloat));
  dispatch_float_types(x.scalar_type(), "bias_gelu_bwd", [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = 16 / sizeof(T);
    const bool wide = H % W == 0 && aligned16(x) && aligned16(bias) && aligned16(dout) && aligned16(dx);
    const int threads = 256;
    if (wide) {
      bias_gelu_bwd_kernel<T, W><<<grid_for(n / W, threads), threads, 0, stream()>>>(
          cptr<T>(dout), cptr<T>(x), cptr<T>(bias), ptr<T>(dx), n, H);
    } else {
      bias_gelu_bwd_kernel<T, 1><<<grid_for(n, threads), threads, 0, stream()>>>(
          cptr<T>(dout), cptr<T>(x), cptr<T>(bias), ptr<T>(dx), n, H);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    col_sum_partial_kernel<T><<<dim3((H + 31) / 32, splits), dim3(32, 8), 0, stream()>>>(
        cptr<T>(dx), rows, H, ptr<float>(partial));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, partial.sum(0).to(bias.scalar_type())};
}

}  // namespace xlmr_mp
