import json

import pytest
import torch
from tiny_models import calib_ids, make

import signround
from signround import QuantConfig
from signround.qlinear import QuantLinear


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3", "gpt2", "opt", "gpt_neox", "mistral"])
def test_quantize_save_load_round_trip(arch, tmp_path):
    model = make(arch)
    ids = calib_ids(4, 16)
    with torch.no_grad():
        original = model(ids).logits
    report = signround.quantize(model, QuantConfig(scheme="W4A16G32", iters=4, nsamples=8, seqlen=16, batch_size=4),
                                calibration=calib_ids(8, 16))
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == len(report.quantized) > 0
    with torch.no_grad():
        fake = model(ids).logits
    assert (fake - original).abs().max() < 0.5 * original.abs().max()  # close to, but not, the original
    assert not torch.equal(fake, original)
    out = signround.save(model, tmp_path / "out")
    reloaded = signround.load(out)
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == len(packed)
    with torch.no_grad():
        again = reloaded(ids).logits
    torch.testing.assert_close(again, fake, atol=2e-3 * fake.abs().max().item(), rtol=1e-2)  # fp16-stored norms/embeddings


def test_quant_linear_holds_exactly_the_algorithms_weights():
    model = make("llama")
    signround.quantize(model, QuantConfig(method="rtn", scheme="W3A16G32"))
    layer = model.model.layers[0].mlp.down_proj
    reference = make("llama").model.layers[0].mlp.down_proj.weight
    from signround.quant.integer import dequantize_weight, quantize_weight
    expected = dequantize_weight(quantize_weight(reference.detach(), 3, 32, True))
    assert torch.equal(layer.dequantized_weight(), expected)


def test_signround_passes_over_a_block_kept_16_bit_whole():
    """A block whose every layer an override keeps 16-bit has nothing to tune: it is run, not trained,
    and its norms keep their gradients switched on."""
    model = make("llama")
    config = QuantConfig(scheme="W4A16G32", iters=3, nsamples=4, seqlen=16, batch_size=2, layer_overrides={r"layers\.1\.": "fp16"})
    report = signround.quantize(model, config, calibration=calib_ids(4, 16))
    assert not any(isinstance(m, QuantLinear) for m in model.model.layers[1].modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert report.block_losses[1][1] is not None and all(p.requires_grad for p in model.model.layers[1].parameters())


def test_layer_overrides_and_skips(tmp_path):
    model = make("llama")
    config = QuantConfig(scheme="W4A16G32", method="rtn", layer_overrides={r"down_proj": "W8A16G64", r"layers\.1\.self_attn\.q_proj": "fp16"})
    report = signround.quantize(model, config)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.scheme.bits == 8 and down.scheme.group_size == 64
    assert isinstance(model.model.layers[1].self_attn.q_proj, torch.nn.Linear)
    assert "model.layers.1.self_attn.q_proj" in report.skipped
    out = signround.save(model, tmp_path / "o")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["extra_config"]["model.layers.0.mlp.down_proj"] == {"bits": 8, "group_size": 64, "sym": True}
    assert qcfg["modules_not_quantized"] == ["model.layers.1.self_attn.q_proj"]
    reloaded = signround.load(out)
    assert reloaded.model.layers[0].mlp.down_proj.scheme.bits == 8
    assert isinstance(reloaded.model.layers[1].self_attn.q_proj, torch.nn.Linear)


def test_non_dividing_group_is_padded_by_default_and_skipped_on_request():
    model = make("llama", hidden_size=96)  # 96 is not a multiple of 64
    report = signround.quantize(model, QuantConfig(scheme="W4A16G64", method="rtn"))
    assert not report.skipped and model.model.layers[0].self_attn.q_proj.scales.shape[0] == 2
    model = make("llama", hidden_size=96)
    with pytest.warns(UserWarning, match=r"stay unquantized: .*q_proj \(in_features=96 is not divisible by group_size=64"):
        report = signround.quantize(model, QuantConfig(scheme="W4A16G64", method="rtn", pad_groups=False))
    assert "model.layers.0.mlp.down_proj" in report.quantized  # 128 in-features divide


def test_lm_head_kept_unless_asked_and_untied():
    model = make("llama")
    signround.quantize(model, QuantConfig(method="rtn", scheme="W4A16G32"))
    assert isinstance(model.lm_head, torch.nn.Linear)
    model = make("llama")
    report = signround.quantize(model, QuantConfig(method="rtn", scheme="W4A16G32", quantize_lm_head=True))
    assert isinstance(model.lm_head, QuantLinear) and "lm_head" in report.quantized
    tied = make("llama", tie_word_embeddings=True)
    tied.tie_weights()
    report = signround.quantize(tied, QuantConfig(method="rtn", scheme="W4A16G32", quantize_lm_head=True))
    assert isinstance(tied.lm_head, torch.nn.Linear) and any("tied" in n for n in report.notes)


def test_report_counts_bits_including_scales_and_zeros():
    model = make("llama")
    report = signround.quantize(model, QuantConfig(method="rtn", scheme="W4A16G32"))
    assert report.bits_per_weight == pytest.approx(4 + (16 + 4) / 32)
    assert "quantized: 14 weight tensors" in report.summary()


def test_every_weight_tensor_left_16_bit_in_the_blocks_is_counted_with_its_share():
    """Nothing stays 16-bit silently: a linear kept by an override, and a weight tensor no linear layer
    holds (here a 3-D parameter, as fused MoE experts are), are both named with their share."""
    model = make("llama")
    experts = torch.nn.Parameter(torch.randn(4, 64, 32))  # 8192 weights the quantizer does not see as a linear
    model.model.layers[1].mlp.register_parameter("experts", experts)
    total = sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match="1 weight tensors in the blocks belong to no linear layer and stay 16-bit: model.layers.1.mlp.experts"):
        report = signround.quantize(model, QuantConfig(method="rtn", scheme="W4A16G32", layer_overrides={r"layers\.0\.mlp\.down_proj": "fp16"}))
    assert report.kept_16bit == {"model.layers.0.mlp.down_proj.weight": 64 * 128, "model.layers.1.mlp.experts": 4 * 64 * 32}
    assert report.share("kept 16-bit") == pytest.approx((64 * 128 + 4 * 64 * 32) / total)
    assert sum(report.parameters.values()) == total
    summary = report.summary()
    assert "quantized: 13 weight tensors" in summary and "kept 16-bit: 2 weight tensors in the blocks" in summary
    assert "model.layers.1.mlp.experts" in summary


