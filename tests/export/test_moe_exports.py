"""Mixture-of-experts exports: stacked experts written per expert under the names each consumer reads, loaded
by that consumer (transformers with auto-round or compressed-tensors) with our logits; routers stay 16-bit."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tiny_models import CONSUMER_TOL, calib_ids, make_moe

import signround
from signround.export import FormatError, check_formats, export

# auto-round's loader re-registers transformers' conversion rules of MoE model types for the whole process (dropping
# the expert merges compressed-tensors relies on), so each consumer loads in a process of its own, as a user's would
CONSUMER = """
import sys, torch, transformers as tf
folder, fmt, work = sys.argv[1:]
kwargs = {"quantization_config": tf.AutoRoundConfig()} if fmt == "gptq" else {}
model = tf.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
with torch.no_grad():
    torch.save(model(torch.load(work + "/ids.pt")).logits.float(), work + "/logits.pt")
"""
# DeepSeek-V3's tiny latent-attention projections are narrower than a group: kept 16-bit, the experts are what is tested
OVERRIDES = {"deepseek_v3": {"kv_a_proj_with_mqa|kv_b_proj": "fp16"}}
# where each format stores expert 3's down projection of block 1, and the tensor that holds its codes
STORED = {"auto_round": "experts.3.down_proj.qweight", "gptq": "experts.3.down_proj.qweight",
          "compressed-tensors": "experts.3.down_proj.weight_packed"}


def consumer_logits(folder, fmt, ids, work):
    torch.save(ids, work / "ids.pt")
    subprocess.run([sys.executable, "-c", CONSUMER, str(folder), fmt, str(work)], check=True, capture_output=True)
    return torch.load(work / "logits.pt")


def stored_names(folder) -> set[str]:
    names = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.parametrize("fmt", list(STORED))
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_experts_are_written_per_expert_and_load_with_our_logits(tmp_path, arch, fmt):
    model = make_moe(arch)
    signround.quantize(model, signround.QuantConfig(scheme="W4A16G32", iters=3, nsamples=4, seqlen=16, layer_overrides=OVERRIDES.get(arch, {})),
                       calibration=calib_ids(4, 16))
    export(model, None, tmp_path / "out", fmt)
    names = stored_names(tmp_path / "out")
    down = STORED[fmt].replace("down_proj", "w2") if (arch, fmt) == ("mixtral", "compressed-tensors") else STORED[fmt]
    assert f"model.layers.1.mlp.{down}" in names, sorted(n for n in names if "layers.1.mlp" in n)[:8]
    assert "model.layers.1.mlp.gate.weight" in names  # the router, 16-bit
    config = json.dumps(json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"])
    assert "layers.1.mlp.gate" in config.replace("\\\\", "")  # and said so, or the consumer would build it packed
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits.float()
    torch.testing.assert_close(consumer_logits(tmp_path / "out", fmt, ids, tmp_path), ours, **CONSUMER_TOL)


@pytest.mark.parametrize("fmt", list(STORED))
def test_gpt_oss_experts_are_refused_before_tuning(fmt):
    with pytest.raises(FormatError, match="gpt-oss"):
        check_formats([fmt], make_moe("gpt_oss"), signround.QuantConfig(scheme="W4A16G32"))


def test_compressed_tensors_takes_symmetric_integer_experts_only():
    model = make_moe("qwen3_moe")
    with pytest.raises(FormatError, match=r"experts\.0\.gate_proj as W2A16G32: .*symmetric integer"):
        check_formats(["compressed-tensors"], model, signround.QuantConfig(scheme="W2A16G32"))
    check_formats(["auto_round"], model, signround.QuantConfig(scheme="W2A16G32"))
    check_formats(["compressed-tensors"], model, signround.QuantConfig(scheme="W2A16G32", layer_overrides={"experts": "W4A16G32"}))


@pytest.mark.parametrize("fmt", list(STORED))
def test_experts_kept_16_bit_are_refused_where_the_consumer_would_build_them_packed(fmt):
    with pytest.raises(FormatError, match="kept 16-bit"):
        check_formats([fmt], make_moe("qwen3_moe"), signround.QuantConfig(scheme="W4A16G32", layer_overrides={"experts": "fp16"}))
