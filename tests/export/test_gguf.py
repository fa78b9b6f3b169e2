"""GGUF export: transformers' GGUF loader and the gguf package's own dequantization both read back
exactly the weights signround tuned, and the tokenizer survives the trip."""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGUFReader
from gguf.quants import dequantize
from tiny_models import make, make_moe
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import signround
from signround import runner
from signround.config import parse_scheme
from signround.export import FormatError, check_formats, export
from signround.export.gguf import FILE_NAME, ggml_type, llama_row_order

SCHEMES = {  # scheme -> the ggml block type it must be written as
    "bits=4,group_size=32,sym=true": "Q4_0",
    "bits=4,group_size=32,sym=false": "Q4_1",
    "bits=5,group_size=32,sym=true": "Q5_0",
    "bits=5,group_size=32,sym=false": "Q5_1",
    "bits=8,group_size=32,sym=true": "Q8_0",
    "MXFP4A16": "MXFP4",
}


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    return bpe_tokenizer


def quantized(tokenizer, scheme: str):
    model = make("llama", vocab_size=len(tokenizer))
    signround.quantize(model, signround.QuantConfig(scheme=parse_scheme(scheme), method="rtn"))
    return model


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_transformers_gguf_loader_reproduces_our_logits(tmp_path, tokenizer, scheme):
    model = quantized(tokenizer, scheme)
    export(model, tokenizer, tmp_path / "out", "gguf")
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME).eval()
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits.float(), model(ids).logits.float(), atol=3e-3, rtol=3e-3)
    text = "The capital of France is Paris, said the <|im_start|> assistant."
    reread = tf.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME)
    assert reread(text).input_ids == tokenizer(text).input_ids


def _written_and_ours(model, tensors):
    """For block 1's q, k and down projections: (GGUF tensor type, the gguf package's dequantization of
    the written tensor, our dequantized weight in llama.cpp's row order)."""
    cfg = model.config
    for hf, name, heads in (("self_attn.q_proj", "attn_q", cfg.num_attention_heads), ("self_attn.k_proj", "attn_k", cfg.num_key_value_heads),
                            ("mlp.down_proj", "ffn_down", None)):
        layer = model.model.layers[1].get_submodule(hf)
        t = tensors[f"blk.1.{name}.weight"]
        got = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(layer.out_features, layer.in_features)
        want = layer.dequantized_weight()
        yield t.tensor_type.name, got, want[llama_row_order(layer.out_features, heads)] if heads else want


def reloaded_with_our_logits(model, tokenizer, out: Path):
    """Export `model` to GGUF and check that transformers' GGUF loader rebuilds its class with our logits: (that
    model, the written tensor types by name)."""
    export(model, tokenizer, out, "gguf")
    theirs = tf.AutoModelForCausalLM.from_pretrained(out, gguf_file=FILE_NAME).eval()
    assert type(theirs) is type(model)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits.float(), model(ids).logits.float(), atol=3e-3, rtol=3e-3)
    return theirs, {t.name: t.tensor_type.name for t in GGUFReader(out / FILE_NAME).tensors}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_gguf_package_dequantizes_to_our_weights(tmp_path, tokenizer, scheme):
    model = quantized(tokenizer, scheme)
    export(model, tokenizer, tmp_path / "out", "gguf")
    tensors = {t.name: t for t in GGUFReader(tmp_path / "out" / FILE_NAME).tensors}
    for kind, got, want in _written_and_ours(model, tensors):
        assert kind == SCHEMES[scheme]
        exact = "sym=false" not in scheme  # asym blocks store the offset -zero*scale rounded to fp16
        torch.testing.assert_close(got, want, atol=0 if exact else 2e-3 * want.abs().max().item(), rtol=0 if exact else 1e-3)
    assert tensors["token_embd.weight"].tensor_type.name == "F16" and tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


@pytest.mark.parametrize("scheme, reason", [
    ("W4A16", "hold 32 weights each, not groups of 128"),
    ("W3A16G32", "no GGUF block type holds 3-bit symmetric codes"),
    ("bits=8,group_size=32,sym=false", "no GGUF block type holds 8-bit asymmetric codes"),
    ("NVFP4A16", "float block type that signround writes is MXFP4"),
])
def test_unrepresentable_scheme_is_refused(scheme, reason):
    with pytest.raises(FormatError, match=reason):
        check_formats(["gguf"], make("llama"), signround.QuantConfig(scheme=parse_scheme(scheme)))


