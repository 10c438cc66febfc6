// Fused bias + exact (erf) GELU, the FFN activation: y = gelu(x + b) over x [rows, H], b [H].
// Forward and backward; templated on float / __half / __nv_bfloat16; VEC elements per access
// (H % VEC == 0 and 16-byte-aligned rows when VEC > 1). Math in fp32. No torch includes.
#pragma once
#include "common.cuh"

namespace xlmr_mp {

__device__ __forceinline__ float gelu_f(float z) {
  return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
}

// d gelu(z) / dz = Phi(z) + z * phi(z)
__device__ __forceinline__ float gelu_grad_f(float z) {
  const float cdf = 0.5f * (1.f + erff(z * 0.70710678118654752f));
  const float pdf = 0.3989422804014327f * __expf(-0.5f * z * z);
  return cdf + z * pdf;
}

// out = gelu(x + bias); n = rows * H elements; grid-stride over packs of VEC.
template <typename T, int VEC>
__global__ void bias_gelu_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                     T* __restrict__ out, long long n, int H) {
  typedef Pack<T, VEC> P;
  const long long packs = n / VEC;
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < packs;
       k += (long long)gridDim.x * blockDim.x) {
    const long long e = k * VEC;
    const int col = (int)(e % H);
    P xv = reinterpret_cast<const P*>(x)[k];
    P bv = *reinterpret_cast<const P*>(bias + col);
    P ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) ov.v[j] = from_float<T>(gelu_f(to_float(xv.v[j]) + to_float(bv.v[j])));
    reinterpret_cast<P*>(out)[k] = ov;
  }
}

// dx = dout * gelu'(x + bias). The bias gradient is the column sum of dx (col_sum_partial_kernel).
template <typename T, int VEC>
__global__ void bias_gelu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                                     const T* __restrict__ bias, T* __restrict__ dx, long long n,
                                     int H) {
  typedef Pack<T, VEC> P;
  const long long packs = n / VEC;
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < packs;
       k += (long long)gridDim.x * blockDim.x) {
    const long long e = k * VEC;
    const int col = (int)(e % H);
    P gv = reinterpret_cast<const P*>(dout)[k];
    P xv = reinterpret_cast<const P*>(x)[k];
    P bv = *reinterpret_cast<const P*>(bias + col);
    P ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      ov.v[j] = from_float<T>(to_float(gv.v[j]) * gelu_grad_f(to_float(xv.v[j]) + to_float(bv.v[j])));
    reinterpret_cast<P*>(dx)[k] = ov;
  }
}

}  // namespace xlmr_mp
