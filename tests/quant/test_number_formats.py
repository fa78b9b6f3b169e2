"""The one interface every number format gives (quant/formats.py), swept over formats x dtypes: what tuning,
saving and exporting rely on without knowing the format."""

import pytest
import torch

from signround.config import WeightScheme
from signround.quant.integer import from_groups, to_groups

SCHEMES = ["W4A16G32", "W2A16G32", "W8A16", "Q4_K", "Q3_K", "FP8A16", "FP8_BLOCKA16", "MXFP8A16", "MXFP4A16", "NVFP4A16"]


def weight(dtype=torch.float32, shape=(48, 512)):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", SCHEMES)
def test_stored_form_dequantizes_to_what_tuning_evaluated(name, dtype):
    """SignRound trains through `fake_quant_groups`; the checkpoint holds `quantize`'s codes. They must agree
    exactly for float formats; integer ones round their scales to fp16 when storing, which moves a code by one
    step where it sat on a rounding boundary."""
    s = WeightScheme.preset(name)
    w = weight(dtype)
    groups = s.groups(w.shape[1])
    offset = (torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.8
    clip = torch.full((w.shape[0], groups), 0.9)
    fake = from_groups(s.fake_quant_groups(to_groups(w.float(), s.group_size), to_groups(offset, s.group_size), clip, clip), w.shape[1])
    stored = s.dequantize(s.quantize(w.float(), offset, clip, clip))
    if s.kind == "fp":
        assert torch.equal(stored, fake)
    else:
        moved = (stored - fake).abs()
        codes_moved = ~torch.isclose(stored, fake, rtol=1e-3, atol=1e-7)  # else only the scale's fp16 rounding
        assert codes_moved.float().mean() < 0.01 and moved.max() <= 2 * w.float().abs().max() / 2 ** (s.bits - 1)


@pytest.mark.parametrize("name", SCHEMES)
def test_tuned_tensors_get_gradients_and_only_those_the_format_has(name):
    s = WeightScheme.preset(name)
    wg = to_groups(weight(), s.group_size)
    offset = torch.zeros_like(wg, requires_grad=True)
    mins = torch.ones(wg.shape[:2], requires_grad=True) if s.format.tunes_min else None
    maxs = torch.ones(wg.shape[:2], requires_grad=True)
    s.fake_quant_groups(wg, offset, mins, maxs).pow(2).sum().backward()
    assert offset.grad.abs().sum() > 0 and maxs.grad.abs().sum() > 0
    assert mins is None or mins.grad.abs().sum() > 0
    assert s.format.tunes_min == (s.kind != "fp")  # symmetric float grids clip their maximum only


@pytest.mark.parametrize("name", SCHEMES)
def test_clipping_search_never_does_worse_than_no_clipping(name):
    s = WeightScheme.preset(name)
    w = weight()
    w[:, 7] *= 20  # an outlier channel: clipping it pays only where its inputs are small
    importance = torch.ones(w.shape[1])
    importance[7] = 1e-3
    best = s.search_clipping(w, importance)
    assert best.shape == (w.shape[0], s.groups(w.shape[1])) and (best <= s.clip_max).all() and (best >= 0.5 - 1e-6).all()

    def error(clip):
        return ((s.dequantize(s.quantize(w, None, clip, clip)) - w).pow(2) * importance).sum()

    assert error(best) <= error(torch.ones_like(best)) * (1 + 1e-3)


@pytest.mark.parametrize("name", SCHEMES)
def test_bits_per_weight_counts_codes_and_scales(name):
    s = WeightScheme.preset(name)
    bpw = s.bits_per_weight(4096)
    assert s.bits <= bpw <= s.bits + 1.25  # every format's scales cost at most 1.25 bits a weight (NVFP4: 8 per 16 = 0.5)


def test_error_falls_with_more_bits_in_every_family():
    w = weight()

    def err(name):
        s = WeightScheme.preset(name)
        return (s.dequantize(s.quantize(w)) - w).pow(2).mean()

    assert err("W8A16") < err("W4A16G32") < err("W2A16G32")
    assert err("MXFP8A16") < err("MXFP4A16")
    assert err("FP8A16") < err("NVFP4A16") < err("MXFP4A16")  # NVFP4's finer E4M3 scales beat MXFP4's powers of two
