// Torch launchers for bias + dropout + residual add + LayerNorm (bias_dropout_add_ln.cuh).
// x, residual [..., H] contiguous; bias (optional), gamma, beta [H]; keep (optional, like x): the
// dropout multiplier the caller drew from torch's generator (kernels/bias_dropout_add_layernorm_op.py).
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

// Returns (out, y, mean, rstd).
std::vector<at::Tensor> bdaln_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& residual, const c10::optional<at::Tensor>& keep,
                                  const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  const char* op = "bias_dropout_add_layernorm_fwd";
  check_cuda(x, op, "x");
  check_cuda(residual, op, "residual");
  check_cuda(gamma, op, "weight");
  check_cuda(beta, op, "ln_bias");
  const int H = (int)x.size(-1);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have x's shape");
  TORCH_CHECK(gamma.numel() == H && beta.numel() == H, op, ": weight and ln_bias must be [H]");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cuda(*bias, op, "bias");
    TORCH_CHECK(bias->numel() == H, op, ": bias must be [H]");
  }
  const bool drop = keep.has_value() && keep->defined();
  if (drop) {
    check_cuda(*keep, op, "keep");
    TORCH_CHECK(keep->sizes() == x.sizes(), op, ": keep must have x's shape");
  }
  for (const at::Tensor* t : {&residual, &gamma, &beta})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": all inputs must share x's dtype");
  if (has_bias) TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": all inputs must share x's dtype");
  if (drop) TORCH_CHECK(keep->scalar_type() == x.scalar_type(), op, ": all inputs must share x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const long long rows = x.numel() / std::max(H, 1);
  auto out = at::empty_like(x);
  auto y = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, y, mean, rstd};
  dispatch_float_types(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = 16 / sizeof(T);
    const bool wide = H % W == 0 && aligned16(x) && aligned16(residual) && aligned16(gamma) && aligned16(beta) &&
                (!has_bias || aligned16(*bias)) && (!drop || aligned16(*keep));
    int items = 0, threads = 0;
    TORCH_CHECK(ln_geometry(wide ? H / W : H, &items, &threads), op,
                ": hidden size ", H, " too large (max ", wide ? 8192 * W : 8192, ")");
    const T* b = has_bias ? cptr<T>(*bias) : nullptr;
    const T* k = drop ? cptr<T>(*keep) : nullptr;
    dispatch_items<8>(items, [&](auto it_c) {
      constexpr int I = decltype(it_c)::value;
      if (wide) {
        bdaln_fwd_kernel<T, W, I><<<(unsigned)rows, threads, 0, stream()>>>(
            cptr<T>(x), b, cptr<T>(residual), cptr<T>(gamma), cptr<T>(beta), k, ptr<T>(out), ptr<T>(y),
            ptr<float>(mean), ptr<float>(rstd), H, (float)eps);
      } else {
        bdaln_fwd_kernel<T, 1, I><<<(unsigned)rows, threads, 0, stream()>>>(
            cptr<T>(x), b, cptr<T>(residual), cptr<T>(gamma), cptr<T>(beta), k, ptr<T>(out), ptr<T>(y),
            ptr<float>(mean), ptr<float>(rstd), H, (float)eps);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, y, mean, rstd};
}

// Returns (dx, dresidual, dweight, dln_bias, dbias): dx = dresidual * keep (a copy without keep),
// dbias = dx summed over rows.
std::vector<at::Tensor> bdaln_bwd(const at::Tensor& dout, const at::Tensor& y, const c10::optional<at::Tensor>& keep,
                                  const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "bias_dropout_add_layernorm_bwd";
  check_cuda(dout, op, "grad_out");
  check_cuda(y, op, "y");
  check_cuda(gamma, op, "weight");
  TORCH_CHECK(dout.sizes() == y.sizes() && dout.scalar_type() == y.scalar_type(), op,
              ": grad_out must match the saved y");
  const bool drop = keep.has_value() && keep->defined();
  if (drop) {
    check_cuda(*keep, op, "keep");
    TORCH_CHECK(keep->sizes() == y.sizes() && keep->scalar_type() == y.scalar_type(), op,
                ": keep must match the saved y");
  }
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
                        aligned16(dx) && (!drop || aligned16(*keep));
      int items = 0, threads = 0;
      TORCH_CHECK(ln_geometry(wide ? H / W : H, &items, &threads), op, ": hidden size ", H, " too large");
      const T* k = drop ? cptr<T>(*keep) : nullptr;
      dispatch_items<8>(items, [&](auto it_c) {
        constexpr int I = decltype(it_c)::value;
        if (wide) {
          bdaln_bwd_rows_kernel<T, W, I><<<(unsigned)rows, threads, 0, stream()>>>(
              cptr<T>(dout), cptr<T>(y), k, cptr<T>(gamma), cptr<float>(mean), cptr<float>(rstd),
              ptr<T>(dres), ptr<T>(dx), H);
        } else {
          bdaln_bwd_rows_kernel<T, 1, I><<<(unsigned)rows, threads, 0, stream()>>>(
              cptr<T>(dout), cptr<T>(y), k, cptr<T>(gamma), cptr<float>(mean), cptr<float>(rstd),
              ptr<T>(dres), ptr<T>(dx), H);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      bdaln_bwd_cols_kernel<T><<<dim3((H + 31) / 32, splits), dim3(32, 8), 0, stream()>>>(
          cptr<T>(dout), cptr<T>(y), cptr<T>(dx), cptr<float>(mean), cptr<float>(rstd),
          rows, H, ptr<float>(partial));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto sums = partial.sum(0).to(y.scalar_type());  // [3, H]
  return {dx, dres, sums[0], sums[1], sums[2]};
}

}  // namespace xlmr_mp
