// Device-only translation unit for the compile check: every scaled masked softmax kernel the host
// launcher uses, for each dtype, vector width and row length class.
#include "../masked_softmax.cuh"

namespace xlmr_mp {
#define XLMR_SM(T, V, I)                                                                         \
  template __global__ void softmax_warp_fwd_kernel<T, V, I>(const T*, MaskView, T*, long long, \
                                                            int, float);                        \
  template __global__ void softmax_warp_bwd_kernel<T, V, I>(const T*, const T*, T*, long long,  \
                                                            int, float);
#define XLMR_SM_V(T, V) XLMR_SM(T, V, 1) XLMR_SM(T, V, 2) XLMR_SM(T, V, 4) XLMR_SM(T, V, 8) \
  XLMR_SM(T, V, 16)
#define XLMR_SM_T(T) XLMR_SM_V(T, 1) XLMR_SM_V(T, 4)                                      \
  template __global__ void softmax_block_fwd_kernel<T>(const T*, MaskView, T*, int, float); \
  template __global__ void softmax_block_bwd_kernel<T>(const T*, const T*, T*, int, float);
XLMR_SM_T(float)
XLMR_SM_T(__half)
XLMR_SM_T(__nv_bfloat16)
}  // namespace xlmr_mp
