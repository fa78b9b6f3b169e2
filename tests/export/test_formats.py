"""Each export format, loaded by its real consumer (transformers with auto-round or compressed-tensors),
gives the logits of signround's own packed model within fp16 tolerance."""

import dataclasses
import json

import pytest
import torch
import transformers as tf
from tiny_models import CONSUMER_TOL, calib_ids, make

import signround
from signround.cli import main
from signround.export import FormatError, check_formats, export


def consumer_load(folder, fmt: str, asym: bool = False):
    """The runtime's own loader: transformers plus the format's package, never signround's code."""
    kwargs = {}
    if fmt in ("gptq", "awq"):  # transformers' own GPTQ/AWQ paths need GPTQModel (CUDA builds); auto-round's loader reads both on CPU
        kwargs["quantization_config"] = tf.AutoRoundConfig()
    if fmt == "compressed-tensors" and asym:  # transformers cannot place packed zero points in its compressed layout
        kwargs["quantization_config"] = tf.CompressedTensorsConfig(dequantize=True)
    return tf.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def quantized(scheme: str, method: str = "rtn", wide: bool = False, **config):
    """`wide`: hidden 128 and intermediate 256, whole 128-feature groups (FP8_BLOCK's inputs)."""
    model = make("llama", vocab_size=256, **(dict(hidden_size=128, intermediate_size=256, head_dim=32) if wide else {}))
    signround.quantize(model, signround.QuantConfig(scheme=scheme, method=method, iters=3, nsamples=4, seqlen=16, **config),
                       calibration=calib_ids(4, 16))
    return model


def assert_same_logits(ours, theirs):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours(ids).logits, theirs(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), **CONSUMER_TOL)


@pytest.mark.parametrize("fmt, scheme", [
    ("auto_round", "W4A16G32"), ("auto_round", "W3A16G32"), ("auto_round", "W2A16G32"), ("auto_round", "W8A16G32"),
    ("gptq", "W4A16G32"), ("gptq", "W3A16G32"), ("gptq", "W8A16G32"),
    ("compressed-tensors", "W4A16G32"), ("compressed-tensors", "W3A16G32"), ("compressed-tensors", "W2A16G32"),
    ("compressed-tensors", "W4A16"),  # group wider than the 64-wide tiny layers: written per channel
    ("awq", "W4A16G32"), ("awq", "bits=4,group_size=16,sym=false"),
])
def test_consumer_reproduces_our_logits(tmp_path, fmt, scheme):
    model = quantized(signround.config.parse_scheme(scheme), method="signround")
    export(model, None, tmp_path / "out", fmt)
    assert_same_logits(model, consumer_load(tmp_path / "out", fmt, asym="W2" in scheme))


@pytest.mark.parametrize("fmt", ["auto_round", "gptq", "compressed-tensors"])
def test_mixed_schemes_and_16_bit_layers_survive(tmp_path, fmt):
    model = quantized("W4A16G32", layer_overrides={"down_proj": "W8A16G32", r"layers\.1\.self_attn\.q_proj": "fp16"})
    export(model, None, tmp_path / "out", fmt)
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    listed = json.dumps(qcfg).replace("\\\\", "")
    assert "layers.0.mlp.down_proj" in listed and "layers.1.self_attn.q_proj" in listed
    assert_same_logits(model, consumer_load(tmp_path / "out", fmt))


@pytest.mark.parametrize("fmt", ["auto_round", "gptq", "compressed-tensors"])
def test_a_quantized_lm_head_reaches_the_consumer(tmp_path, fmt):
    """A loader converts only the layers a config names beyond the blocks: a quantized lm_head must be listed."""
    model = quantized("W4A16G32", quantize_lm_head=True)
    assert isinstance(model.lm_head, signround.qlinear.QuantLinear)
    export(model, None, tmp_path / "out", fmt)
    assert_same_logits(model, consumer_load(tmp_path / "out", fmt))