def test_qwen3_moe_experts_kept_16_bit_are_written_as_f16_stacks(tmp_path, tokenizer):
    model = make_moe("qwen3_moe", vocab_size=len(tokenizer), moe_intermediate_size=768, norm_topk_prob=True)
    signround.quantize(model, signround.QuantConfig(scheme=parse_scheme("bits=4,group_size=32,sym=true"), method="rtn",
                                                    layer_overrides={"experts": "fp16"}))
    export(model, tokenizer, tmp_path / "out", "gguf")
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "out" / FILE_NAME).tensors}
    assert kinds["blk.0.ffn_up_exps.weight"] == "F16" and kinds["blk.0.attn_q.weight"] == "Q4_0"
    assert kinds["blk.0.ffn_gate_inp.weight"] == "F32"  # the router, as llama.cpp's converter keeps it
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME).eval()
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits.float(), model(ids).logits.float(), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("config, message", [
    (dict(scheme=parse_scheme("bits=4,group_size=32,sym=true"), layer_overrides={r"experts\.3\.": "bits=8,group_size=32,sym=true"}),
     r"experts\.\*\.down_proj as .*one tensor of one type"),
    (dict(scheme="W4A16G32", target_bits=4.5, options=("bits=4,group_size=32,sym=true", "bits=8,group_size=32,sym=true"), fuse_groups=False),
     "drop --split-fused"),
])
def test_experts_that_one_stacked_tensor_cannot_hold_are_refused_before_tuning(config, message):
    with pytest.raises(FormatError, match=message):
        check_formats(["gguf"], make_moe("qwen3_moe", norm_topk_prob=True), signround.QuantConfig(**config))


def test_qwen3_moe_with_dense_blocks_is_refused():
    with pytest.raises(FormatError, match="dense ones"):
        check_formats(["gguf"], make_moe("qwen3_moe", norm_topk_prob=True, mlp_only_layers=[0]), signround.QuantConfig(scheme="Q4_K"))


def test_qwen3_moe_without_normalised_routing_is_refused():
    with pytest.raises(FormatError, match="norm_topk_prob"):
        check_formats(["gguf"], make_moe("qwen3_moe"), signround.QuantConfig(scheme="W4A16G32"))


def test_other_architectures_are_refused():
    with pytest.raises(FormatError, match="writes llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma2, gemma3_text, phi3 models, not 'gpt2'"):
        check_formats(["gguf"], make("gpt2"), signround.QuantConfig(scheme="W4A16G32"))