def test_output_folder_is_refused_when_not_empty(tmp_path):
    model = make("llama")
    signround.quantize(model, QuantConfig(method="rtn", scheme="W4A16G32"))
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        signround.save(model, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_nan_weight_is_named_before_any_work():
    from signround.pipeline import CorruptWeightsError

    model = make("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(CorruptWeightsError, match=r"model.layers.1.mlp.up_proj.weight holds NaN or Inf"):
        signround.quantize(model, QuantConfig(method="rtn", scheme="W4A16G32"))
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # nothing was touched


@pytest.mark.parametrize("scheme", ["Q3_K", "Q4_K"])  # one symmetric, one with float minimums
def test_k_quant_save_load_round_trip(scheme, tmp_path):
    """K-quant layers keep their scales as llama.cpp stores them (fp16 super-scales, integer codes) and
    reload to the weights that were evaluated."""
    model = make("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    signround.quantize(model, QuantConfig(scheme=scheme, iters=4, nsamples=8, seqlen=16, batch_size=4), calibration=calib_ids(8, 16))
    layer = model.model.layers[0].mlp.up_proj
    assert layer.scheme.name() == scheme and not hasattr(layer, "scales") and layer.scale_codes.dtype == torch.int8
    ids = calib_ids(4, 16)
    with torch.no_grad():
        fake = model(ids).logits
    config = json.loads((signround.save(model, tmp_path / "out") / "config.json").read_text())
    assert config["quantization_config"]["kquant"] is True
    reloaded = signround.load(tmp_path / "out")
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.dequantized_weight(), layer.dequantized_weight())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, fake, atol=2e-3 * fake.abs().max().item(), rtol=1e-2)  # fp16-stored norms/embeddings


@pytest.mark.parametrize("scheme, scale_dtype", [("NVFP4A16", torch.float8_e4m3fn), ("MXFP4A16", torch.uint8), ("FP8A16", torch.float32)])
def test_float_format_save_load_round_trip(scheme, scale_dtype, tmp_path):
    """Float layers store codes and scales as compressed-tensors lays them out (two E2M1 codes a byte, E4M3 or
    E8M0 or fp32 scales, NVFP4's global scale), keep those dtypes through saving in fp16, and reload exactly."""
    model = make("llama")
    signround.quantize(model, QuantConfig(scheme=scheme, iters=4, nsamples=8, seqlen=16, batch_size=4), calibration=calib_ids(8, 16))
    layer = model.model.layers[0].mlp.up_proj
    assert layer.scales.dtype == scale_dtype and layer.qweight.dtype == torch.uint8
    assert layer.qweight.shape == (layer.out_features, layer.in_features * layer.scheme.bits // 8)
    config = json.loads((signround.save(model, tmp_path / "out") / "config.json").read_text())
    assert config["quantization_config"]["fp"] == scheme.removesuffix("A16")
    reloaded = signround.load(tmp_path / "out", dtype=torch.bfloat16)
    got = reloaded.model.layers[0].mlp.up_proj
    assert got.scales.dtype == scale_dtype and torch.equal(got.dequantized_weight(), layer.dequantized_weight())
    ids = calib_ids(4, 16)
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(reloaded(ids).logits.float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)  # bf16


@pytest.mark.parametrize("method", ["rtn", "signround"])
def test_nvfp4_inputs_take_their_scale_from_calibration(method, tmp_path):
    """NVFP4 inputs need one calibrated fp32 scale per layer (E4M3 max x E2M1 max over the largest input seen):
    even round-to-nearest reads the calibration data for it. Block 0's layers see what the original model's
    do; the scale is saved in fp32 and reloaded."""
    model, ids = make("llama"), calib_ids(8, 16)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, max(seen.get(name, 0), args[0].abs().max().item())))
             for name, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    report = signround.quantize(model, QuantConfig(scheme="NVFP4", method=method, iters=4, nsamples=8, seqlen=16, batch_size=4), calibration=ids)
    assert report.calibration_shape == (8, 16)
    for name, peak in seen.items():  # o_proj's and down_proj's inputs follow layers quantized with quantized inputs
        got = model.model.layers[0].get_submodule(name).input_global_scale
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):  # the inputs as cached in 16 bits
            torch.testing.assert_close(got, torch.tensor(448 * 6 / peak), rtol=4e-3, atol=0)
        assert got.dtype == torch.float32 and 0.5 < got.item() * peak / (448 * 6) < 2
    signround.save(model, tmp_path / "out", save_dtype=torch.float16)
    reloaded = signround.load(tmp_path / "out")
    assert torch.equal(reloaded.model.layers[1].mlp.down_proj.input_global_scale, model.model.layers[1].mlp.down_proj.input_global_scale)


