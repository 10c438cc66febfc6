// Opens the region of a CPU kernel file that is compiled for AVX2 + FMA whatever the build's -march
// (callers check cpu_kernels_supported() at run time first); close it with cpu_target_end.h.
// XLMR_MP_AVX2 is 1 on x86-64 with GCC or clang (unless built with -DXLMR_MP_NO_X86_KERNELS), 0
// elsewhere, where the file provides stubs instead and the model uses the torch references.
#include "cpu_kernels.h"  // XLMR_MP_X86_KERNELS, cpu_kernels_supported()
#if XLMR_MP_X86_KERNELS
#define XLMR_MP_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include <immintrin.h>

#include "cpu_avx2.h"
#else
#define XLMR_MP_AVX2 0
#endif