@pytest.mark.parametrize("scheme", ["bits=4,group_size=32,sym=true", "Q4_K"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_moe"])
def test_qwen_architectures_load_in_transformers_with_our_logits(tmp_path, tokenizer, arch, scheme):
    """llama.cpp's qwen2 / qwen3 / qwen3moe tensors and metadata (no rotary row reordering; Qwen2's biases,
    Qwen3's q/k norms, Qwen3-MoE's stacked `ffn_*_exps` experts and router), read back by transformers."""
    wide = K_WIDE if scheme == "Q4_K" else {}
    if arch == "qwen3_moe":
        # transformers' GGUF loader reads no expert width (it takes Qwen3-MoE's 768); llama.cpp normalises the top-k weights
        model = make_moe(arch, vocab_size=len(tokenizer), **wide, moe_intermediate_size=768, norm_topk_prob=True)
    else:  # transformers' GGUF loader reads no head_dim for qwen3 and takes Qwen3's 128 (llama.cpp reads key_length)
        model = make(arch, vocab_size=len(tokenizer), **{**wide, **({"head_dim": 128} if arch == "qwen3" else {})})
    signround.quantize(model, signround.QuantConfig(scheme=parse_scheme(scheme), method="rtn"))
    theirs, kinds = reloaded_with_our_logits(model, tokenizer, tmp_path / "out")
    quantized = kinds["blk.1.ffn_down_exps.weight" if arch == "qwen3_moe" else "blk.1.ffn_down.weight"]
    assert quantized == ("Q4_K" if scheme == "Q4_K" else "Q4_0")


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks_decode_in_the_gguf_package_to_our_weights(name):
    """Byte layouts checked by the consumer's own dequantization: exactly our dequantized weights."""
    from gguf import GGMLQuantizationType, quants

    from signround.export.gguf_blocks import encode_k_blocks
    from signround.quant.kquant import K_TYPES, dequantize_k, quantize_k

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 768, generator=g) * 0.05
    w[1, 256:512] = 0
    w[2] = w[2].abs()
    offset = torch.rand(w.shape, generator=g) - 0.5
    kq = quantize_k(w, K_TYPES[name], offset)
    data = encode_k_blocks(kq)
    assert data.shape == (6, 3 * quants.GGML_QUANT_SIZES[GGMLQuantizationType[name]][1])
    np.testing.assert_array_equal(quants.dequantize(data, GGMLQuantizationType[name]), dequantize_k(kq).numpy())


K_WIDE = dict(hidden_size=256, intermediate_size=512, head_dim=64)  # rows of whole 256-weight super-blocks, o_proj's too


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_model_loads_in_transformers_with_our_logits_and_weights(tmp_path, tokenizer, name):
    """Tuned with its scales quantized as the K type stores them, then read back by transformers' GGUF
    loader (same logits) and by the gguf package (exactly our weights; q/k rows in llama.cpp's order)."""
    model = make("llama", vocab_size=len(tokenizer), **K_WIDE)
    signround.quantize(model, signround.QuantConfig(scheme=name, iters=4, nsamples=4, seqlen=16, batch_size=2),
                       calibration=torch.randint(0, len(tokenizer), (4, 16)))
    export(model, tokenizer, tmp_path / "out", "gguf")
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME).eval()
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits.float(), model(ids).logits.float(), atol=3e-3, rtol=3e-3)
    for kind, got, want in _written_and_ours(model, {t.name: t for t in GGUFReader(tmp_path / "out" / FILE_NAME).tensors}):
        assert kind == name
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_k_quant_falls_back_to_a_legacy_type_where_rows_are_no_whole_super_blocks(tmp_path, tokenizer):
    """As llama.cpp does: Q4_K on 64-wide o_proj rows becomes Q5_0 (a warning names the layers)."""
    model = make("llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512)  # o_proj takes 4 heads x 16
    with pytest.warns(UserWarning, match=r"2 layers .* llama.cpp's fallback \(Q4_K -> W5A16G32\)"):
        report = signround.quantize(model, signround.QuantConfig(scheme="Q4_K", method="rtn"))
    assert sorted(report.fallbacks) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    export(model, tokenizer, tmp_path / "out", "gguf")
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "out" / FILE_NAME).tensors}
    assert kinds["blk.0.attn_output.weight"] == "Q5_0" and kinds["blk.0.attn_q.weight"] == "Q4_K"
    # the report (and so a bit budget) counts each layer at its size in the file, the legacy blocks' too
    stored = sum(int(t.n_bytes) for t in GGUFReader(tmp_path / "out" / FILE_NAME).tensors
                 if t.name.startswith("blk.") and t.tensor_type.name not in ("F32", "F16"))
    numel = sum(model.get_submodule(name).in_features * model.get_submodule(name).out_features for name in report.quantized)
    assert report.bits_per_weight == pytest.approx(stored * 8 / numel, rel=1e-9)


@pytest.mark.parametrize("fmt", ["gptq", "auto_round", "awq", "compressed-tensors"])
def test_k_quant_schemes_are_refused_by_formats_without_k_scales(fmt):
    with pytest.raises(FormatError, match=f"format {fmt} cannot hold .* as Q4_K: K-quant scales are quantized per 256 weights, "
                                          "which only GGUF stores; export it as gguf, or quantize"):
        check_formats([fmt], make("llama", **K_WIDE), signround.QuantConfig(scheme="Q4_K"))


ROPES = {  # rope_parameters -> what llama.cpp's llama architecture reads: scaling metadata, or the rope_freqs tensor
    "default": dict(rope_type="default"),
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32),
}


