"""Bit-packing of integer codes into int32 words, GPTQ-compatible.

Codes are packed along dim 0 as a little-endian bit stream: value j of a column occupies bits
[j*bits, (j+1)*bits) of that column's stream, split into 32-bit words. For 2, 4 and 8 bits this is
GPTQ's layout (32/bits values per word, the first in the lowest bits); for 3 bits it is GPTQ's
"32 values in 3 words" layout, where values straddle word boundaries. 5-7 bits follow the same rule.
Dim 0 is padded with zeros to a multiple of 32 values, so a column always fills whole words.
"""

from __future__ import annotations

import torch

_MASK32 = (1 << 32) - 1


def packed_rows(rows: int, bits: int) -> int:
    """Number of int32 words that `rows` codes of `bits` bits occupy (after padding to 32 values)."""
    return -(-rows // 32) * bits


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) integer codes in [0, 2**bits) -> (packed_rows(K, bits), N) int32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes")
    k, n = codes.shape
    padded = -(-k // 32) * 32
    values = torch.zeros(padded, n, dtype=torch.int64, device=codes.device)
    values[:k] = codes.to(torch.int64) & ((1 << bits) - 1)
    values = values.view(padded // 32, 32, n)
    words = torch.zeros(padded // 32, bits, n, dtype=torch.int64, device=codes.device)
    for j in range(32):
        start = j * bits
        word, shift = divmod(start, 32)
        words[:, word] |= (values[:, j] << shift) & _MASK32
        if shift + bits > 32:  # the value straddles into the next word
            words[:, word + 1] |= values[:, j] >> (32 - shift)
    words = words.view(-1, n)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of `pack_rows`: (packed_rows, N) int32 -> (rows, N) uint8."""
    n = packed.shape[1]
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # 2/4/8 bit: each word holds whole values, so one broadcast shift unpacks them all
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32).view(1, -1, 1)
        values = (packed.unsqueeze(1) >> shifts) & mask
        return values.reshape(-1, n)[:rows].to(torch.uint8)
    words = (packed.to(torch.int64) & _MASK32).view(-1, bits, n)
    values = torch.empty(words.shape[0], 32, n, dtype=torch.int64, device=packed.device)
    for j in range(32):
        start = j * bits
        word, shift = divmod(start, 32)
        v = words[:, word] >> shift
        if shift + bits > 32:
            v = v | (words[:, word + 1] << (32 - shift))
        values[:, j] = v & mask
    return values.view(-1, n)[:rows].to(torch.uint8)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) codes -> GPTQ `qweight` (packed in, out)."""
    return pack_rows(codes.t(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return unpack_rows(qweight, bits, in_features).t()


def pack_qzeros(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, groups) zero points -> GPTQ-shaped `qzeros` (groups, packed out)."""
    return pack_rows(zero, bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return unpack_rows(qzeros.t().contiguous(), bits, out_features)
