"""Integer quant-dequant as pure tensor functions (no modules, no I/O).

Weights are (out_features, in_features); a group is `group_size` consecutive input channels of one
output row. Codes are unsigned integers in [0, 2**bits - 1]; a weight dequantizes to
`(code - zero) * scale`.

Symmetric schemes use the full code range as auto-round does: the zero point is fixed at 2**(bits-1)
and the scale is signed so that the group's largest-magnitude weight lands on code 0 (value -2**(bits-1)),
which gives one more level than the classic `absmax / (2**(bits-1) - 1)`.

`min_scale`/`max_scale` (one per group, in [0, 1]) shrink the range before the scale is computed: the
clipping that SignRound tunes. `offset` is SignRound's per-weight rounding offset V in [-0.5, 0.5].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SCALE_EPS = 1e-5  # smallest |scale|: keeps all-zero groups finite and representable in fp16


class QuantizedWeight(NamedTuple):
    """Integer codes (out, in) as uint8 plus per-group fp16 `scale` and integer `zero`, both (out, groups).
    `group_size` is the effective group length (in_features for per-channel schemes)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def group_size_for(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row; a last partial group is allowed (as auto-round and GPTQ's g_idx do)."""
    return -(-in_features // group_size_for(in_features, group_size))


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, groups, group_size), zero-padding a partial last group. Zeros never change a
    group's range: the range always includes 0."""
    out_features, in_features = w.shape
    g = group_size_for(in_features, group_size)
    pad = num_groups(in_features, group_size) * g - in_features
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_features, -1, g)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `to_groups`: drop the padding."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def group_range(w_groups: torch.Tensor, min_scale=None, max_scale=None):
    """Per-group (min, max), each (out, groups, 1), widened to include 0 and shrunk by the clipping scales."""
    wmin = w_groups.amin(dim=-1, keepdim=True).clamp(max=0)
    wmax = w_groups.amax(dim=-1, keepdim=True).clamp(min=0)
    if min_scale is not None:
        wmin = wmin * min_scale.clamp(0, 1).unsqueeze(-1)
    if max_scale is not None:
        wmax = wmax * max_scale.clamp(0, 1).unsqueeze(-1)
    return wmin, wmax


def qparams(w_groups: torch.Tensor, bits: int, sym: bool, min_scale=None, max_scale=None, ste: bool = False):
    """Per-group (scale, zero), each shaped (out, groups, 1), for grouped weights (out, groups, g).

    Differentiable in `min_scale`/`max_scale` (and in the weights) when `ste` is set.
    """
    wmin, wmax = group_range(w_groups, min_scale, max_scale)
    return qparams_from_range(wmin, wmax, bits, sym, ste)


def qparams_from_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool, ste: bool = False):
    """`qparams` from a group range already taken (and clipped): a search over clippings takes it once."""
    rnd = round_ste if ste else torch.round
    if sym:
        half = 2 ** (bits - 1)
        neg_dominates = -wmin > wmax
        amax = torch.maximum(-wmin, wmax)
        scale = torch.where(neg_dominates, amax, -amax) / half
        scale = torch.where(scale.abs() < SCALE_EPS, torch.full_like(scale, SCALE_EPS), scale)
        zero = torch.full_like(scale, float(half))
    else:
        scale = ((wmax - wmin) / (2**bits - 1)).clamp(min=SCALE_EPS)
        zero = rnd(-wmin / scale).clamp(0, 2**bits - 1)
    return scale, zero


def quantize_groups(w_groups, scale, zero, bits: int, offset=None, ste: bool = False) -> torch.Tensor:
    """Codes (float-valued integers) for grouped weights."""
    x = w_groups / scale
    if offset is not None:
        x = x + offset
    rnd = round_ste if ste else torch.round
    return (rnd(x) + zero).clamp(0, 2**bits - 1)


class _RoundClampSTE(torch.autograd.Function):
    """`(clamp(round(w / scale + offset) + zero) - zero) * scale` on grouped tensors, with the
    straight-through gradients written out by hand: autograd would keep and replay ~30 elementwise
    passes over the weights per step, about a tenth of a SignRound step's time on CPU. With
    `zero_in_round` the zero point is added before rounding (a fractional zero point, as K-quants'
    float minimums give); the gradients have the same form."""

    @staticmethod
    def forward(ctx, wg, offset, scale, zero, maxq, zero_in_round=False):
        x = wg / scale
        if offset is not None:
            x = x + offset
        x = (x + zero).round_() if zero_in_round else x.round_().add_(zero)
        inside = (x >= 0) & (x <= maxq)
        out = x.clamp_(0, maxq).sub_(zero).mul_(scale)
        ctx.save_for_backward(wg, scale, inside, out)
        ctx.has_offset = offset is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        wg, scale, inside, out = ctx.saved_tensors
        passed = grad * inside  # rounding passes gradients straight through; clamping stops them
        grad_wg = passed if ctx.needs_input_grad[0] else None
        grad_offset = passed * scale if ctx.has_offset and ctx.needs_input_grad[1] else None
        grad_scale = (grad * out - passed * wg).sum(-1, keepdim=True) / scale if ctx.needs_input_grad[2] else None
        grad_zero = (passed - grad).sum(-1, keepdim=True) * scale if ctx.needs_input_grad[3] else None
        return grad_wg, grad_offset, grad_scale, grad_zero, None, None