def _inv_freq_as_llama_cpp_reads_it(reader: GGUFReader) -> torch.Tensor:
    """The rotary inverse frequencies llama.cpp's llama architecture takes from the file: freq_base^(-2i/n_rot),
    times freq_scale (1 / rope.scaling.factor, linear scaling being its default type), divided by rope_freqs[i]."""
    def field(key):
        return reader.fields[key].contents() if key in reader.fields else None

    base, dim = field("llama.rope.freq_base"), field("llama.rope.dimension_count")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert field("llama.rope.scaling.type") in (None, "linear")
    inv_freq = inv_freq / (field("llama.rope.scaling.factor") or 1.0)
    divisors = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    return inv_freq / torch.from_numpy(np.array(divisors[0].data, dtype=np.float32)) if divisors else inv_freq


@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path, tokenizer, rope):
    """Llama 3 scaling as the rope_freqs tensor (base / scaled inverse frequency, as transformers computes
    them), linear scaling as rope.scaling.type/factor, none for plain rotary. transformers' GGUF loader reads
    neither for llama, so its model is given the frequencies llama.cpp reads from the file: then it gives our logits."""
    model = make("llama", vocab_size=len(tokenizer), rope_parameters={**ROPES[rope], "rope_theta": 10000.0})
    with torch.no_grad():  # sharp attention, so that the logits depend on the rotary positions
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    signround.quantize(model, signround.QuantConfig(scheme=parse_scheme("bits=4,group_size=32,sym=true"), method="rtn"))
    export(model, tokenizer, tmp_path / "out", "gguf")
    reader = GGUFReader(tmp_path / "out" / FILE_NAME)

    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    scaled = ROPE_INIT_FUNCTIONS[rope](model.config)[0] if rope != "default" else plain
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, scaled)
    tensors = {t.name: t for t in reader.tensors}
    if rope == "llama3":
        written = tensors["rope_freqs.weight"]
        assert written.tensor_type.name == "F32" and written.data.shape == (8,)
        torch.testing.assert_close(torch.from_numpy(np.array(written.data)), plain / scaled, rtol=1e-6, atol=0)
    else:
        assert "rope_freqs.weight" not in tensors
    scaling = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("llama.rope.scaling.")}
    assert scaling == ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0} if rope == "linear" else {})
    file_inv_freq = _inv_freq_as_llama_cpp_reads_it(reader)
    torch.testing.assert_close(file_inv_freq, scaled, rtol=1e-6, atol=0)

    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME).eval()
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits.float()
        theirs.model.rotary_emb.inv_freq.copy_(plain)
        unscaled = theirs(ids).logits.float()
        theirs.model.rotary_emb.inv_freq.copy_(file_inv_freq)
        torch.testing.assert_close(theirs(ids).logits.float(), ours, atol=3e-3, rtol=3e-3)
    if rope != "default":  # the scaling changes the logits at this length far beyond the tolerance
        assert (unscaled - ours).abs().max() > 30 * 3e-3


@pytest.mark.parametrize("rope", [
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    dict(rope_type="dynamic", factor=2.0),
    dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=64),
])
def test_unrepresentable_rope_scaling_is_refused_before_tuning(tmp_path, tokenizer, monkeypatch, rope):
    model = make("llama", vocab_size=len(tokenizer), rope_parameters={**rope, "rope_theta": 10000.0})
    kind = rope["rope_type"]
    message = f"format gguf cannot hold this model: its rope_parameters rope_type '{kind}' cannot be written to GGUF by signround.*--format signround"
    with pytest.raises(FormatError, match=message):
        check_formats(["gguf"], model, signround.QuantConfig(scheme="W4A16G32"))

    def tuning(*args, **kwargs):
        raise AssertionError("tuning started")

    monkeypatch.setattr(runner, "quantize", tuning)
    with pytest.raises(FormatError, match=message):
        runner.run(model, tmp_path / "out", signround.QuantConfig(scheme="W4A16G32", method="rtn"), formats=["gguf"], tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()
    check_formats(["gptq"], model, signround.QuantConfig(scheme="W4A16G32"))  # formats whose config.json keeps it take the model


def test_a_byte_level_bpe_saved_with_byte_fallback_and_a_decoder_sequence_exports(tmp_path, tokenizer):
    """transformers 5.17 saves a GGUF-converted GPT-2 tokenizer so (byte fallback on, the ByteLevel decoder last
    in a Sequence): the same vocabulary and merges, which the export writes as for the plain form."""
    import json

    tokenizer.save_pretrained(tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "tokenizer.json").read_text())
    saved["model"]["byte_fallback"] = True
    saved["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}, saved["decoder"]]}
    (tmp_path / "plain" / "tokenizer.json").write_text(json.dumps(saved))
    spelled_so = tf.AutoTokenizer.from_pretrained(tmp_path / "plain")
    model = quantized(tokenizer, "bits=4,group_size=32,sym=true")
    export(model, spelled_so, tmp_path / "out", "gguf")
    text = "The capital of France is Paris, said the <|im_start|> assistant."
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME)(text).input_ids == tokenizer(text).input_ids


