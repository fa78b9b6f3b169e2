"""SmoothQuant for layers with quantized inputs: found by running the block, exact in float, and better after int8."""

import pytest
import torch
from tiny_models import calib_ids, make

import signround
from signround import QuantConfig
from signround.blocks import block_output, capture_block_inputs, find_blocks
from signround.smoothing import feeding_norms, smooth_block


def block_and_run(arch: str, outliers: bool = True):
    model = make(arch)
    ids = calib_ids(4, 16)
    _, blocks = find_blocks(model)
    if outliers:  # a few hidden channels 30x the others, as LLMs' activations have
        with torch.no_grad():
            model.get_input_embeddings().weight[:, :3] *= 30
    inputs, calls = capture_block_inputs(model, blocks, ids, "cpu")
    block, call = blocks[0], calls[0]
    return block, lambda: block_output(block(inputs, *call.args, **call.kwargs))


@pytest.mark.parametrize("arch, norms", [("llama", {"input_layernorm": ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                                                   "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}),
                                        ("gemma3", {"input_layernorm": ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                                                    "pre_feedforward_layernorm": ["mlp.gate_proj", "mlp.up_proj"]})])
def test_the_norms_feeding_each_layer_are_found_by_running_the_block(arch, norms):
    block, run = block_and_run(arch)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    fed, amax = feeding_norms(block, linears, run)
    assert fed == norms and set(amax) == set(linears)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma's norms scale by 1 + weight
def test_smoothing_leaves_the_block_output_unchanged_and_tames_the_outlier_channels(arch):
    block, run = block_and_run(arch)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        before = run().clone()
    _, amax_before = feeding_norms(block, linears, run)
    done = smooth_block(block, linears, run, alpha=0.5)
    assert len(done) == 2
    with torch.no_grad():
        torch.testing.assert_close(run(), before, rtol=1e-4, atol=1e-5 * before.abs().max().item())
    _, amax_after = feeding_norms(block, linears, run)
    def spread(amax):  # the largest input channel against a typical one
        return (amax["self_attn.q_proj"].max() / amax["self_attn.q_proj"].median()).item()

    assert spread(amax_after) < spread(amax_before) / 3


def test_smoothing_helps_w8a8_where_activations_have_outlier_channels():
    ids = calib_ids(16, 32)
    errors = {}
    for smooth in (None, 0.5):
        reference, model = make("llama"), make("llama")
        for m in (reference, model):
            with torch.no_grad():
                m.get_input_embeddings().weight[:, :3] *= 30
        with torch.no_grad():
            target = reference(ids).logits
        signround.quantize(model, QuantConfig(scheme="W8A8", iters=20, nsamples=16, seqlen=32, batch_size=4, smooth=smooth), calibration=ids)
        with torch.no_grad():
            errors[smooth] = (model(ids).logits - target).pow(2).mean().item()
    assert errors[0.5] < errors[None], errors


def test_smoothing_is_refused_where_it_cannot_apply():
    with pytest.raises(signround.ConfigError, match="smooth needs calibration data, which method rtn does not take"):
        QuantConfig(scheme="W8A8", method="rtn", smooth=0.5)
    with pytest.raises(signround.ConfigError, match="smooth=0.5 smooths the inputs of layers that quantize them, and this scheme quantizes none"):
        signround.quantize(make("llama"), QuantConfig(scheme="W4A16G32", smooth=0.5), calibration=calib_ids(4, 16))
    with pytest.raises(signround.ConfigError, match="smooth=2 must be SmoothQuant's alpha, between 0 and 1"):
        QuantConfig(scheme="W8A8", smooth=2)


def test_a_norm_that_also_feeds_a_layer_left_out_is_not_smoothed():
    """q_proj kept out (say, kept 16-bit): smoothing input_layernorm would hand it inputs divided by s."""
    block, run = block_and_run("llama")
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n != "self_attn.q_proj"}
    fed, _ = feeding_norms(block, linears, run)
    assert "input_layernorm" not in fed and "post_attention_layernorm" in fed
    with torch.no_grad():
        before = run().clone()
    assert smooth_block(block, linears, run, alpha=0.5) == ["post_attention_layernorm -> mlp.gate_proj, mlp.up_proj"]
    with torch.no_grad():
        torch.testing.assert_close(run(), before, rtol=1e-4, atol=1e-5 * before.abs().max().item())


def test_a_norm_whose_output_is_also_the_residual_is_put_back():
    """OPT-350m-style post-LN and the like: a norm output used outside the layers changes the block's output
    when smoothed, so smoothing is undone."""
    block, run = block_and_run("llama")
    norm = block.post_attention_layernorm
    handle = block.mlp.register_forward_hook(lambda module, args, out: out + args[0])  # the norm's output joins the residual
    try:
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        kept = norm.weight.detach().clone()
        assert smooth_block(block, linears, run, alpha=0.5) == []
        assert torch.equal(norm.weight, kept)
    finally:
        handle.remove()
