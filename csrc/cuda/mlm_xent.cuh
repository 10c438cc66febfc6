// Masked-LM cross-entropy on one vocabulary shard, over the local logits [M, V] (M masked tokens,
// V = vocab / TP columns, row stride ld) held in T (fp16 / bf16 / fp32); fp32 logits are never
// materialised.
//   stats: one pass per (row, column chunk) giving the online-softmax partials (max, sum exp) and
//          the target logit (target = local column, or -1 when this shard does not own it).
//          The caller merges the chunk partials (and, across TP, the shards) into a logsumexp.
//   grad:  in place, logits[m, j] <- gscale[m] * (exp(logits[m, j] - lse[m]) - [j == target[m]]).
// No torch includes.
#pragma once
#include "common.cuh"

namespace xlmr_mp {

// grid (M, splits), each block covers columns [split * chunk, min(V, (split + 1) * chunk));
// chunk % VEC == 0. part_max / part_sum [M, splits]; target_logit [M] (0 when not owned).
template <typename T, int VEC>
__global__ void xent_stats_kernel(const T* __restrict__ logits, long long ld, int V, int chunk,
                                  const long long* __restrict__ target, float* __restrict__ part_max,
                                  float* __restrict__ part_sum, float* __restrict__ target_logit) {
  typedef Pack<T, VEC> P;
  __shared__ float sm[32], ss[32];
  const long long row = blockIdx.x;
  const int begin = blockIdx.y * chunk;
  const int end = min(V, begin + chunk);
  const T* src = logits + row * ld;
  MaxSum st{neg_inf(), 0.f};
  for (int c = begin + threadIdx.x * VEC; c < end; c += blockDim.x * VEC) {
    float x[VEC];
    if (c + VEC <= end) {
      P pv = *reinterpret_cast<const P*>(src + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[j] = to_float(pv.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[j] = c + j < end ? to_float(src[c + j]) : neg_inf();
    }
    float m = st.m;
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = fmaxf(m, x[j]);
    if (m != neg_inf()) {
      float s = st.s * __expf(st.m - m);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += __expf(x[j] - m);
      st = MaxSum{m, s};
    }
  }
  st = warp_maxsum(st);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
    sm[wid] = st.m;
    ss[wid] = st.s;
  }
  __syncthreads();
  if (wid == 0) {
    MaxSum w = lane < nw ? MaxSum{sm[lane], ss[lane]} : MaxSum{neg_inf(), 0.f};
    w = warp_maxsum(w);
    if (lane == 0) {
      part_max[row * gridDim.y + blockIdx.y] = w.m;
      part_sum[row * gridDim.y + blockIdx.y] = w.s;
    }
  }
  if (threadIdx.x == 0) {
    const long long t = target[row];
    if (blockIdx.y == 0 && (t < 0 || t >= V)) target_logit[row] = 0.f;
    if (t >= begin && t < end) target_logit[row] = to_float(src[t]);
  }
}

// grid (M, ceil(V / (VEC * blockDim.x))); ld % VEC == 0 when VEC > 1.
template <typename T, int VEC>
__global__ void xent_grad_kernel(T* __restrict__ logits, long long ld, int V,
                                 const long long* __restrict__ target, const float* __restrict__ lse,
                                 const float* __restrict__ gscale) {
  typedef Pack<T, VEC> P;
  const long long row = blockIdx.x;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (c >= V) return;
  const float l = lse[row], g = gscale[row];
  const long long t = target[row];
  T* dst = logits + row * ld;
  if (c + VEC <= V) {
    P pv = *reinterpret_cast<const P*>(dst + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float p = __expf(to_float(pv.v[j]) - l);
      pv.v[j] = from_float<T>(g * (p - (c + j == t ? 1.f : 0.f)));
    }
    *reinterpret_cast<P*>(dst + c) = pv;
  } else {
    for (int j = 0; c + j < V; ++j) {
      const float p = __expf(to_float(dst[c + j]) - l);
      dst[c + j] = from_float<T>(g * (p - (c + j == t ? 1.f : 0.f)));
    }
  }
}

}  // namespace xlmr_mp