def test_a_searched_k_type_plan_is_written_tensor_by_tensor(tmp_path, tokenizer):
    """A `target_bits` search over the K types writes each tensor in the type it chose; transformers reads the same logits."""
    model = make("llama", vocab_size=len(tokenizer), **K_WIDE)
    report = signround.quantize(model, signround.QuantConfig(scheme="Q4_K", method="rtn", target_bits=4.2, options=("Q3_K", "Q4_K", "Q6_K"),
                                                             nsamples=4, seqlen=16), calibration=torch.randint(0, len(tokenizer), (4, 16)))
    assert len(set(report.quantized.values())) > 1, "the tiny search chose one type: the test shows nothing"
    export(model, tokenizer, tmp_path / "out", "gguf")
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME).eval()
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits.float(), model(ids).logits.float(), atol=3e-3, rtol=3e-3)
    written = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "out" / FILE_NAME).tensors}
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i, block in enumerate(model.model.layers):
        for hf, name in hf_to_gguf.items():
            assert written[f"blk.{i}.{name}.weight"] == ggml_type(block.get_submodule(hf).scheme), f"blk.{i}.{name}"


@pytest.fixture(scope="module")
def spm_tokenizer():
    return make_spm_tokenizer(prepend=False)


def make_spm_tokenizer(prepend: bool):
    """A small SentencePiece-style BPE as Gemma's converted tokenizer is: `▁` for spaces, byte fallback over
    `<0xXX>` pieces, no byte-level alphabet; `prepend`: a `▁` before the text, as LLaMA 2's and Phi-3's."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_model.normalizer = normalizers.Replace(" ", "▁")
    text = ["The capital of France is Paris, said the assistant. " * 20, "Quantization keeps the model small and fast. " * 20]
    trainer_model.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    trained = json.loads(trainer_model.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    bpe = Tokenizer(models.BPE(vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spaces = normalizers.Replace(" ", "▁")
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prepend else spaces
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tf.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


GEMMA_TEXT = "The capital of France is Paris, said the assistant. Ünïcödé ☃ falls back to bytes."


@pytest.mark.parametrize("scheme", ["bits=4,group_size=32,sym=true", "Q4_K"])
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_loads_in_transformers_with_our_logits_and_tokenizer(tmp_path, spm_tokenizer, arch, scheme):
    """llama.cpp's gemma2 / gemma3: norms stored as 1 + w, sliding and global layers (Gemma 3: five sliding, one
    global, two rotary bases), softcapping, and a SentencePiece vocabulary (scores, byte pieces), read back by
    transformers. Its loader reads no query_pre_attn_scalar (it takes 256), so head_dim is 256, as llama.cpp
    requires it to be."""
    wide = dict(hidden_size=256, intermediate_size=512) if scheme == "Q4_K" else {}
    config_class = tf.Gemma2Config if arch == "gemma2" else tf.Gemma3TextConfig
    config = config_class(**{"hidden_size": 64, "intermediate_size": 128, **wide}, vocab_size=len(spm_tokenizer), num_attention_heads=4,
                          num_hidden_layers=6 if arch == "gemma3" else 2, num_key_value_heads=2, head_dim=256, max_position_embeddings=256,
                          sliding_window=8, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from their zero initialisation, so that a lost 1 + w shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    signround.quantize(model, signround.QuantConfig(scheme=parse_scheme(scheme), method="rtn"))
    theirs, _ = reloaded_with_our_logits(model, spm_tokenizer, tmp_path / "out")
    assert theirs.config.layer_types == model.config.layer_types
    reader = GGUFReader(tmp_path / "out" / FILE_NAME)
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    loaded = tf.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME)
    assert loaded(GEMMA_TEXT, add_special_tokens=False).input_ids == spm_tokenizer(GEMMA_TEXT, add_special_tokens=False).input_ids


def test_gemma_that_llama_cpp_would_run_otherwise_is_refused():
    config = tf.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=256)
    with pytest.raises(FormatError, match=r"scales attention by 1/sqrt\(16\)"):
        check_formats(["gguf"], tf.AutoModelForCausalLM.from_config(config), signround.QuantConfig(scheme="W4A16G32"))


def test_sentencepiece_scores_rank_merges_as_the_merge_list_does(spm_tokenizer):
    """llama.cpp's SentencePiece tokenizer merges the pair whose piece scores highest, so scores must fall
    with merge rank; byte pieces and specials get the types it treats apart."""
    import json

    from gguf import TokenType

    from signround.export.gguf_vocab import is_sentencepiece_bpe, sentencepiece_tokens

    saved = json.loads(spm_tokenizer.backend_tokenizer.to_str())
    assert is_sentencepiece_bpe(saved)
    tokens, scores, types = sentencepiece_tokens(saved, len(spm_tokenizer) + 2)
    merged = [scores[tokens.index("".join(m if isinstance(m, list) else m.split(" ")))] for m in saved["model"]["merges"]]
    assert len(merged) > 20 and all(a > b for a, b in zip(merged, merged[1:]))
    assert types[tokens.index("<0x41>")] == TokenType.BYTE and types[tokens.index("<bos>")] == TokenType.CONTROL
    assert types[-1] == TokenType.UNUSED and tokens[-1] == f"[PAD{len(spm_tokenizer) + 1}]"


def test_phi3_loads_in_transformers_with_our_logits_and_tokenizer(tmp_path):
    """llama.cpp's phi3: the fused qkv_proj and gate_up_proj written as attn_qkv and ffn_up, an untied output,
    and a SentencePiece vocabulary that prepends a space (transformers rebuilds its merges from the scores)."""
    tokenizer = make_spm_tokenizer(prepend=True)
    model = make("phi3", vocab_size=len(tokenizer), bos_token_id=2, eos_token_id=1)
    signround.quantize(model, signround.QuantConfig(scheme=parse_scheme("bits=4,group_size=32,sym=false"), method="rtn"))
    theirs, kinds = reloaded_with_our_logits(model, tokenizer, tmp_path / "out")
    assert kinds["blk.1.attn_qkv.weight"] == kinds["blk.1.ffn_up.weight"] == "Q4_1" and kinds["output.weight"] == "F16"
    loaded = tf.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=FILE_NAME)
    assert loaded(GEMMA_TEXT, add_special_tokens=False).input_ids == tokenizer(GEMMA_TEXT, add_special_tokens=False).input_ids


def test_mixtral_experts_are_written_as_llama_cpp_stacks_of_our_codes(tmp_path, tokenizer):
    """llama.cpp runs Mixtral as its llama architecture with stacked `ffn_*_exps` experts and an F32 router;
    transformers' GGUF loader reads no Mixtral, so the gguf package checks the codes expert by expert
    (llama.cpp itself: benchmarks/llama_cpp_interop.py)."""
    model = make_moe("mixtral", vocab_size=len(tokenizer))
    signround.quantize(model, signround.QuantConfig(scheme=parse_scheme("bits=4,group_size=32,sym=true"), method="rtn"))
    export(model, tokenizer, tmp_path / "out", "gguf")
    reader = GGUFReader(tmp_path / "out" / FILE_NAME)
    assert reader.fields["llama.expert_count"].parts[-1][0] == 4 and reader.fields["llama.expert_used_count"].parts[-1][0] == 2
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    experts = model.model.layers[1].mlp.experts
    for part in ("gate", "up", "down"):
        t = tensors[f"blk.1.ffn_{part}_exps.weight"]
        assert t.tensor_type.name == "Q4_0"
        got = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
        want = torch.stack([getattr(experts.expert(e), f"{part}_proj").dequantized_weight() for e in range(4)])
        torch.testing.assert_close(got.reshape(want.shape), want, atol=0, rtol=0)
    q = model.model.layers[1].self_attn.q_proj
    got = torch.from_numpy(np.asarray(dequantize(tensors["blk.1.attn_q.weight"].data, tensors["blk.1.attn_q.weight"].tensor_type), dtype=np.float32))
    torch.testing.assert_close(got.reshape(q.out_features, -1), q.dequantized_weight()[llama_row_order(q.out_features, 4)], atol=0, rtol=0)
