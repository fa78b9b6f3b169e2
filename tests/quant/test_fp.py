"""Floating-point formats: the element grids against torch's own casts and the OCP/NVIDIA tables, offsets
that pick between neighbours at every magnitude, straight-through gradients, codes and stored scales that
dequantize to exactly what tuning evaluated, and 4-bit packing, swept over formats and input dtypes."""

import pytest
import torch

from signround.quant import fp

FORMATS = list(fp.FP_TYPES.values())


def _all_values(element):
    codes = torch.arange(256 if element == fp.E4M3 else 16, dtype=torch.uint8)
    values = fp.decode(codes, element)
    return values[values.isfinite()]


@pytest.mark.parametrize("element", [fp.E2M1, fp.E4M3], ids=lambda e: e.name)
def test_grid_values_are_fixed_points_and_codes_round_trip(element):
    values = _all_values(element)
    assert torch.equal(fp.round_element(values, element), values)
    assert torch.equal(fp.decode(fp.encode(values, element), element), values)
    assert values.abs().max() == element.max


def test_e4m3_rounding_is_torchs_cast():
    x = torch.randn(100_000) * torch.exp2(torch.randint(-12, 9, (100_000,)).float())
    x = x.clamp(-448, 448)
    assert torch.equal(fp.round_element(x, fp.E4M3), x.to(torch.float8_e4m3fn).float())


def test_e2m1_rounds_to_nearest_with_ties_to_even_and_saturates():
    x = torch.tensor([0.2, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, 100.0, -2.6])
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -3.0])
    assert torch.equal(fp.round_element(x, fp.E2M1), expected)


@pytest.mark.parametrize("element", [fp.E2M1, fp.E4M3], ids=lambda e: e.name)
def test_offsets_pick_between_the_two_neighbours_at_every_magnitude(element):
    values = _all_values(element)
    grid = values[values >= 0].sort().values
    x = (grid[:-1] + grid[1:]) / 2 + (grid[1:] - grid[:-1]) * 0.1  # just above each midpoint
    up = fp.round_element(x, element, offset=torch.full_like(x, 0.45))
    down = fp.round_element(x, element, offset=torch.full_like(x, -0.45))
    assert torch.equal(up, grid[1:]) and torch.equal(down, grid[:-1])


def test_gradients_pass_straight_through_inside_the_range_only():
    x = torch.tensor([0.3, 2.7, 5.9, 9.0], requires_grad=True)
    offset = torch.zeros(4, requires_grad=True)
    fp.round_element(x, fp.E2M1, offset).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(offset.grad, torch.tensor([0.5, 1.0, 2.0, 0.0]))  # the grid step where each value lies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fptype", FORMATS, ids=lambda t: t.name)
def test_codes_dequantize_to_the_fake_quantized_weight(fptype, dtype):
    w = (torch.randn(48, 96) * 0.02).to(dtype)
    offset = (torch.rand(48, 96) - 0.5) * 0.8
    max_scale = 0.8 + 0.2 * torch.rand(48, fp.num_groups(96, fptype.group_size))
    q = fp.quantize(w, fptype, offset, max_scale)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert torch.equal(fp.dequantize(q), fp.fake_quant(w.float(), fptype, offset, max_scale))
    nearest = fp.dequantize(fp.quantize(w, fptype))
    error = (nearest - w.float()).pow(2).mean() / w.float().pow(2).mean()
    assert error < (0.02 if fptype.element == fp.E2M1 else 0.002)  # Gaussian weights: ~0.01 and ~0.001


def test_stored_scales_follow_each_format():
    w = torch.randn(8, 64)
    mx = fp.quantize(w, fp.FP_TYPES["MXFP4"])
    amax = w.abs().reshape(8, 2, 32).amax(-1)
    assert mx.scale.dtype == torch.uint8 and torch.equal(fp.stored_scale(mx), torch.exp2(torch.floor(torch.log2(amax)) - 2))
    nv = fp.quantize(w, fp.FP_TYPES["NVFP4"])
    assert nv.scale.dtype == torch.float8_e4m3fn and nv.global_scale == 448 * 6 / w.abs().max()
    assert nv.scale.float().max() == pytest.approx(448, rel=0.07)  # the largest group scale sits at the top of E4M3
    fp8 = fp.quantize(w, fp.FP_TYPES["FP8"])
    assert fp8.scale.shape == (8, 1) and torch.allclose(fp8.scale, w.abs().amax(1, keepdim=True) / 448)


def test_fp8_block_codes_and_scales_are_compressed_tensors_own():
    """FP8_BLOCK (DeepSeek's 128 x 128 blocks): one scale per block, the block's maximum over 448 (a partial
    last block padded, as compressed-tensors pads it), and compressed-tensors' own quantizer, given those
    scales, writes our codes bit for bit."""
    import torch.nn.functional as F
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    w = torch.randn(300, 576) * 0.02
    t = fp.FP_TYPES["FP8_BLOCK"]
    q = fp.quantize(w, t)
    blocks = fp.block_scales(q.scale, t)
    assert torch.equal(blocks, F.pad(w.abs(), (0, 64, 0, 84)).view(3, 128, 5, 128).amax((1, 3)) / 448)
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128], symmetric=True, dynamic=False)
    assert torch.equal(quantize(w, blocks, None, args, dtype=torch.float8_e4m3fn).view(torch.uint8), q.codes)


def test_a_block_scale_trains_through_the_row_that_sets_it():
    wg = torch.randn(256, 1, 128)
    max_scale = torch.ones(256, 1, requires_grad=True)
    fp.fake_quant_groups(wg, fp.FP_TYPES["FP8_BLOCK"], max_scale=max_scale).pow(2).sum().backward()
    top = wg.abs().amax(-1).view(2, 128).argmax(1) + torch.tensor([0, 128])
    assert (max_scale.grad[:, 0] != 0).nonzero().flatten().tolist() == top.tolist()


