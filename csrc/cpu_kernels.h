// What the AVX2 CPU kernels (attention_cpu, bias_gelu_cpu) need from this machine and
// build: checked by the bindings before every call, and by xlmr_mp/kernels/dispatch.py.
#pragma once

// 1 where the kernels are compiled (x86-64 with GCC or clang, unless built with
// -DXLMR_MP_NO_X86_KERNELS); elsewhere their files provide stubs and the model uses the references.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(XLMR_MP_NO_X86_KERNELS)
#define XLMR_MP_X86_KERNELS 1
#else
#define XLMR_MP_X86_KERNELS 0
#endif

namespace xlmr_mp {

// True when the kernels were compiled in (x86-64, GCC or clang) and this CPU has AVX2 and FMA.
bool cpu_kernels_supported();
// Throws std::runtime_error naming `who` when cpu_kernels_supported() is false (every binding's check).
void require_cpu_kernels(const char* who);

// How the kernels split work over threads: "openmp" (the process's OpenMP team, i.e. torch's intra-op
// pool; built with -fopenmp on Linux) or "threads" (std::thread per call, the fallback).
const char* cpu_parallel_backend();

}  // namespace xlmr_mp
