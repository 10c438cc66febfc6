// Device-only translation unit for the compile check (tools/compile_kernels.py): instantiates
// every bias + GELU kernel the host launcher uses, for each dtype and vector width.
#include "../bias_gelu.cuh"

namespace xlmr_mp {
#define XLMR_BG(T, V)                                                                              \
  template __global__ void bias_gelu_fwd_kernel<T, V>(const T*, const T*, T*, long long, int);    \
  template __global__ void bias_gelu_bwd_kernel<T, V>(const T*, const T*, const T*, T*, long long, int);
#define XLMR_BG_T(T) XLMR_BG(T, 1) XLMR_BG(T, 16 / sizeof(T)) \
  template __global__ void col_sum_partial_kernel<T>(const T*, long long, int, float*);
XLMR_BG_T(float)
XLMR_BG_T(__half)
XLMR_BG_T(__nv_bfloat16)
}  // namespace xlmr_mp
