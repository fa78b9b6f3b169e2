"""What the machine computes fast: decides autocast for tuning and the matmul dtype of packed layers."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: only then is bf16 matmul faster than fp32 on a CPU (elsewhere it is ~8x slower)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc keeps it otherwise, so a streamed run's
    resident size would creep up block after block). A no-op where the C library has no malloc_trim."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile's inductor can build kernels here: a C++ compiler for CPU, triton for CUDA."""
    if device.type == "cpu":
        return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None
