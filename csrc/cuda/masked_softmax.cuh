// Scaled masked softmax for attention without a flash kernel (sm_70):
//   y = softmax(scale * s + (mask ? -inf : 0)) over the last dim of s [B, heads, Sq, Sk].
// mask (uint8, 1 = masked out) is addressed through element strides (msb, msh, msq) so any
// broadcast of [B|1, heads|1, Sq|1, Sk] works without a copy; mask may be null. A fully masked
// row gives NaN, like torch.softmax of an all -inf row. Backward: ds = scale * y * (dy - sum(dy*y)).
// Warp-per-row kernels keep the row in registers (Sk <= 32 * VEC * ITEMS); block-per-row kernels
// handle any Sk. Math in fp32. No torch includes.
#pragma once
#include "common.cuh"

namespace xlmr_mp {

struct MaskView {
  const unsigned char* ptr;  // null: no mask
  long long sb, sh, sq;      // element strides of batch, head, query (0 where broadcast)
  int heads, Sq;
  __device__ __forceinline__ const unsigned char* row(long long r) const {
    if (ptr == nullptr) return nullptr;
    const long long q = r % Sq, h = (r / Sq) % heads, b = r / ((long long)Sq * heads);
    return ptr + b * sb + h * sh + q * sq;
  }
};

// One warp per row; blockDim.x = 128 (4 rows per block).
template <typename T, int VEC, int ITEMS>
__global__ void softmax_warp_fwd_kernel(const T* __restrict__ in, MaskView mask, T* __restrict__ out,
                                        long long rows, int Sk, float scale) {
  typedef Pack<T, VEC> P;
  const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const unsigned char* mrow = mask.row(r);
  const T* src = in + r * Sk;
  float v[ITEMS][VEC];
  float mx = neg_inf();
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (lane + it * 32) * VEC;
    if (c < Sk) {
      P pv = *reinterpret_cast<const P*>(src + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const bool m = mrow != nullptr && mrow[c + j];
        v[it][j] = m ? neg_inf() : to_float(pv.v[j]) * scale;
        mx = fmaxf(mx, v[it][j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[it][j] = neg_inf();
    }
  }
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[it][j] = __expf(v[it][j] - mx);
      sum += v[it][j];
    }
  const float inv = 1.f / warp_sum(sum);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (lane + it * 32) * VEC;
    if (c < Sk) {
      P ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) ov.v[j] = from_float<T>(v[it][j] * inv);
      *reinterpret_cast<P*>(out + r * Sk + c) = ov;
    }
  }
}

template <typename T, int VEC, int ITEMS>
__global__ void softmax_warp_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                        T* __restrict__ ds, long long rows, int Sk, float scale) {
  typedef Pack<T, VEC> P;
  const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  float gy[ITEMS][VEC], yy[ITEMS][VEC];
  float dot = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (lane + it * 32) * VEC;
    if (c < Sk) {
      P gv = *reinterpret_cast<const P*>(dy + r * Sk + c);
      P yv = *reinterpret_cast<const P*>(y + r * Sk + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        gy[it][j] = to_float(gv.v[j]);
        yy[it][j] = to_float(yv.v[j]);
        dot += gy[it][j] * yy[it][j];
      }
    }
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (lane + it * 32) * VEC;
    if (c < Sk) {
      P ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) ov.v[j] = from_float<T>(scale * yy[it][j] * (gy[it][j] - dot));
      *reinterpret_cast<P*>(ds + r * Sk + c) = ov;
    }
  }
}

// One block per row, any Sk: three passes over the row (max, sum, write); the row stays in L2.
template <typename T>
__global__ void softmax_block_fwd_kernel(const T* __restrict__ in, MaskView mask, T* __restrict__ out,
                                         int Sk, float scale) {
  __shared__ float smem[32];
  const long long r = blockIdx.x;
  const unsigned char* mrow = mask.row(r);
  const T* src = in + r * Sk;
  float mx = neg_inf();
  for (int c = threadIdx.x; c < Sk; c += blockDim.x)
    if (mrow == nullptr || !mrow[c]) mx = fmaxf(mx, to_float(src[c]) * scale);
  mx = block_max(mx, smem);
  float sum = 0.f;
  for (int c = threadIdx.x; c < Sk; c += blockDim.x)
    if (mrow == nullptr || !mrow[c]) sum += __expf(to_float(src[c]) * scale - mx);
  const float inv = 1.f / block_sum(sum, smem);
  for (int c = threadIdx.x; c < Sk; c += blockDim.x) {
    const bool m = mrow != nullptr && mrow[c];
    out[r * Sk + c] = from_float<T>(m ? 0.f * inv : __expf(to_float(src[c]) * scale - mx) * inv);
  }
}

template <typename T>
__global__ void softmax_block_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                         T* __restrict__ ds, int Sk, float scale) {
  __shared__ float smem[32];
  const long long r = blockIdx.x;
  float dot = 0.f;
  for (int c = threadIdx.x; c < Sk; c += blockDim.x) dot += to_float(dy[r * Sk + c]) * to_float(y[r * Sk + c]);
  dot = block_sum(dot, smem);
  for (int c = threadIdx.x; c < Sk; c += blockDim.x) {
    const float yv = to_float(y[r * Sk + c]);
    ds[r * Sk + c] = from_float<T>(scale * yv * (to_float(dy[r * Sk + c]) - dot));
  }
}

}  // namespace xlmr_mp
