"""Floating-point weight formats as pure tensor functions (no modules, no I/O).

    FP8    E4M3 elements, one fp32 scale per output channel
    FP8_BLOCK  E4M3 elements, one fp32 scale per block of 128 output x 128 input channels  (DeepSeek-V3, vLLM)
    MXFP8  E4M3 elements, one power-of-two (E8M0) scale per 32 weights  (OCP microscaling)
    MXFP4  E2M1 elements, one power-of-two (E8M0) scale per 32 weights  (OCP microscaling)
    NVFP4  E2M1 elements, one E4M3 scale per 16 weights and one fp32 scale per tensor

Weights are (out_features, in_features), grouped (out, groups, g) as in `integer`. A weight dequantizes
to `element * scale`; NVFP4's scale is its stored E4M3 group scale divided by the tensor's global scale.
FP8_BLOCK's scale is shared by 128 consecutive rows' groups: here it is held once per row (repeated), so
that every format keeps one (out, groups) scale tensor; its exporters write one per block.

SignRound tunes the same two things as for integers. Per weight, an offset V in [-0.5, 0.5] is added
before rounding to the element grid. It is counted in steps of the grid where the value lies, so V picks
between a value's two neighbours at every magnitude. auto-round adds V in plain scaled units instead:
E2M1's steps are 0.5, 1 and 2, so there a fixed V decides the rounding of small values only. Per group,
a clipping scale in [0, 1] multiplies the group's absolute maximum. A floating-point grid is symmetric,
so there is no zero point and no separate minimum.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .integer import from_groups, num_groups, round_ste, to_groups


class Element(NamedTuple):
    """A small float format: sign, `exp_bits` exponent bits, `man_bits` mantissa bits, saturating at `max`
    (E4M3 as `float8_e4m3fn`: no infinities, 448 is the largest finite value)."""

    name: str
    exp_bits: int
    man_bits: int
    max: float

    @property
    def min_exp(self) -> int:
        """Exponent of the smallest normal value; below it the grid is evenly spaced (subnormals)."""
        return 2 - 2 ** (self.exp_bits - 1)

    @property
    def max_exp(self) -> int:
        """Exponent of the largest value: what an MX scale leaves room for."""
        return math.floor(math.log2(self.max))

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits


E2M1 = Element("e2m1", 2, 1, 6.0)
E4M3 = Element("e4m3", 4, 3, 448.0)
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # code & 7 indexes this; bit 3 is the sign
E4M3_TINY = 2.0**-9  # the smallest positive E4M3 value: NVFP4's group scales stay at least this


class FPType(NamedTuple):
    """A floating-point weight format: its element, group length (-1: one group per output channel), how
    the group scales are stored: "fp32", "e8m0" (a power of two, as a biased exponent byte) or "e4m3", and
    how many consecutive output channels share each group's scale (FP8_BLOCK: 128)."""

    name: str
    element: Element
    group_size: int
    scale: str
    block_rows: int = 1

    @property
    def clip_max(self) -> float:
        """The largest clipping scale. A power-of-two (MX) scale takes the OCP rule's floored exponent, under
        which a group whose maximum lies in [1.5, 2) x 2^e saturates at E2M1's 6 x 2^(e-2) (E4M3's from 1.75 x
        2^e at 448 x 2^(e-8)): a scale up to 2 reaches the next exponent instead, a coarser step that saturates
        nothing. An E4M3 (NVFP4) scale may grow to 1.5, which puts a group's maximum on a lower E2M1 value and
        moves the grid across the rest of the group. FP8's fp32 scales clip only (at most 1)."""
        return {"e8m0": 2.0, "e4m3": 1.5}.get(self.scale, 1.0)

    def clip_ratios(self) -> torch.Tensor:
        """The clipping scales the search tries. On SmolLM2 round-to-nearest (wt2-32k, activation-weighted
        search): NVFP4 over 0.5-1.5 scores 19.98 against 20.27 over 0.7-1 (auto-round's calibrated RTN, which
        searches 0.5-1.51: 19.99); MXFP4 with the next exponent 24.48 (weight error alone: 28.1 -> 23.9 at 16k
        tokens; auto-round's, which tries 0.5, 1 and 2: 23.98)."""
        if self.scale == "e8m0":
            return torch.cat([torch.linspace(1.0, 0.7, 31), torch.tensor([0.5, 2.0])])
        if self.scale == "e4m3":
            return torch.linspace(0.5, 1.5, 51)
        return torch.linspace(1.0, 0.7, 31)

    def bits_per_weight(self, in_features: int) -> float:
        """Element bits plus the group scale's share (NVFP4's one fp32 per tensor is left out: under 1e-4)."""
        scale_bits = 32 if self.scale == "fp32" else 8
        return self.element.bits + scale_bits * num_groups(in_features, self.group_size) / in_features / self.block_rows


