// Device-only translation unit for the compile check: the masked-LM shard cross-entropy kernels
// (stats pass and in-place gradient) for each dtype and vector width.
#include "../mlm_xent.cuh"

namespace xlmr_mp {
#define XLMR_XE(T, V)                                                                          \
  template __global__ void xent_stats_kernel<T, V>(const T*, long long, int, int,             \
                                                   const long long*, float*, float*, float*); \
  template __global__ void xent_grad_kernel<T, V>(T*, long long, int, const long long*,       \
                                                  const float*, const float*);
#define XLMR_XE_T(T) XLMR_XE(T, 1) XLMR_XE(T, 16 / sizeof(T))
XLMR_XE_T(float)
XLMR_XE_T(__half)
XLMR_XE_T(__nv_bfloat16)
}  // namespace xlmr_mp