def round_clamp_ste(wg, offset, scale, zero, maxq: int, zero_in_round: bool = False) -> torch.Tensor:
    """Dequantized `clamp(round(wg / scale + offset) + zero, 0, maxq)`, straight-through (see `_RoundClampSTE`).
    Under `torch.compile` the plain expression instead: inductor fuses it into one kernel each way (a
    third of the eager function's time), where the hand-written one would stay a series of passes."""
    if not torch.compiler.is_compiling():
        return _RoundClampSTE.apply(wg, offset, scale, zero, maxq, zero_in_round)
    x = wg / scale if offset is None else wg / scale + offset
    codes = round_ste(x + zero) if zero_in_round else round_ste(x) + zero
    return (codes.clamp(0, maxq) - zero) * scale


def fake_quant_groups(wg: torch.Tensor, bits: int, sym: bool, offset=None, min_scale=None, max_scale=None) -> torch.Tensor:
    """`fake_quant` on weights already grouped (out, groups, g), with `offset` grouped alike: the form
    SignRound keeps its tensors in, so that no step pads or reshapes the weights again."""
    scale, zero = qparams(wg, bits, sym, min_scale, max_scale, ste=True)
    return round_clamp_ste(wg, offset, scale, zero, 2**bits - 1)


def fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool, offset=None, min_scale=None, max_scale=None) -> torch.Tensor:
    """Quantize-dequantize with straight-through gradients: the weight SignRound trains through.

    `offset` has the weight's shape; `min_scale`/`max_scale` are (out, groups).
    """
    off = None if offset is None else to_groups(offset, group_size)
    return from_groups(fake_quant_groups(to_groups(w, group_size), bits, sym, off, min_scale, max_scale), w.shape[1])


def fake_quant_tokens(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token quantize-dequantize of activations (..., features), straight-through:
    scale = |x|max / (2**(bits-1) - 1) per token, codes clamped to [-2**(bits-1), 2**(bits-1) - 1], as vLLM's
    int8 kernels quantize a linear's input (W8A8). Computed in fp32, returned in x's dtype."""
    xf = x.float()
    qmax = 2 ** (bits - 1) - 1
    scale = token_scales(xf, bits)
    return (round_ste(xf / scale).clamp(-qmax - 1, qmax) * scale).to(x.dtype)


def token_scales(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Each token's scale (..., 1) for `fake_quant_tokens`, and for the int8 matmul that runs the same codes."""
    return (x.detach().abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp(min=1e-12)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, bits: int, group_size: int, sym: bool, offset=None, min_scale=None, max_scale=None) -> QuantizedWeight:
    """Final integer codes. The scale is rounded to fp16 *before* the codes are computed, so that the
    stored checkpoint dequantizes to exactly what was evaluated."""
    wg = to_groups(w.float(), group_size)
    scale, zero = qparams(wg, bits, sym, min_scale, max_scale)
    scale = scale.to(torch.float16).float()
    scale = torch.where(scale == 0, torch.full_like(scale, SCALE_EPS), scale)
    off = None if offset is None else to_groups(offset.float(), group_size)
    q = quantize_groups(wg, scale, zero, bits, off)
    return QuantizedWeight(
        codes=from_groups(q, w.shape[1]).to(torch.uint8),
        scale=scale.squeeze(-1).to(torch.float16),
        zero=zero.squeeze(-1).to(torch.uint8),
        bits=bits,
        group_size=group_size_for(w.shape[1], group_size),
    )


def dequantize_weight(qw: QuantizedWeight, dtype=torch.float32) -> torch.Tensor:
    """(out, in) weight in `dtype` from codes, scales and zeros."""
    codes = to_groups(qw.codes.to(torch.float32), qw.group_size)
    w = (codes - qw.zero.unsqueeze(-1).float()) * qw.scale.unsqueeze(-1).float()
    return from_groups(w, qw.codes.shape[1]).to(dtype)


def search_clipping(w: torch.Tensor, bits: int, group_size: int, sym: bool, importance: torch.Tensor | None = None,
                    ratios: torch.Tensor | None = None) -> torch.Tensor:
    """Per group, the range-shrink ratio (applied to both min and max) whose round-to-nearest weights are
    closest to `w` in the `importance`-weighted squared error (importance: one value per input channel,
    e.g. the mean squared activation, as llama.cpp's imatrix). A better start for SignRound's clipping
    scales than no clipping at all. Returns (out, groups).

    Each candidate's error is computed in place in one weight-sized buffer, from a group range taken
    once: the same numbers as `quantize_groups` then dequantizing, at a tenth of the time (fresh
    weight-sized tensors per pass made this ~1.5% of a 200-step block on CPU)."""
    ratios = torch.linspace(1.0, 0.7, 31) if ratios is None else ratios
    wg = to_groups(w.float(), group_size)
    imp = None if importance is None else to_groups(importance.float().to(w.device).expand_as(w), group_size)
    wmin, wmax = group_range(wg)
    err_buf = torch.empty_like(wg)
    best_err = best = None
    for r in ratios.tolist():
        ratio = torch.full(wmin.shape, min(max(r, 0.0), 1.0), device=w.device)  # clamped as `group_range` clamps clipping scales
        scale, zero = qparams_from_range(wmin * ratio, wmax * ratio, bits, sym)
        torch.div(wg, scale, out=err_buf).round_().add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale).sub_(wg).square_()
        err = (err_buf if imp is None else err_buf.mul_(imp)).sum(-1)
        if best is None:
            best_err, best = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, r), best)
    return best