def test_awq_refuses_a_quantized_lm_head_before_tuning():
    config = signround.QuantConfig(scheme=signround.config.parse_scheme("bits=4,group_size=32,sym=false"), quantize_lm_head=True)
    with pytest.raises(FormatError, match="format awq cannot hold lm_head quantized: its loader keeps it 16-bit; drop --quantize-lm-head"):
        check_formats(["awq"], make("llama", vocab_size=256), config)
    check_formats(["awq"], make("llama", vocab_size=256), dataclasses.replace(config, quantize_lm_head=False))


def test_awq_keeps_16_bit_layers_and_refuses_mixed_schemes(tmp_path):
    model = quantized("W4A16G32", layer_overrides={r"layers\.1\.self_attn\.q_proj": "fp16"})
    export(model, None, tmp_path / "out", "awq")
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qcfg["modules_to_not_convert"] == [r"^model\.layers\.1\.self_attn\.q_proj$"]
    assert_same_logits(model, consumer_load(tmp_path / "out", "awq"))
    mixed = quantized("W4A16G32", layer_overrides={"down_proj": "W4A16G16"})
    with pytest.raises(FormatError, match="one scheme for the whole model.*W4A16G16, W4A16G32"):
        export(mixed, None, tmp_path / "mixed", "awq")


def test_awq_packing_is_the_interleaved_nibble_order():
    from signround.export.awq import pack_awq, unpack_awq

    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 1)  # one row: columns 0..15
    words = pack_awq(codes)
    assert words.shape == (3, 2)
    assert [(int(words[0, 0]) >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    codes = torch.randint(0, 16, (40, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_awq(pack_awq(codes)), codes)


def test_export_from_a_saved_folder_through_the_cli(tmp_path, capsys, tiny_model_dir):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "-o", str(out), "--scheme", "W4A16G32", "--iters", "2", "--nsamples", "4",
                 "--seqlen", "32", "--batch-size", "2", "--dataset", str(text), "-q"]) == 0
    assert main(["export", str(out), "--format", "gptq", "-o", str(tmp_path / "gptq")]) == 0
    ours = signround.load(out)
    assert_same_logits_vocab(ours, consumer_load(tmp_path / "gptq", "gptq"), ours.config.vocab_size)
    assert (tmp_path / "gptq" / "tokenizer.json").is_file()


def assert_same_logits_vocab(ours, theirs, vocab):
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits.float(), ours(ids).logits.float(), **CONSUMER_TOL)


def test_several_formats_at_once_each_in_its_folder(tmp_path, capsys, tiny_model_dir):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "-o", str(out), "--scheme", "W4A16G32", "--method", "rtn",
                 "--format", "signround", "auto_round", "compressed-tensors"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["auto_round", "compressed-tensors", "signround"]
    ours = signround.load(out / "signround")
    for fmt in ("auto_round", "compressed-tensors"):
        assert_same_logits_vocab(ours, consumer_load(out / fmt, fmt), ours.config.vocab_size)


@pytest.mark.parametrize("fmt, scheme, hidden, reason", [
    ("gptq", "W4A16G64", 96, "96 % 64 != 0"),
    ("auto_round", "W4A16G64", 96, "96 % 64 != 0"),
    ("compressed-tensors", "W4A16G64", 96, "96 % 64 != 0"),
    ("gptq", "W4A16", 64, "64 < 128"),
    ("auto_round", "bits=5,group_size=32,sym=true", 64, "take 2, 3, 4 or 8 bits, not 5"),
    ("awq", "W3A16G32", 64, "4 bits only, not 3"),
    ("awq", "bits=4,group_size=-1,sym=true", 64, "per-channel .-1. cannot be written"),
])
def test_unrepresentable_scheme_is_refused_before_tuning(fmt, scheme, hidden, reason):
    model = make("llama", hidden_size=hidden)
    config = signround.QuantConfig(scheme=signround.config.parse_scheme(scheme))
    with pytest.raises(FormatError, match=reason.replace("(", r"\(")) as e:
        check_formats([fmt], model, config)
    assert f"{fmt} takes" in str(e.value)


def test_cli_refuses_a_format_before_loading_work(tmp_path, capsys, tiny_model_dir):
    code = main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--format", "gptq", "--bits", "5", "--group-size", "32"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "format gptq cannot hold" in err and "not 5" in err
    assert not (tmp_path / "o.signround-work").exists()


