"""llama.cpp's K-quants as pure tensor functions (no modules, no I/O).

A row is cut into super-blocks of 256 weights, each holding 256/g groups of g. The groups' scales (and,
for the asymmetric types, their minimums) are themselves quantized, to `scale_bits`-bit multiples of one
fp16 super-scale per super-block:

    Q2_K  2-bit codes, groups of 16   w = d*sc*q - dmin*m     sc, m in [0, 15]
    Q3_K  3-bit codes, groups of 16   w = d*sc*(q - 4)        sc in [-32, 31]
    Q4_K  4-bit codes, groups of 32   w = d*sc*q - dmin*m     sc, m in [0, 63]
    Q5_K  5-bit codes, groups of 32   w = d*sc*q - dmin*m     sc, m in [0, 63]
    Q6_K  6-bit codes, groups of 16   w = d*sc*(q - 32)       sc in [-128, 127]

So a tuned K-quant weight is the integer scheme's `(q - zero) * scale` with the scale on a coarse grid
and, for the asymmetric types, a zero point that need not be an integer (`zero = dmin*m / (d*sc)`).
`k_qparams` builds that scale and zero from the same range and clipping scales as `integer.qparams`, so
SignRound tunes its rounding offsets and clipping through them and the codes it settles on are exactly
what a GGUF file stores.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .integer import SCALE_EPS, from_groups, group_range, round_clamp_ste, round_ste, to_groups

SUPER_BLOCK = 256


class KType(NamedTuple):
    name: str
    bits: int
    group_size: int
    sym: bool
    scale_bits: int

    @property
    def groups_per_super(self) -> int:
        return SUPER_BLOCK // self.group_size

    @property
    def bits_per_weight(self) -> float:
        """Codes, the groups' quantized scales (and minimums), and the fp16 super-scale(s)."""
        per_group = self.scale_bits * (1 if self.sym else 2)
        return self.bits + per_group / self.group_size + 16 * (1 if self.sym else 2) / SUPER_BLOCK


K_TYPES = {t.name: t for t in (
    KType("Q2_K", 2, 16, False, 4),
    KType("Q3_K", 3, 16, True, 6),
    KType("Q4_K", 4, 32, False, 6),
    KType("Q5_K", 5, 32, False, 6),
    KType("Q6_K", 6, 16, True, 8),
)}


