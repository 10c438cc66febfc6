// What the AVX2 CPU kernels (attention_cpu, bias_gelu_cpu) need from this machine and
// build: checked by the bindings before every call, and by xlmr_mp/kernels/dispatch.py.
#pragma once

namespace xlmr_mp {

// True when the kernels were compiled in (x86-64, GCC or clang) and this CPU has AVX2 and FMA.
bool cpu_kernels_supported();

// How the kernels split work over threads: "openmp" (the process's OpenMP team, i.e. torch's intra-op
// pool; built with -fopenmp on Linux) or "threads" (std::thread per call, the fallback).
const char* cpu_parallel_backend();

}  // namespace xlmr_mp