FP_TYPES = {t.name: t for t in (
    FPType("FP8", E4M3, -1, "fp32"),
    FPType("FP8_BLOCK", E4M3, 128, "fp32", 128),
    FPType("MXFP8", E4M3, 32, "e8m0"),
    FPType("MXFP4", E2M1, 32, "e8m0"),
    FPType("NVFP4", E2M1, 16, "e4m3"),
)}


class FPQuantized(NamedTuple):
    """Element codes (out, in) as uint8 bit patterns (E4M3: the float8 byte; E2M1: sign << 3 | index into
    `E2M1_VALUES`), group scales (out, groups) as stored (fp32, uint8 biased exponents, or float8_e4m3fn),
    and NVFP4's fp32 global scale (a 0-dim tensor; None for the others)."""

    codes: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    fptype: FPType


def grid_step(x: torch.Tensor, element: Element) -> torch.Tensor:
    """The spacing of the element grid at |x|: 2^(exponent - man_bits), the exponent floored at the
    smallest normal one, where the subnormals continue the grid evenly."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=torch.finfo(torch.float32).tiny)))
    return torch.exp2(exponent.clamp(min=element.min_exp) - element.man_bits)


def round_element(x: torch.Tensor, element: Element, offset=None) -> torch.Tensor:
    """`x` rounded to the element grid (to nearest, ties to even, saturating at +-max) after adding `offset`
    grid steps. Straight-through: the gradient is 1 for `x` and the step for `offset` inside the range."""
    step = grid_step(x.detach(), element)
    y = x / step
    if offset is not None:
        y = y + offset
    return (round_ste(y) * step).clamp(-element.max, element.max)


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()


def _e4m3_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to E4M3 in the forward pass (NVFP4's group scales are stored so), identity backward."""
    return x + (x.to(torch.float8_e4m3fn).float() - x).detach()


def global_scale(w: torch.Tensor, fptype: FPType) -> torch.Tensor | None:
    """NVFP4's per-tensor fp32 scale, E4M3 max x E2M1 max / the tensor's absolute maximum, which puts the
    largest group scale at the top of E4M3's range (None for the other formats)."""
    if fptype.scale != "e4m3":
        return None
    return (E4M3.max * fptype.element.max / w.detach().abs().amax().float().clamp(min=1e-12)).reshape(())


def group_scales(wg: torch.Tensor, fptype: FPType, max_scale=None, global_: torch.Tensor | None = None):
    """(effective scale (out, groups, 1) in fp32, the stored form (out, groups)) for grouped weights.
    Differentiable in `max_scale` (one per group, clamped to [0, `fptype.clip_max`])."""
    amax = wg.abs().amax(dim=-1, keepdim=True).float()
    if max_scale is not None:
        amax = amax * max_scale.clamp(0, fptype.clip_max).unsqueeze(-1)
    if fptype.block_rows > 1:
        amax = block_max(amax, fptype.block_rows)
    element = fptype.element
    if fptype.scale == "fp32":
        scale = (amax / element.max).clamp(min=torch.finfo(torch.float32).tiny)
        return scale, scale.detach().squeeze(-1)
    if fptype.scale == "e8m0":  # the OCP rule: floor(log2 amax) - the element's largest exponent
        exponent = (floor_ste(torch.log2(amax.clamp(min=2.0**-127))) - element.max_exp).clamp(-127, 127)
        return torch.exp2(exponent), (exponent.detach().squeeze(-1) + 127).to(torch.uint8)
    stored = _e4m3_ste((global_ * amax / element.max).clamp(E4M3_TINY, E4M3.max))
    return stored / global_, stored.detach().squeeze(-1).to(torch.float8_e4m3fn)