@pytest.mark.parametrize("scheme, stored", [("NVFP4A16", "nvfp4-pack-quantized"), ("MXFP4A16", "mxfp4-pack-quantized"),
                                            ("MXFP8A16", "mxfp8-quantized"), ("FP8A16", "float-quantized"),
                                            ("FP8_BLOCKA16", "float-quantized")])
def test_compressed_tensors_decompresses_float_formats_to_our_weights(tmp_path, scheme, stored):
    """compressed-tensors' own float formats take signround's codes and scales as they are: its decompressed
    bf16 weights are ours in bf16 (FP8's fp32 channel scale is loaded into a bf16 parameter first: within two
    bf16 roundings), and the model's logits ours within bf16 tolerance."""
    model = quantized(scheme, method="signround")
    export(model, None, tmp_path / "out", "compressed-tensors")
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == stored
    theirs = consumer_load(tmp_path / "out", "compressed-tensors")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids).logits, theirs(ids).logits.float()
    torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)
    for name, layer in signround.export.quantized_layers(model).items():  # decompressed by the forward above
        rtol = 2**-7 if scheme.startswith("FP8") else 2**-8
        torch.testing.assert_close(theirs.get_submodule(name).weight, layer.dequantized_weight(torch.bfloat16), rtol=rtol, atol=0)


def test_float_formats_are_refused_before_tuning_where_no_consumer_stores_them(tmp_path):
    model = make("llama", vocab_size=256)
    for fmt in ("gptq", "awq"):
        with pytest.raises(FormatError, match=f"format {fmt} cannot hold .* as MXFP4A16: its writer has no place for floating-point weights; "
                                              "export them as compressed-tensors or gguf"):
            check_formats([fmt], model, signround.QuantConfig(scheme="MXFP4A16"))
    for scheme in ("MXFP4", "MXFP8", "MXFP4A16", "NVFP4A16", "FP8"):
        with pytest.raises(FormatError, match=f"format auto_round cannot hold .* as {scheme}: auto-round's loader runs float weights only as "
                                              f"NVFP4 with NVFP4 inputs as signround tunes them .* export {scheme} as compressed-tensors"):
            check_formats(["auto_round"], model, signround.QuantConfig(scheme=scheme))
    with pytest.raises(FormatError, match="format auto_round cannot hold this model: its config packs the whole model one way"):
        check_formats(["auto_round"], model, signround.QuantConfig(scheme="NVFP4", layer_overrides={"down_proj": "W4A16G32"}))
    check_formats(["compressed-tensors", "signround"], model, signround.QuantConfig(scheme="NVFP4A16"))
    check_formats(["auto_round", "compressed-tensors"], model, signround.QuantConfig(scheme="NVFP4"))


@pytest.mark.parametrize("scheme, overrides", [("NVFP4", {}), ("NVFP4", {r"layers\.1\.self_attn\.q_proj": "fp16"})])
def test_auto_round_runs_our_float_weights_and_reads_input_scales(tmp_path, monkeypatch, scheme, overrides):
    """auto-round's float packing holds compressed-tensors' tensors under its own config (16-bit layers in
    `extra_config`): its loader takes our NVFP4 weights and calibrated input scales as they are. It rounds the
    inputs by its own rule (the group maximum divided in fp32, not the model's dtype), so its logits are ours
    exactly once our layers take their inputs from its quantizer (on SmolLM2 the rule costs 0.44% in perplexity;
    its MX input rule costs far more, so MX is refused)."""
    monkeypatch.setattr(signround.qlinear, "cpu_has_fast_bf16", lambda: True)
    model = quantized(scheme, method="signround", layer_overrides=overrides)
    export(model, None, tmp_path / "out", "auto_round")
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qcfg["packing_format"] == "auto_round:llm_compressor" and qcfg["act_bits"] == qcfg["bits"]
    assert len(qcfg.get("extra_config", {})) == (1 if overrides else 0)  # the 16-bit q_proj
    theirs = consumer_load(tmp_path / "out", "auto_round")
    signround.save(model, tmp_path / "ours", save_dtype=theirs.dtype)
    ours = signround.load(tmp_path / "ours", dtype=theirs.dtype)
    monkeypatch.setattr(signround.qlinear, "quantize_activations", lambda x, act, global_scale=None: x)
    for name, layer in signround.export.quantized_layers(ours).items():
        assert type(theirs.get_submodule(name)).__name__.startswith(layer.scheme.fp)  # their NVFP4 layer
        layer.register_forward_pre_hook(lambda module, args, qdq=theirs.get_submodule(name).qdq_input: (qdq(args[0]),))
    assert isinstance(theirs.get_submodule("model.layers.1.self_attn.q_proj"), torch.nn.Linear) == bool(overrides)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("scheme, stored", [("MXFP4", "mxfp4-pack-quantized"), ("MXFP8", "mxfp8-quantized"), ("NVFP4", "nvfp4-pack-quantized"),
                                            ("W8A8", "int-quantized"),
                                            ("W4A8G32", "pack-quantized"), ("FP8", "float-quantized"), ("FP8_BLOCK", "float-quantized")])
