"""Sparse upcycling (signround/upcycle.py): a dense LLaMA made a Mixtral of perturbed expert copies that
computes nearly what the dense model computes, and quantizes as any MoE does."""

import pytest
import torch
from tiny_models import calib_ids, make

import signround
from signround.config import ConfigError
from signround.upcycle import upcycle

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_the_upcycled_model_computes_what_the_dense_one_does(tied):
    dense = make("llama", tie_word_embeddings=tied)
    moe = upcycle(dense, experts=4, top_k=2, noise=0.01)
    experts = moe.model.layers[1].mlp.experts
    assert type(moe).__name__ == "MixtralForCausalLM" and experts.gate_up_proj.shape[0] == 4
    assert not torch.equal(experts.down_proj[0], experts.down_proj[1])  # the experts differ
    with torch.no_grad():
        want, got = dense(IDS).logits, moe(IDS).logits
    assert (got - want).abs().max() < 0.01 * want.abs().max()
    assert (moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():  # and the routing matters: without the noise the experts are copies and the output is the dense one
        torch.testing.assert_close(upcycle(dense, experts=4, noise=0.0)(IDS).logits, want, rtol=1e-4, atol=1e-5)


def test_every_expert_of_the_upcycled_model_is_quantized():
    moe = upcycle(make("llama"), experts=4)
    report = signround.quantize(moe, signround.QuantConfig(scheme="W4A16G32", method="rtn"), calibration=calib_ids(4, 16))
    assert sum(".experts." in name for name in report.quantized) == 2 * 4 * 3
    assert not [name for name in report.kept_16bit if ".experts." in name]


@pytest.mark.parametrize("arch, kwargs, message", [("qwen2", {}, "LLaMA or Mistral"), ("llama", {"top_k": 5}, "top_k=5")])
def test_what_cannot_be_upcycled_is_refused(arch, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        upcycle(make(arch), experts=4, **kwargs)


def test_the_upcycle_command_saves_a_model_that_quantizes(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from signround.cli import main

    assert main(["upcycle", str(tiny_model_dir), "-o", str(tmp_path / "moe"), "--experts", "4"]) == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    report = signround.run(str(tmp_path / "moe"), tmp_path / "q", signround.QuantConfig(scheme="W4A16G32", method="rtn"),
                           signround.RunConfig(progress=False), calibration=calib_ids(4, 16))
    assert sum(".experts." in name for name in report.quantized) == 2 * 4 * 3
    assert main(["upcycle", str(tiny_model_dir), "-o", str(tmp_path / "bad"), "--experts", "4", "--top-k", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "signround: error: top_k=5 must be between 1 and experts=4"
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