def test_a_block_takes_one_clipping_ratio_chosen_on_all_its_rows():
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(0))
    t = fp.FP_TYPES["FP8_BLOCK"]
    ratio = fp.search_clipping(w, t)
    assert torch.equal(ratio[:128], ratio[:1].expand(128, -1)) and torch.equal(ratio[128:], ratio[128:129].expand(72, -1))
    assert (fp.fake_quant(w, t, None, ratio) - w).pow(2).sum() <= (fp.fake_quant(w, t) - w).pow(2).sum()


def test_clipping_scale_trains_through_the_mx_exponent():
    wg = torch.randn(4, 2, 32)
    max_scale = torch.ones(4, 2, requires_grad=True)
    fp.fake_quant_groups(wg, fp.FP_TYPES["MXFP4"], max_scale=max_scale).pow(2).sum().backward()
    assert max_scale.grad.abs().min() > 0


def test_finer_scales_quantize_closer():
    w = torch.randn(64, 256)
    errors = {t.name: (fp.fake_quant(w, t) - w).pow(2).mean().item() for t in FORMATS}
    assert errors["NVFP4"] < errors["MXFP4"] and errors["MXFP8"] < errors["NVFP4"]


def test_bits_per_weight():
    assert fp.FP_TYPES["MXFP4"].bits_per_weight(4096) == 4.25
    assert fp.FP_TYPES["NVFP4"].bits_per_weight(4096) == 4.5
    assert fp.FP_TYPES["MXFP8"].bits_per_weight(4096) == 8.25
    assert fp.FP_TYPES["FP8"].bits_per_weight(4096) == 8 + 32 / 4096
    assert fp.FP_TYPES["FP8_BLOCK"].bits_per_weight(4096) == 8 + 32 / 128 / 128


def test_fp4_packing_puts_the_even_code_in_the_low_nibble():
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    packed = fp.pack_fp4(codes)
    assert packed.shape == (5, 16) and torch.equal(packed[:, 0] & 15, codes[:, 0]) and torch.equal(packed[:, 0] >> 4, codes[:, 1])
    assert torch.equal(fp.unpack_fp4(packed), codes)
    with pytest.raises(ValueError, match="odd number"):
        fp.pack_fp4(codes[:, :3])


def test_nvfp4_needs_its_global_scale():
    with pytest.raises(ValueError, match="global scale"):
        fp.fake_quant_groups(torch.randn(2, 1, 16), fp.FP_TYPES["NVFP4"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["MXFP4", "MXFP8", "NVFP4"])
def test_inputs_are_quantized_as_compressed_tensors_quantizes_them(name, dtype):
    """Dynamic activations (per group of a token's features; NVFP4's under a calibrated per-layer scale) equal
    compressed-tensors' own fake quantization bit for bit, over values spanning six orders of magnitude."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from signround.export.compressed_tensors import _act_args

    x = (torch.randn(6, 7, 256) * torch.logspace(-3, 3, 256)[torch.randperm(256)]).to(dtype)
    layer = torch.nn.Module()
    layer.quantization_status = QuantizationStatus.FROZEN
    global_ = fp.activation_global_scale(x.float().abs().amax()) if name == "NVFP4" else None
    if global_ is not None:
        layer.input_global_scale = global_.reshape(1)
        with pytest.raises(ValueError, match="calibrated global scale"):
            fp.fake_quant_activations(x, fp.FP_TYPES[name])
    theirs = forward_quantize(layer, x, "input", QuantizationArgs(**_act_args(name)))
    ours = fp.fake_quant_activations(x, fp.FP_TYPES[name], global_)
    assert ours.dtype == dtype and torch.equal(ours, theirs.to(dtype))


@pytest.mark.parametrize("name", ["MXFP4", "MXFP8", "NVFP4", "FP8"])
def test_mx_scales_may_take_the_next_exponent_where_the_floored_one_saturates(name):
    """The OCP rule floors the exponent, so a group whose maximum is near 2 x 2^e saturates (E2M1 at 6 x 2^(e-2),
    E4M3 at 448 x 2^(e-8)): a clipping scale of 2 reaches the next exponent, which the search picks there,
    not where the group fits. NVFP4's E4M3 scales may grow to 1.5, FP8's fp32 ones not at all."""
    t = fp.FP_TYPES[name]
    assert t.clip_max == {"MXFP4": 2.0, "MXFP8": 2.0, "NVFP4": 1.5, "FP8": 1.0}[name] and float(t.clip_ratios().max()) == t.clip_max
    assert (t.clip_ratios() == 1.0).any()  # no clipping is always a candidate
    n = t.group_size if t.group_size > 0 else 64
    saturating = torch.tensor([1.9, -1.8, 1.7] + [0.5] * (n - 3))
    fitting = torch.tensor([1.1, -1.0, 0.5] + [0.25] * (n - 3))
    w = torch.stack([saturating, fitting])
    ratio = fp.search_clipping(w, t)
    if t.scale == "e8m0":
        assert ratio[0, 0] == 2.0 and ratio[1, 0] <= 1.0
        grown = fp.quantize(w, t, None, ratio)
        assert fp.stored_scale(grown)[0, 0] == 2 * fp.stored_scale(fp.quantize(w, t))[0, 0]
        assert (fp.dequantize(grown)[0] - w[0]).pow(2).sum() < (fp.fake_quant(w, t)[0] - w[0]).pow(2).sum()
    else:
        assert (ratio <= t.clip_max).all()
