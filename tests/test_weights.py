"""Lazily opened models: the skeleton matches a full load, blocks are read one at a time, and a streamed
quantization saves exactly what an in-memory one does."""

import pytest
import torch
from tiny_models import CONFIGS, make

import signround
from signround.blocks import find_blocks
from signround.resume import finished_blocks
from signround.weights import GGUFSource, StreamingUnsupported, is_lazy, materialize_blocks, open_lazy


def _save(model, folder, tokenizer=None):
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", [a for a in CONFIGS if a != "gpt_neox"])
def test_lazy_model_matches_full_load(arch, tmp_path, smollm2_tokenizer):
    model = make(arch)
    lazy, _, source = open_lazy(str(_save(model, tmp_path, smollm2_tokenizer)))
    assert all(is_lazy(b) for b in find_blocks(lazy)[1])
    assert not is_lazy(lazy.get_input_embeddings())
    materialize_blocks(lazy, source)
    expected = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    got = {**dict(lazy.named_buffers()), **dict(lazy.named_parameters(remove_duplicate=False))}
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    ids = torch.randint(0, 128, (1, 12))
    torch.testing.assert_close(lazy(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_gguf_tensors_match_transformers_loader(tmp_path, bpe_tokenizer):
    """Dequantized per tensor by the gguf package, with llama.cpp's q/k row order undone: exactly what
    transformers' own GGUF loader builds."""
    import transformers as tf

    from signround.export import export
    from signround.export.gguf import FILE_NAME

    model = make("llama", vocab_size=len(bpe_tokenizer))
    signround.quantize(model, signround.QuantConfig(scheme=signround.WeightScheme(4, 32, False), method="rtn"))
    export(model, bpe_tokenizer, tmp_path, "gguf")
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=FILE_NAME, dtype=torch.float32)
    lazy, _, source = open_lazy(str(tmp_path / FILE_NAME))
    materialize_blocks(lazy, source)
    expected, got = theirs.state_dict(), lazy.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_gemma3_gguf_tensors_stream_under_their_hf_names(tmp_path):
    """llama.cpp stores Gemma's norm weights as 1 + w and leaves q/k rows in order: the streamed tensors are
    the model's own (the real Gemma-3 file against transformers' loader: tests/test_gemma3.py)."""
    import gguf

    model = make("gemma3")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, model.config.num_hidden_layers)
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "gemma3")
    for hf_name, value in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        if hf_name == "lm_head.weight":  # tied to the embedding: stored once
            continue
        gguf_name = f"{names.get_name(base)}.{suffix}"
        writer.add_tensor(gguf_name, (value + 1 if gguf_name.endswith("norm.weight") else value).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    source = GGUFSource(tmp_path / "tiny.gguf", skeleton)
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert source.names() == set(expected)
    got = source.tensors(sorted(expected))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def test_gguf_dequantizes_large_tensors_in_row_chunks(tmp_path, monkeypatch, bpe_tokenizer):
    """Rows dequantized a few at a time give the tensor dequantized whole."""
    import signround.weights as weights
    from signround.export import export
    from signround.export.gguf import FILE_NAME

    model = make("llama", vocab_size=len(bpe_tokenizer))
    signround.quantize(model, signround.QuantConfig(scheme=signround.WeightScheme(4, 32, False), method="rtn"))
    export(model, bpe_tokenizer, tmp_path, "gguf")
    lazy, _, source = open_lazy(str(tmp_path / FILE_NAME))
    whole = source.tensors(sorted(source.names()))
    monkeypatch.setattr(weights, "DEQUANTIZE_ROWS", 3)
    chunked = source.tensors(sorted(source.names()))
    for key in whole:
        assert torch.equal(whole[key], chunked[key]), key


def test_renamed_checkpoint_is_not_streamed(tmp_path, smollm2_tokenizer):
    """GPT-NeoX checkpoints store the head as embed_out: transformers renames it on load, so it is loaded whole."""
    with pytest.raises(StreamingUnsupported, match="names differ"):
        open_lazy(str(_save(make("gpt_neox"), tmp_path, smollm2_tokenizer)))


def test_streamed_quantization_saves_the_same_checkpoint(tiny_model_dir, tmp_path):
    config = signround.QuantConfig(scheme="W4A16G32", iters=4, nsamples=4, seqlen=16, batch_size=2)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))

    model, tokenizer = signround.load_model(str(tiny_model_dir))
    signround.quantize(model, config, tokenizer=tokenizer, calibration=ids)
    whole = signround.save(model, tmp_path / "whole", tokenizer)

    lazy, tokenizer, source = open_lazy(str(tiny_model_dir))
    work = tmp_path / "work"
    signround.quantize(lazy, config, tokenizer=tokenizer, calibration=ids, run=signround.RunConfig(work_dir=work), weights=source)
    assert all(is_lazy(b) for b in find_blocks(lazy)[1]), "finished blocks leave memory"
    streamed = signround.save(lazy, tmp_path / "streamed", tokenizer, weights=finished_blocks(work, lazy))
    assert (streamed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_run_holds_no_embedding_while_tuning(tied, tmp_path, smollm2_tokenizer):
    """Once block 0's inputs are captured the embedding (and a head tied to it) waits on the meta device,
    and comes back from the checkpoint, still tied, when the blocks are done."""
    model = make("llama", tie_word_embeddings=tied)
    lazy, tokenizer, source = open_lazy(str(_save(model, tmp_path / "model", smollm2_tokenizer)))
    seen = []
    config = signround.QuantConfig(scheme="W4A16G32", iters=2, nsamples=4, seqlen=16, batch_size=2)
    signround.quantize(lazy, config, tokenizer=tokenizer, calibration=torch.randint(0, 100, (4, 16)),
                       run=signround.RunConfig(work_dir=tmp_path / "work"), weights=source,
                       on_block_done=lambda i, report: seen.append((lazy.get_input_embeddings().weight.is_meta, lazy.lm_head.weight.is_meta)))
    assert seen and all(seen_embed and seen_head == tied for seen_embed, seen_head in seen), seen
    assert torch.equal(lazy.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(lazy.lm_head.weight, model.lm_head.weight)
    assert (lazy.lm_head.weight is lazy.get_input_embeddings().weight) == tied
