#!/usr/bin/env bash
# CUDA compile-only toolchain for tools/compile_kernels.py and tests/kernels/test_kernels_compile.py:
# sm_70 (V100) is built through NVRTC (nvidia-cuda-nvrtc-cu12) with cuda_fp16.h / cuda_bf16.h from
# nvidia-cuda-runtime-cu12 and ptxas from nvidia-cuda-nvcc-cu12 (nvcc 13 no longer targets sm_70).
# These three wheels depend on nothing (no torch), ~100 MB together. sm_80 / sm_90 use the
# machine's nvcc (/usr/local/cuda). Idempotent.
set -euo pipefail
if python - <<'PY' 2>/dev/null
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(f"nvidia.{m}") for m in ("cuda_nvrtc", "cuda_runtime", "cuda_nvcc")) else 1)
PY
then
  exit 0
fi
python -m pip install -q --disable-pip-version-check --no-deps \
  "nvidia-cuda-nvrtc-cu12>=12.4,<13" "nvidia-cuda-runtime-cu12>=12.4,<13" "nvidia-cuda-nvcc-cu12>=12.4,<13"
