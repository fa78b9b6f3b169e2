"""QuantLinear's fast 4-bit CPU path (torch's packed int4 matmul) and its GPU path (a slice of output features
dequantized at a time) agree with its whole dequantize path."""

import pytest
import torch

from signround.config import WeightScheme
from signround.qlinear import QuantLinear
from signround.quant.integer import quantize_weight
from signround.quant.kquant import quantize_k


def layer(out_features, in_features, group, sym, bits=4):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, bits, group, sym)
    return QuantLinear.from_quantized(qw, WeightScheme(bits, group, sym), torch.randn(out_features))


@pytest.mark.parametrize("out_features, in_features, group, sym", [
    (192, 576, 128, True),   # SmolLM2's k_proj at g128: a partial last group, padded for the kernel
    (192, 576, 64, False),
    (64, 64, 32, True),
    (48, 256, 256, False),
])
def test_int4_kernel_matches_the_dequantized_matmul(out_features, in_features, group, sym):
    q = layer(out_features, in_features, group, sym)
    x = torch.randn(1, 5, in_features, dtype=torch.bfloat16)
    fast = q(x)
    assert q.__dict__.get("_int4_cache") is not None, "the int4 kernel was not used"
    exact = torch.nn.functional.linear(x.float(), q.dequantized_weight(torch.float32), q.bias.float())
    torch.testing.assert_close(fast.float(), exact, atol=0.02 * exact.abs().max().item(), rtol=0.02)


def test_long_inputs_other_widths_and_fp32_take_the_dequantize_path():
    q = layer(64, 64, 32, True)
    q(torch.randn(1, QuantLinear.INT4_MAX_ROWS + 1, 64, dtype=torch.bfloat16))
    q(torch.randn(1, 3, 64))  # fp32 activations: exact dequantized weights
    assert q.__dict__.get("_int4_cache") is None
    q3 = layer(64, 64, 32, True, bits=3)
    q3(torch.randn(1, 3, 64, dtype=torch.bfloat16))
    assert q3.__dict__.get("_int4_cache") is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_slice_of_output_features_unpacks_as_the_same_slice_of_the_whole(bits):
    q = layer(160, 96, 32, False, bits=bits)
    whole = q.dequantized_weight()
    for rows in (slice(0, 32), slice(32, 96), slice(128, 160), slice(96, 1000)):
        torch.testing.assert_close(q.dequantized_weight(rows=rows), whole[rows], rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        q.quantized_weight(slice(16, 48))


def test_k_quant_slices_unpack_as_the_whole():
    scheme = WeightScheme.preset("Q4_K")
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    q = QuantLinear.from_quantized(quantize_k(w, scheme.ktype), scheme, None)
    torch.testing.assert_close(q.dequantized_weight(rows=slice(40, 72)), q.dequantized_weight()[40:72], rtol=0, atol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_the_sliced_forward_matches_the_whole_matmul(bits):
    q = layer(200, 96, 32, True, bits=bits)
    q.SLICE_WEIGHTS = 64 * 96  # 64 output features a slice: four slices, the last partial
    x = torch.randn(2, 7, 96)
    torch.testing.assert_close(q._sliced_forward(x, q.bias), torch.nn.functional.linear(x, q.dequantized_weight(), q.bias))


@pytest.mark.parametrize("scheme", ["W8A8", "FP8", "MXFP4", "NVFP4"])
def test_a_layer_with_quantized_inputs_quantizes_them_before_its_matmul(scheme):
    from signround.quant.formats import quantize_activations

    s = WeightScheme.preset(scheme)
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1))
    input_scale = torch.tensor(448 * 6 / 4.0) if scheme == "NVFP4" else None  # as calibrated on inputs up to 4
    if input_scale is not None:
        with pytest.raises(ValueError, match="NVFP4 inputs need the layer's calibrated global scale"):
            QuantLinear.from_quantized(s.quantize(w), s, None)
    q = QuantLinear.from_quantized(s.quantize(w), s, None, input_scale)
    want = torch.nn.functional.linear(quantize_activations(x, s.act, input_scale), q.dequantized_weight())
    got = q(x)
    if scheme == "W8A8":  # torch's int8 matmul on the CPU: the same numbers up to fp32 rounding
        assert q.__dict__.get("_int8_cache") is not None, "the int8 matmul was not used"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, want)
    assert not torch.equal(got, torch.nn.functional.linear(x, q.dequantized_weight()))


def test_w8a8_int8_matmul_in_bf16_is_the_simulated_one_without_its_roundings():
    s = WeightScheme.preset("W8A8")
    q = QuantLinear.from_quantized(s.quantize(torch.randn(64, 96) * 0.05), s, torch.randn(64))
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(quantize_activations_f32(x), q.dequantized_weight(), q.bias.float())
    torch.testing.assert_close(q(x).float(), exact, rtol=2**-7, atol=2**-7 * exact.abs().max().item())


def quantize_activations_f32(x):
    from signround.quant.integer import fake_quant_tokens

    return fake_quant_tokens(x.float(), 8)
