// Host-side helpers for the torch launchers (csrc/cuda/*_host.cu): dtype dispatch onto the device
// types (float / __half / __nv_bfloat16), argument checks, launch geometry. Uses only c10/ATen
// headers that need no CUDA math libraries, so it also compiles against a CPU build of torch.
#pragma once
// Method operators plus the few factory functions used, not <ATen/ATen.h>: a much faster compile.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace xlmr_mp {

// Calls f(T{}) with T the device type of `st`.
template <typename F>
void dispatch_float_types(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", st, " (float32, float16, bfloat16)");
  }
}

// Calls f(std::integral_constant<int, I>{}) for the compile-time I in {1, 2, 4, ..., MaxItems} equal to
// `items` (a power of two; larger values take MaxItems): per-thread item counts of the row kernels.
template <int MaxItems, int I = 1, typename F>
void dispatch_items(int items, F&& f) {
  if constexpr (I >= MaxItems) {
    f(std::integral_constant<int, I>{});
  } else {
    if (items <= I) f(std::integral_constant<int, I>{});
    else dispatch_items<MaxItems, I * 2>(items, std::forward<F>(f));
  }
}

template <typename T>
inline T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

template <typename T>
inline const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// Grid for a grid-stride loop over `work` items with `threads` per block.
inline unsigned grid_for(long long work, int threads) {
  const long long blocks = (work + threads - 1) / threads;
  const long long cap = (long long)sm_count() * 32;
  return (unsigned)std::max<long long>(1, std::min(blocks, cap));
}

// Row split for column reductions: enough blocks to fill the device.
inline int col_splits(long long rows, int cols) {
  const long long col_blocks = (cols + 31) / 32;
  long long s = std::max<long long>(1, 4LL * sm_count() / std::max<long long>(1, col_blocks));
  return (int)std::min<long long>(s, std::max<long long>(1, (rows + 7) / 8));
}

}  // namespace xlmr_mp
