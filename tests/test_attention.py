"""The tuning step's CPU causal attention: the same output and gradients as torch's sdpa, and plugged
into transformers' models only within `tuning_attention`, falling back to sdpa wherever it cannot serve."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from signround.attention import NAME, _attention_forward, causal_attention, causal_attention_backward, tuning_attention
from tests.tiny_models import calib_ids, make


def _qkv(batch, heads, kv_heads, seq, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, seq, dim, generator=g, requires_grad=True) for n in (heads, kv_heads, kv_heads)]


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def _output_and_grads(fn, q, k, v, upstream):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(upstream)
    return [out.detach()] + [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("seq", [7, 128, 300])  # one short chunk, exactly one, two and a partial one
def test_causal_attention_matches_sdpa(heads, kv_heads, seq):
    q, k, v = _qkv(2, heads, kv_heads, seq, 16)
    upstream = torch.randn(2, heads, seq, 16, generator=torch.Generator().manual_seed(1))
    scale = 0.3  # not the default 1/sqrt(dim): the scale must reach the backward too
    expected = _output_and_grads(lambda *t: _sdpa(*t, scale), q, k, v, upstream)
    got = _output_and_grads(lambda *t: causal_attention(*t, scale), q, k, v, upstream)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_the_backward_does_not_depend_on_the_chunk(chunk):
    """Chunks of any size, dividing the sequence or not, give the reference gradients (float64, exact-ish)."""
    q, k, v = (t.detach().double() for t in _qkv(1, 4, 2, 37, 8, seed=2))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    scale = 8 ** -0.5
    out = _sdpa(q, k, v, scale)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * scale
    lse = scores.masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), float("-inf")).logsumexp(-1)
    upstream = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), upstream)
    got = causal_attention_backward(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), upstream, scale, chunk)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _uses_ours(t) -> bool:
    """Whether the autograd graph behind `t` holds this module's attention."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "_CausalAttention" in type(fn).__name__:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def _call(module, q, k, v, mask=None, **kwargs):
    return _attention_forward(module, q, k, v, mask, scaling=0.25, **kwargs)[0]


def test_calls_it_cannot_serve_go_to_sdpa():
    """A mask, no gradient, bf16, a sliding window or a non-causal module: transformers' sdpa, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = 2  # what transformers' attention modules carry, for its sdpa's GQA
    q, k, v = _qkv(1, 4, 2, 20, 8)
    mask = torch.zeros(1, 1, 20, 20).masked_fill(~torch.ones(20, 20, dtype=torch.bool).tril(), float("-inf"))
    ours = _call(module, q, k, v)
    assert _uses_ours(ours)
    sdpa = lambda *a, **kw: sdpa_attention_forward(module, *a, scaling=0.25, **kw)[0]  # noqa: E731
    for case, got, expected in [
        ("mask", _call(module, q, k, v, mask), sdpa(q, k, v, mask)),
        ("sliding window", _call(module, q, k, v, sliding_window=4), sdpa(q, k, v, None, sliding_window=4)),
    ]:
        assert not _uses_ours(got), case
        torch.testing.assert_close(got, expected, msg=case)
    with torch.no_grad():
        torch.testing.assert_close(_call(module, q, k, v), sdpa(q, k, v, None))
    bf16 = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    assert not _uses_ours(_call(module, *bf16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Gemma-3 under bf16 autocast: normed q, k in fp32, v in bf16
        assert not _uses_ours(_call(module, q, k, bf16[2]))
    torch.testing.assert_close(ours, sdpa(q, k, v, None))
    module.is_causal = False  # an encoder's attention
    assert not _uses_ours(_call(module, q, k, v))


def _attention_configs(model):
    return {m.config._attn_implementation for m in model.modules() if getattr(m, "config", None) is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_a_model_under_tuning_attention_gives_the_same_logits_and_gradients(arch):
    """Through real transformers attention modules (mistral: a sliding-window mask, left to sdpa);
    the configs are switched inside and restored after."""
    model = make(arch)
    ids = calib_ids(2, 48)
    results = []
    for switched in (False, True):
        model.zero_grad()
        with tuning_attention(model, torch.device("cpu")) if switched else contextlib.nullcontext():
            if switched:
                assert _attention_configs(model) == {NAME}
            logits = model(ids).logits
            logits.square().mean().backward()
        if switched:
            assert _uses_ours(logits) == (arch != "mistral")
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert _attention_configs(model) == {"sdpa"}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_tuning_attention_restores_the_config_on_error_and_leaves_other_devices_and_implementations_alone():
    model = make("llama")
    with pytest.raises(RuntimeError, match="inside"):
        with tuning_attention(model, torch.device("cpu")):
            raise RuntimeError("inside")
    assert _attention_configs(model) == {"sdpa"}
    with tuning_attention(model, torch.device("cuda")):  # the GPU's own kernels stay
        assert _attention_configs(model) == {"sdpa"}
    model.config._attn_implementation = "eager"
    with tuning_attention(model, torch.device("cpu")):
        assert _attention_configs(model) == {"eager"}
