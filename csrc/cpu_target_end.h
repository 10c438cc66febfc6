// Closes the AVX2 + FMA region opened by cpu_target_begin.h.
#if XLMR_MP_AVX2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
