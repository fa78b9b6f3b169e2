"""What the machine computes fast: decides autocast for tuning and the matmul dtype of packed layers."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: only then is bf16 matmul faster than fp32 on a CPU (elsewhere it is ~8x slower)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
