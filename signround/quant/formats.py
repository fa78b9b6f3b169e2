"""One interface over the number formats, so that tuning, saving and exporting never branch on a format.

A `WeightScheme` names its format (`scheme.kind`); the format's handler here turns the scheme's fields into
calls of its pure module (`integer`, `kquant`, `fp`). Adding a format is its module, a handler registered
below, and the exporters that can store it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from . import fp, integer, kquant

Stored = Any  # a format's final codes and scales: integer.QuantizedWeight, kquant.KQuantized or fp.FPQuantized


class Format(Protocol):
    """What every number format gives. `tunes_min`: whether it has a group minimum to clip (asymmetric
    grids), i.e. whether SignRound tunes a min-clipping scale beside the max one."""

    tunes_min: bool

    def tunes_max(self, scheme) -> bool:
        """Whether SignRound tunes the max-clipping scale from its searched start, or the rounding offsets alone."""

    def fake_quant_groups(self, scheme, wg: torch.Tensor, offset, min_scale, max_scale) -> torch.Tensor:
        """Straight-through quantize-dequantize of grouped weights (out, groups, g)."""

    def quantize(self, scheme, w: torch.Tensor, offset=None, min_scale=None, max_scale=None) -> Stored:
        """Final codes and scales of an (out, in) weight; `dequantize` gives what `fake_quant_groups` evaluated."""

    def dequantize(self, stored: Stored, dtype=torch.float32) -> torch.Tensor: ...

    def search_clipping(self, scheme, w: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """Per group (out, groups), the range-shrink ratio with the lowest importance-weighted round-to-nearest error."""

    def bits_per_weight(self, scheme, in_features: int) -> float: ...

    def clip_max(self, scheme) -> float:
        """The largest clipping scale the format takes (1: clipping only shrinks the range)."""


class Integer:
    tunes_min = True

    def tunes_max(self, scheme):
        return True

    def clip_max(self, scheme):
        return 1.0

    def fake_quant_groups(self, scheme, wg, offset, min_scale, max_scale):
        return integer.fake_quant_groups(wg, scheme.bits, scheme.sym, offset, min_scale, max_scale)

    def quantize(self, scheme, w, offset=None, min_scale=None, max_scale=None):
        return integer.quantize_weight(w, scheme.bits, scheme.group_size, scheme.sym, offset, min_scale, max_scale)

    def dequantize(self, stored, dtype=torch.float32):
        return integer.dequantize_weight(stored, dtype)

    def search_clipping(self, scheme, w, importance):
        return integer.search_clipping(w, scheme.bits, scheme.group_size, scheme.sym, importance)

    def bits_per_weight(self, scheme, in_features):
        """The code plus its group's fp16 scale and packed zero point."""
        return scheme.bits + (16 + scheme.bits) * integer.num_groups(in_features, scheme.group_size) / in_features


class KQuant(Integer):
    """llama.cpp's K-quants: integer groups whose scales (and minimums) are quantized per 256 weights."""

    def fake_quant_groups(self, scheme, wg, offset, min_scale, max_scale):
        return kquant.fake_quant_k_groups(wg, scheme.ktype, offset, min_scale, max_scale)

    def quantize(self, scheme, w, offset=None, min_scale=None, max_scale=None):
        return kquant.quantize_k(w, scheme.ktype, offset, min_scale, max_scale)

    def dequantize(self, stored, dtype=torch.float32):
        return kquant.dequantize_k(stored).to(dtype)

    def bits_per_weight(self, scheme, in_features):
        return scheme.ktype.bits_per_weight


class Float:
    """FP8, FP8_BLOCK, MXFP8, MXFP4, NVFP4 (`fp.FP_TYPES`): symmetric grids, so only the group maximum is clipped."""

    tunes_min = False

    def tunes_max(self, scheme):
        """An E8M0 or E4M3 group scale moves in coarse steps (a power of two, 3 mantissa bits), and tuning it
        beside the offsets undid the clipping search (SmolLM2 block 0, relative output error after the fast
        recipe: NVFP4 4.74e-3 with the scale tuned, 2.70e-3 without, 4.29e-3 at the searched start; MXFP4
        1.03e-2 against 8.13e-3), so those keep the searched clipping. FP8's fp32 scales tune as integers' do."""
        return scheme.fptype.scale == "fp32"

    def fake_quant_groups(self, scheme, wg, offset, min_scale, max_scale):
        t = scheme.fptype
        glob = fp.global_scale(wg, t)  # NVFP4's, from the untuned weight (zero padding never sets a maximum)
        return fp.fake_quant_groups(wg, t, offset, max_scale, glob)

    def quantize(self, scheme, w, offset=None, min_scale=None, max_scale=None):
        return fp.quantize(w, scheme.fptype, offset, max_scale)

    def dequantize(self, stored, dtype=torch.float32):
        return fp.dequantize(stored, dtype)

    def search_clipping(self, scheme, w, importance):
        return fp.search_clipping(w, scheme.fptype, importance)

    def clip_max(self, scheme):
        return scheme.fptype.clip_max

    def bits_per_weight(self, scheme, in_features):
        return scheme.fptype.bits_per_weight(in_features)


FORMATS: dict[str, Format] = {"int": Integer(), "kquant": KQuant(), "fp": Float()}

class Activation(NamedTuple):
    """An input format, applied dynamically to a quantized linear's input (per token, or per group of a
    token's features). `calibrated`: it also takes one fp32 scale per layer, set from the calibration
    inputs (`fp.activation_global_scale`), as NVFP4's global scale."""

    quantize: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, the layer's scale) -> straight-through x
    description: str
    calibrated: bool = False


def _fp_inputs(name: str) -> Callable:
    return lambda x, global_=None: fp.fake_quant_activations(x, fp.FP_TYPES[name], global_)


ACTIVATIONS = {
    "INT8": Activation(lambda x, _=None: integer.fake_quant_tokens(x, 8), "int8, one scale per token"),
    "FP8": Activation(_fp_inputs("FP8"), "FP8 E4M3, one scale per token"),
    "FP8_BLOCK": Activation(_fp_inputs("FP8_BLOCK"), "FP8 E4M3, one scale per 128 features of a token"),
    "MXFP8": Activation(_fp_inputs("MXFP8"), "MXFP8, an E8M0 scale per 32"),
    "MXFP4": Activation(_fp_inputs("MXFP4"), "MXFP4, an E8M0 scale per 32"),
    "NVFP4": Activation(_fp_inputs("NVFP4"), "NVFP4, an E4M3 scale per 16 under a calibrated fp32 scale per layer", calibrated=True),
}


def quantize_activations(x: torch.Tensor, act: str, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`x` as the runtime quantizes it; `global_scale`: the layer's calibrated scale where the format has one."""
    return ACTIVATIONS[act].quantize(x, global_scale)
