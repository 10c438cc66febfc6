// Device-only translation unit for the compile check: every bias + dropout + residual + LayerNorm
// kernel the host launcher uses, for each dtype, vector width and registers-per-thread count.
#include "../bias_dropout_add_ln.cuh"

namespace xlmr_mp {
#define XLMR_LN(T, V, I)                                                                             \
  template __global__ void bdaln_fwd_kernel<T, V, I>(const T*, const T*, const T*, const T*,        \
                                                     const T*, const T*, T*, T*, float*, float*,    \
                                                     int, float);                                   \
  template __global__ void bdaln_bwd_rows_kernel<T, V, I>(const T*, const T*, const T*, const T*,   \
                                                          const float*, const float*, T*, T*, int);
#define XLMR_LN_V(T, V) XLMR_LN(T, V, 1) XLMR_LN(T, V, 2) XLMR_LN(T, V, 4) XLMR_LN(T, V, 8)
// Vector widths: 1 (any H) and 16 bytes (H % (16 / sizeof(T)) == 0).
#define XLMR_LN_T(T) XLMR_LN_V(T, 1) XLMR_LN_V(T, 16 / sizeof(T))                            \
  template __global__ void bdaln_bwd_cols_kernel<T>(const T*, const T*, const T*, const float*, \
                                                    const float*, long long, int, float*);
XLMR_LN_T(float)
XLMR_LN_T(__half)
XLMR_LN_T(__nv_bfloat16)
}  // namespace xlmr_mp
