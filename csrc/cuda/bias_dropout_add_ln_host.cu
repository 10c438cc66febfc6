// Torch launchers for bias + dropout + residual add + LayerNorm (bias_dropout_add_ln.cuh).
// x, residual [..., H] contiguous; bias (optional), gamma, beta [H]. Dropout bits come from torch's
// CUDA generator (Philox seed/offset), so torch.manual_seed makes them reproducible.
#include <ATen/cuda/CUDAGeneratorImpl.h>

#include <mutex>

#include "bias_dropout_add_ln.cuh"
#include "host_common.h"

namespace xlmr_mp {

namespace {

// Smallest ITEMS in {1, 2, 4, 8} with packs <= 1024 * ITEMS; threads = packs / ITEMS rounded up to 32.
bool ln_geometry(int packs, int* items, int* threads) {
  for (int it : {1, 2, 4, 8}) {
    if (packs <= 1024 * it) {
      *items = it;
      *threads = std::max(32, ((packs + it - 1) / it + 31) / 32 * 32);
      return true;
    }
  }
  return false;
}

}  // namespace

// Returns (out, y, keep_mask (empty when not dropping), mean, rstd).
std::vector<at::Tensor> bdaln_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& residual, const at::Tensor& gamma,
                                  const at::Tensor& beta, double p, bool training, double eps) {
  const char* op = "bias_dropout_add_layernorm_fwd";
  check_cuda(x, op, "x");
  check_cuda(residual, op, "residual");
  check_cuda(gamma, op, "weight");
  check_cuda(beta, op, "ln_bias");
  const int H = (int)x.size(-1);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have x's shape");
  TORCH_CHECK(gamma.numel() == H && beta.numel() == H, op, ": weight and ln_bias must be [H]");
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout p must be in [0, 1), got ", p);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cuda(*bias, op, "bias");
    TORCH_CHECK(bias->numel() == H, op, ": bias must be [H]");
  }
  for (const at::Tensor* t : {&residual, &gamma, &beta})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": all inputs must share x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const long long rows = x.numel() / std::max(H, 1);
  const bool drop = training && p > 0.0;
  auto out = at::empty_like(x);
  auto y = at::empty_like(x);
  auto keep = drop ? at::empty(x.sizes(), x.options().dtype(at::kByte)) : at::Tensor();
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, y, keep, mean, rstd};
  uint64_t seed = 0, offset = 0;
  if (drop) {
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        c10::nullopt, at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    std::tie(seed, offset) = gen->philox_engine_inputs(4);
  }
  dispatch_float_types(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = 16 / sizeof(T);
    const bool wide = H % W == 0 && aligned16(x) && aligned16(residual) && aligned16(gamma) && aligned16(beta) &&
                (!has_bias || aligned16(*bias));
    int items = 0, threads = 0;
    TORCH_CHECK(ln_geometry(wide ? H / W : H, &items, &threads), op,
                ": hidden size ", H, " too large (max ", wide ? 8192 * W : 8192, ")");
    const T* b = has_bias ? cptr<T>(*bias) : nullptr;
    unsigned char* k = drop ? keep.data_ptr<uint8_t>() : nullptr;
    dispatch_items<8>(items, [&](auto it_c) {
      constexpr int I = decltype(it_c)::value;
      if (wide) {
        bdaln_fwd_kernel<T, W, I><<<(unsigned)rows, threads, 0, stream()>>>(
            cptr<T>(x), b, cptr<T>(residual), cptr<T>(gamma), cptr<T>(beta), ptr<T>(out), ptr<T>(y), k,
            ptr<float>(mean), ptr<float>(rstd), H, (float)p, (float)eps, seed, offset);
      } else {
        bdaln_fwd_kernel<T, 1, I><<<(unsigned)rows, threads, 0, stream()>>>(
            cptr<T>(x), b, cptr<T>(residual), cptr<T>(gamma), cptr<T>(beta), ptr<T>(out), ptr<T>(y), k,
            ptr<float>(mean), ptr<float>(rstd), H, (float)p, (float)eps, seed, offset);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, y, keep, mean, rstd};
}

// Returns (dx, dresidual, dweight, dln_bias, dbias (empty unless has_bias)).
std::vector<at::Tensor> bdaln_bwd(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& keep,
                                  const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd,
                                  double p, bool has_bias) {
  const char* op = "bias_dropout_add_layernorm_bwd";
  check_cuda(dout, op, "grad_out");
  check_cuda(y, op, "y");
  check_cuda(gamma, op, "weight");
  TORCH_CHECK(dout.sizes() == y.sizes() && dout.scalar_type() == y.scalar_type(), op,
              ": grad_out must match the saved y");
  const bool drop = keep.defined() && keep.numel() > 0;
  if (drop) check_cuda(keep, op, "keep_mask");
  const c10::cuda::CUDAGuard guard(y.device());
  const int H = (int)y.size(-1);
  const long long rows = y.numel() / std::max(H, 1);
  auto dres = at::empty_like(y);
  auto dx = at::empty_like(y);
  const int splits = col_splits(rows, H);
  auto partial = at::zeros({splits, 3, H}, y.options().dtype(at::kFloat));
  if (rows > 0) {
    dispatch_float_types(y.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      constexpr int W = 16 / sizeof(T);
      const bool wide = H % W == 0 && aligned16(dout) && aligned16(y) && aligned16(gamma) && aligned16(dres) &&
                        aligned16(dx) && (!drop || aligned16(keep));
      int items = 0, threads = 0;
      TORCH_CHECK(ln_geometry(wide ? H / W : H, &items, &threads), op, ": hidden size ", H, " too large");
      const unsigned char* k = drop ? keep.data_ptr<uint8_t>() : nullptr;
      dispatch_items<8>(items, [&](auto it_c) {
        constexpr int I = decltype(it_c)::value;
        if (wide) {
          bdaln_bwd_rows_kernel<T, W, I><<<(unsigned)rows, threads, 0, stream()>>>(
              cptr<T>(dout), cptr<T>(y), k, cptr<T>(gamma), cptr<float>(mean), cptr<float>(rstd),
              ptr<T>(dres), ptr<T>(dx), H, (float)p);
        } else {
          bdaln_bwd_rows_kernel<T, 1, I><<<(unsigned)rows, threads, 0, stream()>>>(
              cptr<T>(dout), cptr<T>(y), k, cptr<T>(gamma), cptr<float>(mean), cptr<float>(rstd),
              ptr<T>(dres), ptr<T>(dx), H, (float)p);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      bdaln_bwd_cols_kernel<T><<<dim3((H + 31) / 32, splits), dim3(32, 8), 0, stream()>>>(
          cptr<T>(dout), cptr<T>(y), has_bias ? cptr<T>(dx) : nullptr, cptr<float>(mean), cptr<float>(rstd),
          rows, H, ptr<float>(partial));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto sums = partial.sum(0).to(y.scalar_type());  // [3, H]
  return {dx, dres, sums[0], sums[1], has_bias ? sums[2] : at::Tensor()};
}

}  // namespace xlmr_mp