def block_max(amax: torch.Tensor, rows: int, reduce: str = "amax") -> torch.Tensor:
    """(out, groups, 1) group maxima -> each block of `rows` consecutive output channels' maximum (or sum),
    repeated on its rows (a partial last block as compressed-tensors pads it). Differentiable: the gradient
    reaches the row whose (clipped) maximum sets the block's."""
    out = amax.shape[0]
    padded = torch.nn.functional.pad(amax, (0, 0, 0, 0, 0, -out % rows))
    return getattr(padded.view(-1, rows, *amax.shape[1:]), reduce)(dim=1).repeat_interleave(rows, dim=0)[:out]


def block_scales(scale: torch.Tensor, fptype: FPType) -> torch.Tensor:
    """Stored (out, groups) scales -> one per block of `block_rows` rows, as compressed-tensors stores FP8_BLOCK's."""
    return scale[:: fptype.block_rows]


def fake_quant_groups(wg: torch.Tensor, fptype: FPType, offset=None, max_scale=None, global_: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through quantize-dequantize of grouped weights (out, groups, g): what tuning trains through.
    `global_`: NVFP4's global scale, taken from the untuned weight (`global_scale`)."""
    if fptype.scale == "e4m3" and global_ is None:
        raise ValueError("NVFP4 needs the tensor's global scale: pass global_scale(w, fptype)")
    scale, _ = group_scales(wg, fptype, max_scale, global_)
    return round_element(wg / scale, fptype.element, offset) * scale


@torch.no_grad()
def search_clipping(w: torch.Tensor, fptype: FPType, importance: torch.Tensor | None = None, ratios: torch.Tensor | None = None) -> torch.Tensor:
    """Per group (out, groups), the ratio of the group maximum whose round-to-nearest weights are closest
    to `w` in the `importance`-weighted squared error (one value per input channel), as `integer.search_clipping`
    for integers, over the format's `clip_ratios` (MX and NVFP4 scales may also grow: `FPType.clip_max`).
    Power-of-two (MX) scales change only where the scaled maximum crosses a power of two."""
    ratios = fptype.clip_ratios() if ratios is None else ratios
    wg = to_groups(w.float(), fptype.group_size)
    imp = None if importance is None else to_groups(importance.float().to(w.device).expand_as(w), fptype.group_size)
    glob = global_scale(w, fptype)
    best_err = best = None
    for r in ratios.tolist():
        ratio = torch.full(wg.shape[:2], min(max(r, 0.0), fptype.clip_max), device=w.device)
        err = (fake_quant_groups(wg, fptype, None, ratio, glob) - wg).square_()
        err = (err if imp is None else err.mul_(imp)).sum(-1)
        if fptype.block_rows > 1:  # one scale per block: its rows' errors decide together, one ratio for them all
            err = block_max(err.unsqueeze(-1), fptype.block_rows, reduce="sum").squeeze(-1)
        if best is None:
            best_err, best = err, ratio
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, ratio, best)
    return best


def fake_quant(w: torch.Tensor, fptype: FPType, offset=None, max_scale=None) -> torch.Tensor:
    """`fake_quant_groups` on an (out, in) weight; `offset` has the weight's shape."""
    off = None if offset is None else to_groups(offset, fptype.group_size)
    wg = to_groups(w, fptype.group_size)
    return from_groups(fake_quant_groups(wg, fptype, off, max_scale, global_scale(w, fptype)), w.shape[1])