def test_a_folder_saved_before_the_format_registry_still_loads(tmp_path):
    """A checkpoint written before float formats, quantized inputs and smoothing existed has none of their
    keys in its quantization_config: it loads as the integer model it is, and its config reads back."""
    model = make("llama")
    signround.quantize(model, QuantConfig(scheme="W4A16G32", iters=2, nsamples=4, seqlen=16, batch_size=4), calibration=calib_ids(4, 16))
    out = signround.save(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert not {"fp", "act"} & set(qcfg) and not {"fp", "act"} & set(qcfg["layer_overrides"])
    del qcfg["tuning"]["smooth"]  # as an earlier version wrote it
    (out / "config.json").write_text(json.dumps(config))
    reloaded = signround.load(out)
    layer = reloaded.model.layers[0].mlp.up_proj
    assert layer.scheme == signround.WeightScheme(4, 32, True)
    assert torch.equal(layer.dequantized_weight(), model.model.layers[0].mlp.up_proj.dequantized_weight())
    assert QuantConfig.from_dict({**qcfg["tuning"], "scheme": {"bits": 4, "group_size": 32, "sym": True}}).smooth is None


def test_lm_head_cannot_take_calibrated_inputs():
    """lm_head is quantized after the blocks with no calibration pass: NVFP4 inputs there are refused up front."""
    model = make("llama", tie_word_embeddings=False)
    with pytest.raises(signround.ConfigError, match="lm_head would get NVFP4, whose NVFP4 inputs need a scale.*'lm_head': 'NVFP4A16'"):
        signround.quantize(model, QuantConfig(scheme="NVFP4", method="rtn", quantize_lm_head=True, nsamples=4, seqlen=16), calibration=calib_ids(4, 16))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
