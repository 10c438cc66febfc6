// Run-time capability of the AVX2 CPU kernels (see cpu_kernels.h).
#include "cpu_kernels.h"

#include <stdexcept>
#include <string>

bool xlmr_mp::cpu_kernels_supported() {
#if XLMR_MP_X86_KERNELS
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const char* xlmr_mp::cpu_parallel_backend() {
#ifdef _OPENMP
  return "openmp";
#else
  return "threads";
#endif
}

void xlmr_mp::require_cpu_kernels(const char* who) {
  if (!cpu_kernels_supported()) throw std::runtime_error(std::string(who) + ": this CPU has no AVX2/FMA");
}
