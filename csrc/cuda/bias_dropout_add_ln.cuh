// Fused post-LayerNorm sublayer epilogue, run twice per XLM-R layer:
//   y   = residual + keep * (x + bias)          (each step rounded to T, as the torch composition does)
//   out = LayerNorm(y) * gamma + beta
// x, residual, out, y, keep [rows, H]; bias, gamma, beta [H]; bias and keep may be null. keep is the
// dropout multiplier drawn by the caller (0 where dropped, 1 / (1 - p) where kept: F.dropout's), so
// the kernel is deterministic. Forward saves y and per-row mean / rstd (fp32) for the backward.
// One row per block; each thread keeps ITEMS packs of VEC elements in registers.
// No torch includes.
#pragma once
#include "common.cuh"

namespace xlmr_mp {

template <typename T, int VEC, int ITEMS>
__global__ void bdaln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                 const T* __restrict__ residual, const T* __restrict__ gamma,
                                 const T* __restrict__ beta, const T* __restrict__ keep,
                                 T* __restrict__ out, T* __restrict__ y_save,
                                 float* __restrict__ mean_out, float* __restrict__ rstd_out, int H,
                                 float eps) {
  typedef Pack<T, VEC> P;
  __shared__ float smem[32];
  const long long row = blockIdx.x;
  const int packs = H / VEC;
  const bool drop = keep != nullptr;
  float v[ITEMS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int k = threadIdx.x + it * blockDim.x;
    if (k < packs) {
      const long long base = row * H + (long long)k * VEC;
      P xv = *reinterpret_cast<const P*>(x + base);
      P rv = *reinterpret_cast<const P*>(residual + base);
      P bv, kv;
      if (bias != nullptr) bv = *reinterpret_cast<const P*>(bias + k * VEC);
      if (drop) kv = *reinterpret_cast<const P*>(keep + base);
      P yv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float a = to_float(xv.v[j]);
        if (bias != nullptr) a = to_float(from_float<T>(a + to_float(bv.v[j])));
        if (drop) a = to_float(from_float<T>(a * to_float(kv.v[j])));
        const T yt = from_float<T>(to_float(rv.v[j]) + a);
        yv.v[j] = yt;
        v[it][j] = to_float(yt);
        sum += v[it][j];
      }
      *reinterpret_cast<P*>(y_save + base) = yv;
    }
  }
  const float mean = block_sum(sum, smem) / H;
  float sq = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int k = threadIdx.x + it * blockDim.x;
    if (k < packs) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[it][j] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_sum(sq, smem) / H + eps);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int k = threadIdx.x + it * blockDim.x;
    if (k < packs) {
      P gv = *reinterpret_cast<const P*>(gamma + k * VEC);
      P bev = *reinterpret_cast<const P*>(beta + k * VEC);
      P ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        ov.v[j] = from_float<T>((v[it][j] - mean) * rstd * to_float(gv.v[j]) + to_float(bev.v[j]));
      *reinterpret_cast<P*>(out + row * H + (long long)k * VEC) = ov;
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Row part of the backward: with xhat = (y - mean) * rstd and g = dout * gamma,
//   dresidual = rstd * (g - mean(g) - xhat * mean(g * xhat)),   dx = dresidual * keep.
template <typename T, int VEC, int ITEMS>
__global__ void bdaln_bwd_rows_kernel(const T* __restrict__ dout, const T* __restrict__ y,
                                      const T* __restrict__ keep,
                                      const T* __restrict__ gamma, const float* __restrict__ mean_in,
                                      const float* __restrict__ rstd_in, T* __restrict__ dresidual,
                                      T* __restrict__ dx, int H) {
  typedef Pack<T, VEC> P;
  __shared__ float smem[32];
  const long long row = blockIdx.x;
  const int packs = H / VEC;
  const float mean = mean_in[row], rstd = rstd_in[row];
  float g[ITEMS][VEC], xh[ITEMS][VEC];
  float s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int k = threadIdx.x + it * blockDim.x;
    if (k < packs) {
      const long long base = row * H + (long long)k * VEC;
      P dv = *reinterpret_cast<const P*>(dout + base);
      P yv = *reinterpret_cast<const P*>(y + base);
      P gv = *reinterpret_cast<const P*>(gamma + k * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xh[it][j] = (to_float(yv.v[j]) - mean) * rstd;
        g[it][j] = to_float(dv.v[j]) * to_float(gv.v[j]);
        s1 += g[it][j];
        s2 += g[it][j] * xh[it][j];
      }
    }
  }
  const float m1 = block_sum(s1, smem) / H;
  const float m2 = block_sum(s2, smem) / H;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int k = threadIdx.x + it * blockDim.x;
    if (k < packs) {
      const long long base = row * H + (long long)k * VEC;
      P kv;
      if (keep != nullptr) kv = *reinterpret_cast<const P*>(keep + base);
      P rv, xv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = rstd * (g[it][j] - m1 - xh[it][j] * m2);
        rv.v[j] = from_float<T>(d);
        const float dd = keep != nullptr ? d * to_float(kv.v[j]) : d;
        xv.v[j] = from_float<T>(dd);
      }
      *reinterpret_cast<P*>(dresidual + base) = rv;
      *reinterpret_cast<P*>(dx + base) = xv;
    }
  }
}

// Column part of the backward: partial[split, 3, H] (fp32) holds, over this split's rows,
//   sum(dout * xhat) (-> dgamma), sum(dout) (-> dbeta), sum(dx) (-> dbias).
// Block (32, 8); grid (ceil(H / 32), splits). The caller sums over splits.
template <typename T>
__global__ void bdaln_bwd_cols_kernel(const T* __restrict__ dout, const T* __restrict__ y,
                                      const T* __restrict__ dx, const float* __restrict__ mean_in,
                                      const float* __restrict__ rstd_in, long long rows, int H,
                                      float* __restrict__ partial) {
  __shared__ float tile[3][8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float ag = 0.f, ab = 0.f, ax = 0.f;
  if (c < H) {
    for (long long r = (long long)blockIdx.y * 8 + threadIdx.y; r < rows;
         r += (long long)gridDim.y * 8) {
      const long long i = r * H + c;
      const float d = to_float(dout[i]);
      ag += d * (to_float(y[i]) - mean_in[r]) * rstd_in[r];
      ab += d;
      if (dx != nullptr) ax += to_float(dx[i]);
    }
  }
  tile[0][threadIdx.y][threadIdx.x] = ag;
  tile[1][threadIdx.y][threadIdx.x] = ab;
  tile[2][threadIdx.y][threadIdx.x] = ax;
  __syncthreads();
  if (threadIdx.y < 3 && c < H) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s += tile[threadIdx.y][i][threadIdx.x];
    partial[((long long)blockIdx.y * 3 + threadIdx.y) * H + c] = s;
  }
}

}  // namespace xlmr_mp