class KQuantized(NamedTuple):
    """Codes (out, in) uint8 in [0, 2**bits - 1]; per super-block fp16 `d` (and `dmin`), both
    (out, in/256); per group integer `sc` (and `m`), both (out, groups). Symmetric types have no
    `dmin`/`m` and an implicit zero point of 2**(bits-1)."""

    codes: torch.Tensor
    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor | None
    m: torch.Tensor | None
    ktype: KType


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 in the forward pass (the super-scales are stored in fp16), identity backward."""
    return x + (x.to(torch.float16).float() - x).detach()


def _per_super(x: torch.Tensor, ktype: KType) -> torch.Tensor:
    """(out, groups, 1) -> (out, supers, groups per super-block)."""
    return x.reshape(x.shape[0], -1, ktype.groups_per_super)


def _from_super(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, 1)


def k_qparams(w_groups: torch.Tensor, ktype: KType, min_scale=None, max_scale=None, ste: bool = False):
    """Per-group (scale, zero), each (out, groups, 1), with the scales (and minimums) quantized per
    super-block, and the stored parts (d, sc, dmin, m). Differentiable in the clipping scales when `ste`."""
    rnd = round_ste if ste else torch.round
    wmin, wmax = group_range(w_groups, min_scale, max_scale)
    if ktype.sym:
        half, top = 2 ** (ktype.bits - 1), 2 ** (ktype.scale_bits - 1)
        amax = torch.maximum(-wmin, wmax)
        s = _per_super(torch.where(-wmin > wmax, amax, -amax) / half, ktype)  # signed, as integer.qparams
        widest = s.gather(-1, s.abs().argmax(-1, keepdim=True))
        d = _fp16_ste(-widest / top)  # the widest group gets the code -top, exactly representable
        d = torch.where(d.abs() < SCALE_EPS, torch.full_like(d, SCALE_EPS), d)
        sc = rnd(s / d).clamp(-top, top - 1)
        sc = torch.where(sc == 0, torch.ones_like(sc), sc)  # a zero scale would make codes infinite
        scale = _from_super(d * sc)
        return scale, torch.full_like(scale, float(half)), (d.squeeze(-1), sc, None, None)
    top = 2**ktype.scale_bits - 1
    s = _per_super((wmax - wmin) / (2**ktype.bits - 1), ktype)
    mn = _per_super(-wmin, ktype)
    d = _fp16_ste(s.amax(-1, keepdim=True) / top)
    d = d.clamp(min=SCALE_EPS)
    sc = rnd(s / d).clamp(1, top)
    dmin = _fp16_ste(mn.amax(-1, keepdim=True) / top)
    m = rnd(mn / dmin.clamp(min=SCALE_EPS)).clamp(0, top)
    scale = _from_super(d * sc)
    return scale, _from_super(dmin * m) / scale, (d.squeeze(-1), sc, dmin.squeeze(-1), m)


def _check(w: torch.Tensor, ktype: KType) -> None:
    if w.shape[1] % SUPER_BLOCK:
        raise ValueError(f"{ktype.name} needs rows of whole {SUPER_BLOCK}-weight super-blocks, not {w.shape[1]}")


def fake_quant_k_groups(wg: torch.Tensor, ktype: KType, offset=None, min_scale=None, max_scale=None) -> torch.Tensor:
    """Quantize-dequantize grouped weights (out, groups, g) with straight-through gradients."""
    scale, zero, _ = k_qparams(wg, ktype, min_scale, max_scale, ste=True)
    return round_clamp_ste(wg, offset, scale, zero, 2**ktype.bits - 1, zero_in_round=not ktype.sym)


def fake_quant_k(w: torch.Tensor, ktype: KType, offset=None, min_scale=None, max_scale=None) -> torch.Tensor:
    _check(w, ktype)
    off = None if offset is None else to_groups(offset, ktype.group_size)
    return from_groups(fake_quant_k_groups(to_groups(w, ktype.group_size), ktype, off, min_scale, max_scale), w.shape[1])


@torch.no_grad()
def quantize_k(w: torch.Tensor, ktype: KType, offset=None, min_scale=None, max_scale=None) -> KQuantized:
    """Final codes and the stored scale parts; dequantizes to exactly what `fake_quant_k` evaluates."""
    _check(w, ktype)
    wg = to_groups(w.float(), ktype.group_size)
    scale, zero, (d, sc, dmin, m) = k_qparams(wg, ktype, min_scale, max_scale)
    x = wg / scale
    if offset is not None:
        x = x + to_groups(offset.float(), ktype.group_size)
    codes = ((x + zero).round() if not ktype.sym else x.round() + zero).clamp(0, 2**ktype.bits - 1)
    as_int = lambda t: None if t is None else t.reshape(t.shape[0], -1).to(torch.int16)  # noqa: E731
    return KQuantized(from_groups(codes, w.shape[1]).to(torch.uint8), d.to(torch.float16), as_int(sc),
                      None if dmin is None else dmin.to(torch.float16), as_int(m), ktype)


def dequantize_k(kq: KQuantized) -> torch.Tensor:
    """(out, in) fp32 weights as llama.cpp computes them: d*sc*q - dmin*m, or d*sc*(q - zero)."""
    t = kq.ktype
    per_group = lambda sup: sup.float().repeat_interleave(t.groups_per_super, dim=1)  # noqa: E731
    scale = per_group(kq.d) * kq.sc.float()
    q = to_groups(kq.codes.float(), t.group_size)
    if t.sym:
        w = (q - 2 ** (t.bits - 1)) * scale.unsqueeze(-1)
    else:
        w = q * scale.unsqueeze(-1) - (per_group(kq.dmin) * kq.m.float()).unsqueeze(-1)
    return from_groups(w, kq.codes.shape[1])
