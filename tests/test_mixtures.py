"""llama.cpp's K mixtures: the per-layer types follow llama-quant.cpp's rules, the config carries them
through save/load, and a GGUF export carries the types and the mixture's file type."""

import pytest
import torch
import transformers as tf
from gguf import GGUFReader, LlamaFileType
from tiny_models import make

import signround
from signround.config import ConfigError, QuantConfig, WeightScheme
from signround.export import export
from signround.export.gguf import FILE_NAME
from signround.mixtures import MIXTURES, layer_role, use_more_bits


def test_use_more_bits_picks_llama_cpps_blocks():
    # n=32: the first and last 4, then every third from block 6 (llama.cpp: (i - n/8) % 3 == 2)
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize("name, role", [
    ("model.layers.3.self_attn.v_proj", "attn_v"), ("model.layers.3.mlp.down_proj", "ffn_down"),
    ("model.layers.3.self_attn.o_proj", "attn_output"), ("transformer.h.0.attn.c_attn", "attn_qkv"),
    ("transformer.h.0.mlp.c_proj", "ffn_down"), ("transformer.h.0.attn.c_proj", "attn_output"),
    ("model.decoder.layers.0.fc2", "ffn_down"), ("gpt_neox.layers.0.attention.query_key_value", "attn_qkv"),
    ("model.layers.3.self_attn.q_proj", None), ("model.layers.3.mlp.gate_proj", None),
])
def test_layer_roles_across_architectures(name, role):
    assert layer_role(name) == role


def test_q4_k_m_gives_v_and_down_q6_k_in_the_chosen_blocks_and_q4_k_elsewhere():
    config = QuantConfig(scheme="q4_k_m")
    assert config.mixture == "Q4_K_M" and config.scheme == WeightScheme.preset("Q4_K")
    q6, q4 = WeightScheme.preset("Q6_K"), WeightScheme.preset("Q4_K")
    for i in range(30):
        more = q6 if use_more_bits(i, 30) else q4
        assert config.scheme_for(f"model.layers.{i}.self_attn.v_proj", (i, 30)) == more
        assert config.scheme_for(f"model.layers.{i}.mlp.down_proj", (i, 30)) == more
        assert config.scheme_for(f"model.layers.{i}.self_attn.q_proj", (i, 30)) == q4
    assert config.scheme_for("lm_head") == q6


def test_q3_k_m_rules_and_overrides_win():
    config = QuantConfig(scheme="Q3_K_M", layer_overrides={r"layers\.0\.self_attn\.v_proj": "Q6_K"})

    def kind(name, i):
        return config.scheme_for(f"model.layers.{i}.{name}", (i, 32)).name()

    assert [kind("self_attn.v_proj", i) for i in range(4)] == ["Q6_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [kind("mlp.down_proj", i) for i in (0, 1, 2, 31)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert kind("self_attn.o_proj", 5) == "Q4_K" and kind("mlp.up_proj", 5) == "Q3_K"


def test_mixture_config_round_trips_and_bad_ones_are_refused():
    config = QuantConfig(scheme="Q5_K_M")
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown mixture 'Q9_K_M'"):
        QuantConfig(mixture="Q9_K_M")
    with pytest.raises(ConfigError, match="mixture Q4_K_M is built on Q4_K, not W4A16"):
        QuantConfig(mixture="Q4_K_M")
    with pytest.raises(ConfigError, match="scheme Q4_K_S and mixture Q4_K_M disagree"):
        QuantConfig(scheme="Q4_K_S", mixture="Q4_K_M")
    assert QuantConfig(scheme="Q4_K_M", mixture="q4_k_m").mixture == "Q4_K_M"
    assert set(MIXTURES) == {"Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M"}


def test_q4_k_m_model_exports_its_types_and_loads_in_transformers(tmp_path, bpe_tokenizer):
    """16 blocks: v/down in blocks 0, 1, 4, 7, 10, 13, 14, 15 as Q6_K, the rest Q4_K; reloaded from our own
    format with the same weights, and read by transformers' GGUF loader with the same logits."""
    model = make("llama", vocab_size=len(bpe_tokenizer), hidden_size=256, intermediate_size=512, head_dim=64, num_hidden_layers=16)
    report = signround.quantize(model, QuantConfig(scheme="Q4_K_M", method="rtn"))
    more = [i for i in range(16) if use_more_bits(i, 16)]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]
    for i in range(16):
        assert report.quantized[f"model.layers.{i}.mlp.down_proj"].name() == ("Q6_K" if i in more else "Q4_K")
        assert report.quantized[f"model.layers.{i}.self_attn.q_proj"].name() == "Q4_K"

    signround.save(model, tmp_path / "own", bpe_tokenizer)
    reloaded = signround.load(tmp_path / "own")
    assert reloaded.model.layers[4].self_attn.v_proj.scheme.name() == "Q6_K"
    assert torch.equal(reloaded.model.layers[4].mlp.down_proj.dequantized_weight(), model.model.layers[4].mlp.down_proj.dequantized_weight())

    export(model, bpe_tokenizer, tmp_path / "out", "gguf")
    reader = GGUFReader(tmp_path / "out" / FILE_NAME)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert [kinds[f"blk.{i}.attn_v.weight"] for i in (0, 2, 4)] == ["Q6_K", "Q4_K", "Q6_K"]
    assert kinds["blk.3.ffn_gate.weight"] == "Q4_K"
    assert int(reader.fields["general.file_type"].parts[-1][0]) == LlamaFileType.MOSTLY_Q4_K_M
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME).eval()
    ids = torch.randint(0, len(bpe_tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits.float(), model(ids).logits.float(), atol=3e-3, rtol=3e-3)


def test_the_fallback_warning_counts_layers_and_names_a_few():
    model = make("llama", num_hidden_layers=3)  # 64- and 128-wide rows: no whole 256-weight super-block anywhere
    with pytest.warns(UserWarning, match=r"^21 layers hold no whole number .* e\.g\. model\.layers\.0\.self_attn\.q_proj, [^,]+, [^,]+, \.\.\.$"):
        report = signround.quantize(model, QuantConfig(scheme="Q4_K", method="rtn"), signround.RunConfig(progress=False))
    assert len(report.fallbacks) == 21
