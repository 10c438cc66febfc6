"""Compile-only check of the CUDA kernels (csrc/cuda), no GPU needed.

Each device translation unit in csrc/cuda/device/ (one per kernel family, explicit
instantiations of every kernel the launchers use) is compiled
  * for sm_80 and sm_90 with the machine's nvcc (`nvcc -arch=sm_XX -cubin`);
  * for sm_70 (V100, which nvcc 13 no longer targets) with NVRTC from the `nvidia-cuda-nvrtc-cu12`
    wheel (CUDA C++ -> compute_70 PTX, cuda_fp16.h / cuda_bf16.h from `nvidia-cuda-runtime-cu12`)
    and then `ptxas -arch=sm_70` from the `nvidia-cuda-nvcc-cu12` wheel.
With --host (default on), the torch host launchers (csrc/cuda/*_host.cu) are compiled with
`nvcc -c` against torch's headers and bindings.cpp with the C++ compiler, to catch API breakage.

Prints one OK/FAIL line per (target, arch) and exits non-zero if anything failed or a requested
toolchain is missing. Install the wheels with `bash .ci/install.d/cuda_toolchain.sh`.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from xlmr_mp.cli import source_root

ROOT = source_root()                 # the checkout: csrc/ is not part of an installed wheel
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
DEVICE_DIR = os.path.join(CUDA_DIR, "device")
NVCC_ARCHS = ("sm_80", "sm_90")
NVRTC_ARCHS = ("sm_70",)
COMMON_FLAGS = ["-std=c++17", "-O3", "--use_fast_math"]


class ToolchainMissing(RuntimeError):
    pass


def _wheel_dir(module: str) -> str:
    """Directory of an `nvidia.<module>` wheel package, or raise ToolchainMissing."""
    try:
        spec = importlib.util.find_spec(f"nvidia.{module}")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainMissing(f"python package nvidia.{module} not installed "
                               f"(run: bash .ci/install.d/cuda_toolchain.sh)")
    return list(spec.submodule_search_locations)[0]


def find_nvcc() -> str:
    """Path of nvcc (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin), or raise ToolchainMissing."""
    cands = [shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
             "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.exists(c):
            return c
    raise ToolchainMissing("nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def find_sm70_toolchain() -> tuple[str, str, str]:
    """(libnvrtc path, cuda runtime include dir, ptxas path) from the CUDA 12 wheels."""
    nvrtc_dir = os.path.join(_wheel_dir("cuda_nvrtc"), "lib")
    libs = sorted(glob.glob(os.path.join(nvrtc_dir, "libnvrtc.so.*")))
    if not libs:
        raise ToolchainMissing(f"no libnvrtc.so.* in {nvrtc_dir}")
    include = os.path.join(_wheel_dir("cuda_runtime"), "include")
    if not os.path.exists(os.path.join(include, "cuda_fp16.h")):
        raise ToolchainMissing(f"cuda_fp16.h not in {include}")
    ptxas = os.path.join(_wheel_dir("cuda_nvcc"), "bin", "ptxas")
    if not os.path.exists(ptxas):
        raise ToolchainMissing(f"ptxas not at {ptxas}")
    return libs[0], include, ptxas


def device_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(DEVICE_DIR, "*.cu")))


def _run(cmd: list[str]) -> tuple[bool, str]:
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode == 0, (p.stdout + p.stderr).strip()


def compile_nvcc(src: str, arch: str, nvcc: str, out_dir: str) -> tuple[bool, str]:
    out = os.path.join(out_dir, f"{os.path.basename(src)}.{arch}.cubin")
    return _run([nvcc, *COMMON_FLAGS, f"-arch={arch}", "-cubin", "-I", CUDA_DIR, "-o", out, src])


class Nvrtc:
    """Minimal ctypes binding of NVRTC: CUDA C++ source -> PTX."""

    def __init__(self, lib_path: str):
        lib_dir = os.path.dirname(lib_path)
        for b in sorted(glob.glob(os.path.join(lib_dir, "libnvrtc-builtins.so.*"))):
            ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens its builtins by name
        self.lib = ctypes.CDLL(lib_path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, rc: int, what: str):
        if rc != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def compile(self, src_path: str, options: list[str]) -> tuple[bool, str, bytes]:
        """(ok, log, ptx)."""
        with open(src_path, "rb") as f:
            source = f.read()
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source,
                                                os.path.basename(src_path).encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            opts = [o.encode() for o in options]
            arr = (ctypes.c_char_p * len(opts))(*opts)
            rc = self.lib.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, log)
            log_text = log.value.decode(errors="replace").strip()
            if rc != 0:
                return False, f"nvrtcCompileProgram: {self.lib.nvrtcGetErrorString(rc).decode()}\n{log_text}", b""
            self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            ptx = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            return True, log_text, ptx.raw.rstrip(b"\0")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_nvrtc(src: str, arch: str, nvrtc: Nvrtc, include: str, ptxas: str,
                  out_dir: str) -> tuple[bool, str]:
    compute = arch.replace("sm_", "compute_")
    ok, log, ptx = nvrtc.compile(src, [f"--gpu-architecture={compute}", "-std=c++17", "--use_fast_math",
                                       f"-I{include}", f"-I{CUDA_DIR}", f"-I{DEVICE_DIR}"])
    if not ok:
        return False, log
    base = os.path.join(out_dir, f"{os.path.basename(src)}.{arch}")
    with open(base + ".ptx", "wb") as f:
        f.write(ptx)
    return _run([ptxas, f"-arch={arch}", "-O3", "-o", base + ".cubin", base + ".ptx"])


def host_targets() -> list[str]:
    return sorted(glob.glob(os.path.join(CUDA_DIR, "*_host.cu"))) + \
        sorted(glob.glob(os.path.join(CUDA_DIR, "*.cpp")))


def compile_host(src: str, nvcc: str, out_dir: str) -> tuple[bool, str]:
    """Host launchers: nvcc -c (sm_80) against torch's headers; bindings: c++ -fsyntax-only."""
    from torch.utils.cpp_extension import include_paths
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CUDA_DIR}"]
    defs = ["-DTORCH_EXTENSION_NAME=_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H", "-D_GLIBCXX_USE_CXX11_ABI=1"]
    torch_inc = include_paths()[0]
    if not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        # A CPU build of torch ships the c10/cuda headers but not this CMake-generated one-liner;
        # recreate it (as a CUDA build defines it) so the launchers can be checked here.
        shim = os.path.join(out_dir, "shim", "c10", "cuda", "impl")
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(f"-I{os.path.join(out_dir, 'shim')}")
    out = os.path.join(out_dir, os.path.basename(src) + ".o")
    if src.endswith(".cu"):
        # torch's extension build uses C++20 for host and CUDA sources alike.
        return _run([nvcc, "-std=c++20", "-O3", "--use_fast_math", "-arch=sm_80", "-c", *incs, *defs,
                     "-o", out, src])
    cxx = os.environ.get("CXX", "c++")
    cuda_inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    return _run([cxx, "-std=c++20", "-fsyntax-only", *incs, f"-I{cuda_inc}", *defs, src])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=",".join(NVRTC_ARCHS + NVCC_ARCHS),
                    help="comma list among sm_70 (NVRTC+ptxas) and sm_80,sm_90 (nvcc)")
    ap.add_argument("--no-host", action="store_true", help="skip the torch host/binding compile")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiler processes")
    ap.add_argument("-v", "--verbose", action="store_true", help="print compiler output on success too")
    args = ap.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [a for a in archs if a not in NVRTC_ARCHS + NVCC_ARCHS]
    if bad:
        print(f"--archs: unknown {bad}; choose from {NVRTC_ARCHS + NVCC_ARCHS}", file=sys.stderr)
        return 2
    try:
        nvcc = find_nvcc() if any(a in NVCC_ARCHS for a in archs) or not args.no_host else None
        sm70 = find_sm70_toolchain() if any(a in NVRTC_ARCHS for a in archs) else None
    except ToolchainMissing as e:
        print(f"toolchain missing: {e}", file=sys.stderr)
        return 3
    srcs = device_sources()
    if not srcs:
        print(f"no device sources in {DEVICE_DIR}: run from the source checkout (csrc/cuda/device/)", file=sys.stderr)
        return 2
    nvrtc = Nvrtc(sm70[0]) if sm70 else None
    jobs = []
    for src in srcs:
        for arch in archs:
            jobs.append((os.path.relpath(src, ROOT), arch))
    if not args.no_host:
        jobs += [(os.path.relpath(s, ROOT), "host") for s in host_targets()]
    failed = 0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        def one(job):
            rel, arch = job
            src = os.path.join(ROOT, rel)
            t = time.time()
            if arch == "host":
                ok, log = compile_host(src, nvcc, tmp)
            elif arch in NVRTC_ARCHS:
                ok, log = compile_nvrtc(src, arch, nvrtc, sm70[1], sm70[2], tmp)
            else:
                ok, log = compile_nvcc(src, arch, nvcc, tmp)
            return rel, arch, ok, log, time.time() - t
        for rel, arch, ok, log, dt in pool.map(one, jobs):
            print(f"{'OK  ' if ok else 'FAIL'} {arch:6s} {rel} ({dt:.1f}s)", flush=True)
            if (not ok or args.verbose) and log:
                print("    " + log.replace("\n", "\n    "), flush=True)
            failed += not ok
    print(f"{len(jobs) - failed}/{len(jobs)} compiled in {time.time() - t0:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