def activation_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-layer input scale from the largest input magnitude seen in calibration, as llm-compressor
    calibrates it: E4M3 max x E2M1 max / amax, a 0-dim fp32 tensor."""
    return (E4M3.max * E2M1.max / amax.detach().float().clamp(min=1e-12)).reshape(())


def fake_quant_activations(x: torch.Tensor, fptype: FPType, global_: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic quantize-dequantize of activations (..., features), straight-through, each token's features
    grouped as a weight row's inputs are (FP8: one scale per token; MX: a power-of-two scale per 32; NVFP4:
    an E4M3 scale per 16 under the layer's calibrated `global_`), the scales from the values themselves as
    compressed-tensors computes them: an MX group's maximum is first rounded to one mantissa bit, so that a
    maximum from 1.75 x 2^e up takes the next exponent rather than saturate (the OCP rule floors the
    exponent); an NVFP4 group scale that underflows E4M3 becomes its 0.125. In fp32 (but for that one
    division), returned in x's dtype."""
    if fptype.scale == "e4m3" and global_ is None:
        raise ValueError("NVFP4 activations need the layer's calibrated global scale: pass activation_global_scale(amax)")
    rows = to_groups(x.reshape(-1, x.shape[-1]).float(), fptype.group_size)
    amax = rows.detach().abs().amax(dim=-1, keepdim=True)
    element = fptype.element
    if fptype.scale == "e8m0":  # the group maximum rounded to one mantissa bit first, as compressed-tensors does (MXFP8 too)
        mantissa, exponent = torch.frexp(amax.clamp(min=2.0**-127))
        steps = 2 ** (E2M1.man_bits + 1)
        rounded = torch.ldexp(torch.round(mantissa * steps) / steps, exponent)
        scale = torch.exp2((torch.floor(torch.log2(rounded)) - element.max_exp).clamp(-127, 127))
    elif fptype.scale == "e4m3":  # compressed-tensors divides the maximum in x's dtype, then scales and rounds in fp32
        stored = (global_ * (amax.to(x.dtype) / element.max).float()).clamp(max=E4M3.max).to(torch.float8_e4m3fn).float()
        scale = torch.where(stored == 0, 0.125, stored) / global_
    else:
        scale = (amax / element.max).clamp(min=torch.finfo(torch.float32).tiny)
    values = round_element(rows / scale, element) * scale
    return from_groups(values, x.shape[-1]).reshape(x.shape).to(x.dtype)


def encode(values: torch.Tensor, element: Element) -> torch.Tensor:
    """uint8 codes of values already on the element grid."""
    if element == E4M3:
        return values.to(torch.float8_e4m3fn).view(torch.uint8)
    index = torch.searchsorted(E2M1_VALUES.to(values.device), values.abs().contiguous())
    return (index | (values < 0).to(torch.int64) << 3).to(torch.uint8)


def decode(codes: torch.Tensor, element: Element) -> torch.Tensor:
    """fp32 values of uint8 codes (inverse of `encode`)."""
    if element == E4M3:
        return codes.view(torch.float8_e4m3fn).float()
    magnitude = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where(codes & 8 > 0, -magnitude, magnitude)


@torch.no_grad()
def quantize(w: torch.Tensor, fptype: FPType, offset=None, max_scale=None) -> FPQuantized:
    """Final codes and stored scales; `dequantize` gives exactly what `fake_quant` evaluates."""
    wg = to_groups(w.float(), fptype.group_size)
    glob = global_scale(w, fptype)
    scale, stored = group_scales(wg, fptype, max_scale, glob)
    off = None if offset is None else to_groups(offset.float(), fptype.group_size)
    values = round_element(wg / scale, fptype.element, off)
    return FPQuantized(encode(from_groups(values, w.shape[1]), fptype.element), stored, glob, fptype)


def stored_scale(q: FPQuantized) -> torch.Tensor:
    """The effective fp32 group scales (out, groups) from their stored form."""
    t = q.fptype
    if t.scale == "fp32":
        return q.scale.float()
    if t.scale == "e8m0":
        return torch.exp2(q.scale.float() - 127)
    return q.scale.float() / q.global_scale


def dequantize(q: FPQuantized, dtype=torch.float32) -> torch.Tensor:
    """(out, in) weight in `dtype`."""
    values = to_groups(decode(q.codes, q.fptype.element), q.fptype.group_size)
    return from_groups(values * stored_scale(q).unsqueeze(-1), q.codes.shape[1]).to(dtype)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) 4-bit codes -> (out, in/2) uint8, the even-indexed code in the low nibble (the layout
    compressed-tensors' nvfp4/mxfp4 packing and auto-round use)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of 4-bit codes per row")
    return (codes[..., 0::2] & 15) | (codes[..., 1::2] & 15) << 4


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
