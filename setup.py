"""Build: `pip install -e .` (install torch first: `pip install torch==2.13.0` on a CPU machine).

The C++ extension `xlmr_mp._C` (csrc/*.cpp, pybind11 + numpy only: the data index builders and the
AVX2 CPU kernels, compiled for AVX2 by target pragmas and checked at run time; with OpenMP on Linux,
so the kernels run on torch's own thread pool) is always built. The CUDA
kernels (`xlmr_mp._cuda`, csrc/cuda/) are built only when torch is importable in the build
environment as a CUDA build and nvcc is present (use `pip install --no-build-isolation -e .`
on GPU machines); otherwise they are skipped cleanly and the torch references are used.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError as e:  # pragma: no cover
    raise SystemExit("pybind11 is needed to build xlmr_mp: pip install pybind11") from e


def cuda_extensions():
    """CUDA kernels, only with a CUDA build of torch and nvcc; [] otherwise.

    Sources: the torch launchers csrc/cuda/*_host.cu and csrc/cuda/bindings.cpp (the device code
    they include is csrc/cuda/*.cuh; csrc/cuda/device/ holds compile-check units only)."""
    if os.environ.get("XLMR_MP_NO_CUDA", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    sources = sorted(glob.glob("csrc/cuda/*_host.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if not sources or torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    # CUDA 13 dropped sm_70 (V100); older toolkits build it too.
    default_archs = "8.0;9.0" if int(torch.version.cuda.split(".")[0]) >= 13 else "7.0;8.0;9.0"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_archs)
    ext = CUDAExtension("xlmr_mp._cuda", sources, include_dirs=[os.path.abspath("csrc/cuda")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]})
    return [ext], {"build_ext": BuildExtension}


# The installed commands: one module per command in xlmr_mp/cli/ (main(argv=None) -> exit code);
# tools/<module>.py are thin wrappers of the same mains.
CONSOLE_SCRIPTS = [
    "xlmr-train = xlmr_mp.train:main",
    "xlmr-preprocess = xlmr_mp.cli.preprocess_data:main",
    "xlmr-train-spm = xlmr_mp.cli.train_spm:main",
    "xlmr-merge = xlmr_mp.cli.merge_datasets:main",
    "xlmr-evaluate = xlmr_mp.cli.evaluate:main",
    "xlmr-study = xlmr_mp.cli.study:main",
    "xlmr-convert = xlmr_mp.cli.convert_checkpoint:main",
    "xlmr-plan = xlmr_mp.cli.plan:main",
    "xlmr-compile-kernels = xlmr_mp.cli.compile_kernels:main",
    "xlmr-download-cc100 = xlmr_mp.cli.download_cc100:main",
]
# megatron-core: CI's fast lane runs on the lowest version of this range and on the newest that
# installs (.ci/megatron_lanes.sh); every call we make is checked against 0.19 in
# docs/megatron_core_compat.md.
MEGATRON_CORE = "megatron-core>=0.16,<0.20"

cpp_sources = sorted(glob.glob("csrc/*.cpp"))
# OpenMP on Linux: the AVX2 CPU kernels then split their work on torch's own OpenMP pool (the same
# libgomp.so.1, which torch has already loaded); XLMR_MP_NO_OPENMP=1 builds the std::thread fallback.
openmp = ["-fopenmp"] if sys.platform.startswith("linux") and os.environ.get("XLMR_MP_NO_OPENMP", "0") != "1" else []
ext_modules = [Pybind11Extension("xlmr_mp._C", cpp_sources, cxx_std=17, depends=sorted(glob.glob("csrc/*.h")),
                                 extra_compile_args=["-O3"] + openmp, extra_link_args=openmp)] if cpp_sources else []
cmdclass = {"build_ext": build_ext}
cuda_exts, cuda_cmd = cuda_extensions()
ext_modules += cuda_exts
cmdclass.update(cuda_cmd)

setup(
    name="xlmr_mp",
    version="0.1.0",
    description="Megatron-style model-parallel pretraining of XLM-R-style multilingual masked LMs",
    packages=find_packages(include=["xlmr_mp", "xlmr_mp.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    # torch is deliberately unpinned: install the right build first (CPU: torch==2.13.0).
    # Everything the installed commands need: matplotlib for the evaluation and study plots (without
    # it they print one line and still write their numbers); megatron-core in the tested range.
    install_requires=["torch", MEGATRON_CORE, "sentencepiece", "numpy", "pybind11",
                      "pyyaml", "tqdm", "safetensors", "matplotlib",
                      "pyarrow", "zstandard"],  # Parquet (FineWeb-2, CulturaX) and .zst (HPLT) corpora
    extras_require={"mpi": ["mpi4py"], "hf": ["transformers", "protobuf"], "tb": ["tensorboard"],
                    "test": ["pytest", "pytest-timeout", "transformers", "protobuf", "mpi4py", "seqeval"]},
    package_data={"xlmr_mp.presets": ["*.yaml"]},      # the run presets (--preset NAME)
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    zip_safe=False,
)
