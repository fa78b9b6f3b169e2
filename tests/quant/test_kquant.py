import pytest
import torch

from signround.quant.integer import dequantize_weight, from_groups, quantize_weight, round_ste, to_groups
from signround.quant.kquant import K_TYPES, SUPER_BLOCK, dequantize_k, fake_quant_k, k_qparams, quantize_k

NAMES = list(K_TYPES)


def _weight(seed=0, out=8, inp=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[1, :SUPER_BLOCK] = 0                          # an all-zero super-block
    w[2] *= torch.linspace(0.01, 3, inp)            # group ranges spread over 300x within a row
    w[3] = w[3].abs() + 0.01                        # only positive weights: the positive side dominates
    return w


def _tunables(w, ktype, seed=1):
    g = torch.Generator().manual_seed(seed)
    groups = w.shape[1] // ktype.group_size
    offset = torch.rand(w.shape, generator=g) - 0.5
    lo, hi = (0.7 + 0.3 * torch.rand(w.shape[0], groups, generator=g) for _ in range(2))
    return offset, lo, hi


@pytest.mark.parametrize("name", NAMES)
def test_stored_parts_are_in_range_and_decode_to_the_fake_quantized_weight(name):
    t = K_TYPES[name]
    w = _weight()
    offset, lo, hi = _tunables(w, t)
    kq = quantize_k(w, t, offset, lo, hi)
    assert kq.codes.max() <= 2**t.bits - 1 and kq.d.dtype == torch.float16
    if t.sym:
        assert -(2 ** (t.scale_bits - 1)) <= kq.sc.min() and kq.sc.max() <= 2 ** (t.scale_bits - 1) - 1 and kq.m is None
    else:
        assert 0 <= kq.sc.min() and kq.sc.max() <= 2**t.scale_bits - 1 and 0 <= kq.m.min() and kq.m.max() <= 2**t.scale_bits - 1
    torch.testing.assert_close(fake_quant_k(w, t, offset, lo, hi), dequantize_k(kq), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_quantizing_the_scales_costs_little_against_plain_integer_groups(name):
    """Round to nearest with 4-8 bit scales per group against fp16 scales and integer zero points."""
    t = K_TYPES[name]
    w = _weight(seed=3)
    k_err = (dequantize_k(quantize_k(w, t)) - w).pow(2).mean()
    plain_err = (dequantize_weight(quantize_weight(w, t.bits, t.group_size, t.sym)) - w).pow(2).mean()
    assert k_err < plain_err * 1.1, (k_err, plain_err)


def test_error_falls_from_q2_k_to_q6_k():
    w = _weight(seed=5)
    errors = [(dequantize_k(quantize_k(w, K_TYPES[n])) - w).pow(2).mean().item() for n in NAMES]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_bits_per_weight_are_llama_cpp_block_sizes():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, t in K_TYPES.items():
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert block == SUPER_BLOCK and t.bits_per_weight == nbytes * 8 / block


def _autograd_fake_quant_k(w, t, offset, lo, hi):
    """The plain composition autograd differentiates: the reference for the hand-written backward."""
    wg = to_groups(w, t.group_size)
    scale, zero, _ = k_qparams(wg, t, lo, hi, ste=True)
    x = wg / scale + to_groups(offset, t.group_size)
    q = (round_ste(x + zero) if not t.sym else round_ste(x) + zero).clamp(0, 2**t.bits - 1)
    return from_groups((q - zero) * scale, w.shape[1])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_equal_autograd(name):
    """The fractional zero points of the asymmetric types go through the same straight-through backward."""
    t = K_TYPES[name]
    w = _weight(seed=7)
    results = []
    for fn in (fake_quant_k, _autograd_fake_quant_k):
        offset, lo, hi = (x.clone().requires_grad_() for x in _tunables(w, t, seed=8))
        weight = w.clone().requires_grad_()
        out = fn(weight, t, offset, lo, hi)
        (out * torch.randn(w.shape, generator=torch.Generator().manual_seed(9))).sum().backward()
        results.append((out.detach(), weight.grad, offset.grad, lo.grad, hi.grad))
    fused, reference = results
    torch.testing.assert_close(fused[0], reference[0], rtol=0, atol=1e-7)
    assert lo.grad.abs().sum() > 0 and hi.grad.abs().sum() > 0 and offset.grad.abs().sum() > 0
    for got, want in zip(fused[1:], reference[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rows_must_hold_whole_super_blocks():
    with pytest.raises(ValueError, match="Q4_K needs rows of whole 256-weight super-blocks, not 576"):
        quantize_k(torch.randn(4, 576), K_TYPES["Q4_K"])
