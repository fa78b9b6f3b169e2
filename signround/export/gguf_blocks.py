"""ggml's K-quant block layouts (ggml-common.h): codes and scale parts -> the bytes of a GGUF tensor.

Each function takes a `quant.kquant.KQuantized` of an (out, in) weight and returns (out, in/256 * block
bytes) uint8, one 256-weight super-block after another along each row, the fields in struct order:

    block_q2_K  scales[16] (sc | m << 4), qs[64], d, dmin
    block_q3_K  hmask[32], qs[64], scales[12] (6-bit sc + 32), d
    block_q4_K  d, dmin, scales[12] (6-bit sc and m), qs[128]
    block_q5_K  d, dmin, scales[12], qh[32], qs[128]
    block_q6_K  ql[128], qh[64], scales[16] (int8), d

and ggml's one float block that signround writes, 32 weights each:

    block_mxfp4  e (E8M0 exponent byte), qs[16] (element j low, element j + 16 high; E2M1 codes as signround's)
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant.kquant import SUPER_BLOCK, KQuantized


def _bytes(x: torch.Tensor) -> np.ndarray:
    """(out, supers, ...) -> (out, supers, nbytes) uint8 of its little-endian storage."""
    x = x.contiguous()
    return x.numpy().view(np.uint8).reshape(*x.shape[:2], -1)


def _pack_across(q: torch.Tensor, bits: int, stride: int) -> torch.Tensor:
    """Per run of `stride * 8 // bits` codes, byte l holds codes l, l + stride, l + 2*stride, ... in
    rising bit positions: the interleave every K-quant uses for its low bits. q: (..., n) int32."""
    per_byte = 8 // bits
    runs = q.reshape(*q.shape[:-1], -1, per_byte, stride)
    shifts = torch.arange(per_byte, dtype=torch.int32).reshape(per_byte, 1) * bits
    return (runs << shifts).sum(-2).reshape(*q.shape[:-1], -1).to(torch.uint8)


def _scales_6bit(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 bytes for 8 six-bit scales and mins (ggml's get_scale_min_k4, inverted)."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    low = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    high = (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    return torch.cat([low, mid, high], -1).to(torch.uint8)


def _scales_q3(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes for 16 six-bit scales stored with a +32 bias."""
    l = (sc.to(torch.int32) + 32)  # noqa: E741
    low = (l[..., :8] & 0xF) | ((l[..., 8:] & 0xF) << 4)
    high = _pack_across(l >> 4, 2, 4)
    return torch.cat([low.to(torch.uint8), high], -1)


def encode_k_blocks(kq: KQuantized) -> np.ndarray:
    t = kq.ktype
    out_features, in_features = kq.codes.shape
    supers = in_features // SUPER_BLOCK
    q = kq.codes.to(torch.int32).reshape(out_features, supers, SUPER_BLOCK)
    sc = kq.sc.to(torch.int32).reshape(out_features, supers, -1)
    m = None if kq.m is None else kq.m.to(torch.int32).reshape(out_features, supers, -1)
    d = _bytes(kq.d.to(torch.float16).reshape(out_features, supers, 1))
    dmin = None if kq.dmin is None else _bytes(kq.dmin.to(torch.float16).reshape(out_features, supers, 1))
    halves = q.reshape(out_features, supers, -1, 128)  # the 2/3/6-bit layouts work in runs of 128
    if t.name == "Q2_K":
        parts = [_bytes((sc | (m << 4)).to(torch.uint8)), _bytes(_pack_across(halves, 2, 32)), d, dmin]
    elif t.name == "Q3_K":
        hmask = _pack_across(q >> 2, 1, 32)
        parts = [_bytes(hmask), _bytes(_pack_across(halves & 3, 2, 32)), _bytes(_scales_q3(sc)), d]
    elif t.name in ("Q4_K", "Q5_K"):
        low = _pack_across((q & 0xF).reshape(out_features, supers, -1, 64), 4, 32)
        parts = [d, dmin, _bytes(_scales_6bit(sc, m))]
        if t.name == "Q5_K":
            parts.append(_bytes(_pack_across(q >> 4, 1, 32)))
        parts.append(_bytes(low))
    elif t.name == "Q6_K":
        parts = [_bytes(_q6_low(halves)), _bytes(_pack_across(halves >> 4, 2, 32)), _bytes(sc.to(torch.int8)), d]
    else:
        raise ValueError(f"no block layout for {t.name}")
    return np.concatenate(parts, axis=-1).reshape(out_features, -1)


def _q6_low(halves: torch.Tensor) -> torch.Tensor:
    """Q6_K's ql: per run of 128 codes, bytes l and l + 32 hold the low nibbles of codes (l, l + 64)
    and (l + 32, l + 96)."""
    low = halves & 0xF
    first = low[..., :32] | (low[..., 64:96] << 4)
    second = low[..., 32:64] | (low[..., 96:] << 4)
    return torch.cat([first, second], -1).reshape(*halves.shape[:-2], -1).to(torch.uint8)


def encode_mxfp4_blocks(codes: torch.Tensor, exponents: torch.Tensor) -> np.ndarray:
    """(out, in) E2M1 codes (sign << 3 | magnitude index: ggml's kvalues index, whose values are doubled and
    whose E8M0 decoding halves) and (out, in/32) E8M0 bytes -> (out, in/32 * 17) uint8."""
    out, n = codes.shape
    halves = codes.reshape(out, n // 32, 2, 16)
    qs = halves[:, :, 0] | halves[:, :, 1] << 4
    return _bytes(torch.cat([exponents.reshape(out, -1, 1), qs], dim=-1).to(torch.uint8)).reshape(out, -1)
