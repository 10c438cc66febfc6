// Device-side helpers shared by the xlmr_mp kernels: dtype conversion, vector packs, reductions.
// Self-contained (cuda_fp16.h / cuda_bf16.h only, no torch, no std headers)
// so every kernel header compiles on its own with nvcc or NVRTC (sm_70 through NVRTC + ptxas).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace xlmr_mp {

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

template <typename T> __device__ __forceinline__ float to_float(T x) { return Cvt<T>::to(x); }
template <typename T> __device__ __forceinline__ T from_float(float x) { return Cvt<T>::from(x); }

// N contiguous elements moved with one (N * sizeof(T))-byte load/store.
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block, returned to every thread. blockDim.x is a multiple of 32;
// smem holds at least 32 floats.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[wid] = v;
  __syncthreads();
  return warp_sum(lane < nw ? smem[lane] : 0.f);
}

__device__ __forceinline__ float block_max(float v, float* smem) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[wid] = v;
  __syncthreads();
  return warp_max(lane < nw ? smem[lane] : neg_inf());
}

// Online-softmax state (running max m, sum of exp(x - m)) and its merge.
struct MaxSum { float m, s; };

__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == neg_inf()) return MaxSum{m, 0.f};
  return MaxSum{m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_maxsum(MaxSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum u{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = maxsum_merge(v, u);
  }
  return v;
}

// Column sums of a [rows, cols] row-major matrix, split over row groups: partial[gridDim.y, cols]
// (fp32). Block (32, 8); grid (ceil(cols / 32), splits). The caller sums partial over dim 0.
template <typename T>
__global__ void col_sum_partial_kernel(const T* __restrict__ a, long long rows, int cols,
                                       float* __restrict__ partial) {
  __shared__ float tile[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.f;
  if (c < cols)
    for (long long r = (long long)blockIdx.y * 8 + threadIdx.y; r < rows; r += (long long)gridDim.y * 8)
      acc += to_float(a[r * cols + c]);
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s += tile[i][threadIdx.x];
    partial[(long long)blockIdx.y * cols + c] = s;
  }
}

}  // namespace xlmr_mp
