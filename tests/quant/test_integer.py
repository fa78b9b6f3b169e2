import pytest
import torch

from signround.quant.integer import dequantize_weight, fake_quant, from_groups, num_groups, qparams, quantize_groups, quantize_weight, to_groups

GROUPS = [-1, 32, 64, 128, 48]  # 48 leaves a partial last group on 96/160-wide rows


def _weight(out=24, inp=160, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", GROUPS)
def test_round_trip_error_is_bounded_by_one_step(bits, sym, group):
    w = _weight()
    qw = quantize_weight(w, bits, group, sym)
    assert qw.codes.max() <= 2**bits - 1
    assert qw.scale.shape == (24, num_groups(160, group))
    dq = dequantize_weight(qw)
    step = qw.scale.float().abs().repeat_interleave(qw.group_size, dim=1)[:, :160]
    err = (w - dq).abs()
    # interior weights are off by at most half a step; only the clipped extreme of a group may be off by one step
    assert torch.all(err <= step * (1 + 1e-3) + 1e-7)
    assert (err <= step * 0.5 * (1 + 1e-3) + 1e-7).float().mean() > 0.95


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", GROUPS)
def test_error_falls_with_every_extra_bit(sym, group):
    w = _weight(seed=1)
    errors = [(w - dequantize_weight(quantize_weight(w, b, group, sym))).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 1000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_matches_stored_codes(dtype):
    w = _weight(seed=2).to(dtype)
    fq = fake_quant(w.float(), 4, 32, True)
    qw = quantize_weight(w, 4, 32, True)
    dq = dequantize_weight(qw)
    # the stored scale is fp16-rounded, which may flip a weight sitting on a rounding boundary by one step
    step = qw.scale.float().abs().repeat_interleave(32, dim=1)
    diff = (fq - dq).abs()
    assert (diff > step * 0.01 + 1e-6).float().mean() < 0.01
    assert torch.all(diff <= step * 1.01 + 1e-6)


def test_offsets_and_clipping_change_rounding_and_range():
    w = _weight(seed=3)
    plain = quantize_weight(w, 4, 32, False)
    offset = torch.full_like(w, 0.49)
    shifted = quantize_weight(w, 4, 32, False, offset=offset)
    assert (shifted.codes.int() >= plain.codes.int()).all() and (shifted.codes != plain.codes).any()
    clipped = quantize_weight(w, 4, 32, False, min_scale=torch.full((24, 5), 0.5), max_scale=torch.full((24, 5), 0.5))
    assert (clipped.scale.float() < plain.scale.float()).all()


def test_fake_quant_passes_gradients_to_offsets_and_scales():
    w = _weight(seed=4)
    v = torch.zeros_like(w, requires_grad=True)
    lo = torch.ones(24, 5, requires_grad=True)
    hi = torch.ones(24, 5, requires_grad=True)
    (fake_quant(w, 3, 32, False, v, lo, hi) - w * 1.1).pow(2).sum().backward()
    assert v.grad.abs().sum() > 0 and lo.grad.abs().sum() > 0 and hi.grad.abs().sum() > 0


def _autograd_fake_quant(w, bits, group_size, sym, offset, lo, hi):
    """The plain composition autograd differentiates: the reference for the hand-written backward."""
    wg = to_groups(w, group_size)
    scale, zero = qparams(wg, bits, sym, lo, hi, ste=True)
    q = quantize_groups(wg, scale, zero, bits, to_groups(offset, group_size), ste=True)
    return from_groups((q - zero) * scale, w.shape[1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 48, -1])  # 48 leaves a partial last group of 160 inputs
def test_fake_quant_gradients_equal_autograd(bits, sym, group_size):
    """Forward bit-equal and gradients equal to autograd's on the unfused ops, clipped groups included."""
    w = _weight(seed=bits)
    results = []
    for fn in (fake_quant, _autograd_fake_quant):
        gen = torch.Generator().manual_seed(7)
        groups = num_groups(w.shape[1], group_size)
        offset = (torch.rand(w.shape, generator=gen) - 0.5).requires_grad_()
        lo = (0.6 + 0.4 * torch.rand(w.shape[0], groups, generator=gen)).requires_grad_()
        hi = (0.6 + 0.4 * torch.rand(w.shape[0], groups, generator=gen)).requires_grad_()
        weight = w.clone().requires_grad_()
        target = torch.randn(w.shape, generator=gen)
        out = fn(weight, bits, group_size, sym, offset, lo, hi)
        (out * target).sum().backward()
        results.append((out.detach(), weight.grad, offset.grad, lo.grad, hi.grad))
    fused, reference = results
    assert torch.equal(fused[0], reference[0])
    for got, want in zip(fused[1:], reference[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_all_zero_group_stays_finite():
    w = torch.zeros(4, 64)
    for sym in (True, False):
        dq = dequantize_weight(quantize_weight(w, 4, 32, sym))
        assert torch.isfinite(dq).all() and dq.abs().max() == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_clipping_search_never_does_worse_than_no_clipping(bits, sym):
    from signround.quant.integer import search_clipping

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[:, 3] *= 8  # an outlier channel widens every group's range
    importance = torch.rand(64) + 0.1
    ratio = search_clipping(w, bits, 32, sym, importance)
    assert ratio.shape == (16, 2) and ((ratio > 0.69) & (ratio <= 1.0)).all()

    def weighted_error(r):
        q = fake_quant(w, bits, 32, sym, None, r, r)
        return (((q - w) ** 2) * importance).reshape(16, 2, 32).sum(-1)

    searched, unclipped = weighted_error(ratio), weighted_error(torch.ones(16, 2))
    assert (searched <= unclipped + 1e-6).all()
    assert searched.sum() < 0.97 * unclipped.sum(), "some clipping must pay off"


@pytest.mark.parametrize("bits,group_size", [(2, 64), (3, 32), (4, 128), (8, -1)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_clipping_search_picks_the_grid_minimum(bits, group_size, sym, weighted):
    """The in-place search finds, per group, the ratio whose plain quantize-dequantize error is least."""
    from signround.quant.integer import search_clipping

    torch.manual_seed(1)
    w = torch.randn(24, 200)  # a partial last group where group_size does not divide 200
    w[:, 5] *= 6
    importance = torch.rand(200) + 0.1 if weighted else None
    ratios = torch.linspace(1.0, 0.7, 31)
    chosen = search_clipping(w, bits, group_size, sym, importance, ratios)

    def error(r):  # (out, groups) weighted error of round-to-nearest at per-group ratios r
        q = fake_quant(w, bits, group_size, sym, None, r, r)
        return to_groups(((q - w) ** 2) * (1 if importance is None else importance), group_size).sum(-1)

    grid = torch.stack([error(torch.full(chosen.shape, float(r))) for r in ratios])
    assert torch.allclose(error(chosen), grid.min(0).values, rtol=1e-5, atol=1e-7)
