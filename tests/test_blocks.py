import pytest
import torch
from tiny_models import CONFIGS, calib_ids, make

from signround.blocks import UnsupportedModelError, capture_block_inputs, find_blocks, find_linears, run_block
from signround.cache import MemoryCache

ARCHS = sorted(CONFIGS)


def _reference_block_io(model, blocks, ids):
    """Each block's real outputs in an ordinary forward pass, recorded with temporary hooks."""
    outs = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs.setdefault(i, []).append(o[0] if isinstance(o, tuple) else o))
               for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for row in ids:
                model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(outs[i]) for i in range(len(blocks))]


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_calls_reproduce_every_block(arch):
    model = make(arch)
    _, blocks = find_blocks(model)
    ids = calib_ids(4, 24)
    reference = _reference_block_io(model, blocks, ids)
    hidden, calls = capture_block_inputs(model, blocks, ids, "cpu")
    assert hidden.shape[:2] == (4, 24) and len(calls) == len(blocks)
    cache = MemoryCache(hidden)
    for i, block in enumerate(blocks):  # batch 3: kwargs captured at batch 1 must broadcast
        cache = run_block(block, cache, calls[i], batch_size=3, device="cpu", amp_dtype=None, out=MemoryCache.empty(hidden.shape, torch.float32, "cpu"))
        torch.testing.assert_close(cache.tensor, reference[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_capture_leaves_model_unchanged_and_runs_no_block(arch):
    model = make(arch)
    _, blocks = find_blocks(model)
    before = list(blocks)
    ids = calib_ids(2, 16)
    with torch.no_grad():
        logits = model(ids).logits
    for block in blocks[1:]:
        block.to("meta")  # later blocks need not even hold weights
    calls = []
    handle = blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    capture_block_inputs(model, blocks, ids, "cpu")
    handle.remove()
    assert calls == [] and list(blocks) == before
    model2 = make(arch)
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, logits)


def test_find_blocks_and_linears_on_llama():
    model = make("llama")
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 2
    assert set(find_linears(blocks[0])) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}


def test_gpt2_conv1d_counts_as_linear():
    name, blocks = find_blocks(make("gpt2"))
    assert name == "transformer.h"
    assert set(find_linears(blocks[0])) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


def test_model_without_block_list_is_refused():
    with pytest.raises(UnsupportedModelError, match="decoder blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.Linear(4, 4)))