def test_compressed_tensors_quantizes_the_inputs_as_we_do(tmp_path, monkeypatch, scheme, stored):
    """Quantized inputs travel as the config group's `input_activations` (dynamic; NVFP4's under the calibrated
    `input_global_scale` of each layer). MX and NVFP4 inputs are quantized as compressed-tensors quantizes them,
    bit for bit: the consumer's logits are ours run from the same bf16 folder exactly. Per-token INT8 and FP8
    differ in rounding only: compressed-tensors emulates them in the model's dtype and scales int8 by max/127.5
    where vLLM's kernels (and we) take max/127. Ours multiplies in bf16 as theirs does (on a CPU without fast
    bf16 it would compute in fp32, one rounding less, which 4-bit inputs of the next layer turn into other codes)."""
    monkeypatch.setattr(signround.qlinear, "cpu_has_fast_bf16", lambda: True)
    model = quantized(scheme, method="signround", wide=scheme == "FP8_BLOCK")
    export(model, None, tmp_path / "out", "compressed-tensors")
    group = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == stored and group["input_activations"]["dynamic"] == ("local" if scheme == "NVFP4" else True)
    theirs = consumer_load(tmp_path / "out", "compressed-tensors")
    signround.save(model, tmp_path / "ours", save_dtype=theirs.dtype)  # the same rounding of embeddings and norms as theirs
    ours = signround.load(tmp_path / "ours", dtype=theirs.dtype)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours(ids).logits.float(), theirs(ids).logits.float()
    if scheme.startswith(("MX", "NV")):
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_fp8_block_inputs_need_whole_groups_of_128():
    with pytest.raises(FormatError, match="input groups of 128 need the layer's width to be a multiple of 128"):
        check_formats(["compressed-tensors"], make("llama", vocab_size=256), signround.QuantConfig(scheme="FP8_BLOCK"))
    check_formats(["compressed-tensors"], make("llama", vocab_size=256), signround.QuantConfig(scheme="FP8_BLOCKA16"))


@pytest.mark.parametrize("fmt", ["gptq", "auto_round", "awq", "gguf"])
def test_quantized_inputs_are_refused_where_the_config_cannot_say_so(fmt):
    with pytest.raises(FormatError, match=f"format {fmt} cannot hold .* as W4A8G32: its config has no place for quantized inputs .*compressed-tensors"):
        check_formats([fmt], make("llama", vocab_size=256), signround.QuantConfig(scheme="W4A8G32"))


@pytest.mark.parametrize("fmt", ["auto_round", "gptq", "compressed-tensors"])
def test_a_searched_plan_exports_with_its_mixed_schemes(tmp_path, fmt):
    """A `target_bits` run's per-layer schemes reach the consumer: same logits, every scheme of the plan listed."""
    model = quantized("W4A16G32", target_bits=4.5, options=("W3A16G32", "W4A16G32", "W8A16G32"))
    plan = model.config.quantization_config["plan"]
    assert len({json.dumps(s, sort_keys=True) for s in plan.values()}) > 1, "the tiny search chose one scheme: the test shows nothing"
    export(model, None, tmp_path / "out", fmt)
    assert_same_logits(model, consumer_load(tmp_path / "out", fmt))
