import pytest

from signround.models import ModelNotFoundError, is_signround_output, load, resolve


def test_resolve_kinds(tmp_path, tiny_model_dir):
    assert resolve("smollm2-135m").gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve(str(tiny_model_dir)).kind == "folder"
    assert resolve("some-org/some-model").kind == "hub"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve(str(tmp_path / "m.gguf")).kind == "gguf"
    assert not is_signround_output(str(tiny_model_dir))


@pytest.mark.parametrize("spec", ["nope", "./missing-folder", "model.bin"])
def test_unknown_models_name_what_is_accepted(spec):
    with pytest.raises(ModelNotFoundError, match="a .gguf file, a hub id such as org/name .online., or a built-in name .smollm2-135m."):
        resolve(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve(str(tmp_path))


def test_hub_id_offline_gives_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="could not load 'some-org/surely-not-a-model' from the hub"):
        load("some-org/surely-not-a-model")


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path):
    import torch
    from tiny_models import make

    from signround.models import UnsafeCheckpointError

    model = make("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert not list(tmp_path.glob("*.safetensors")) and list(tmp_path.glob("*.bin"))
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        load(str(tmp_path))


@pytest.fixture
def tiny_gguf(tmp_path, bpe_tokenizer):
    """A tiny LLaMA exported to GGUF (RTN W4 g32) with a small BPE tokenizer in its metadata."""
    from tiny_models import make

    import signround
    from signround.export import export
    from signround.export.gguf import FILE_NAME

    model = make("llama", vocab_size=len(bpe_tokenizer))
    signround.quantize(model, signround.QuantConfig(scheme=signround.WeightScheme(4, 32, False), method="rtn"))
    export(model, bpe_tokenizer, tmp_path / "model", "gguf")
    return tmp_path / "model" / FILE_NAME


def test_gguf_metadata_is_parsed_once_then_read_from_the_cache(tiny_gguf, tmp_path, monkeypatch):
    """The first open saves config and tokenizer as a folder; a later open reads that folder and not the
    file's metadata (shown by damaging the metadata without changing size or mtime), and a changed file
    gets a folder of its own."""
    import os

    from transformers import AutoConfig, AutoTokenizer

    from signround.models import load_metadata

    monkeypatch.setenv("SIGNROUND_CACHE", str(tmp_path / "cache"))
    source = resolve(str(tiny_gguf))
    config, tokenizer = load_metadata(source)
    assert len(list((tmp_path / "cache" / "gguf-metadata").iterdir())) == 1
    text = "The capital of France is Paris."
    assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)(text).input_ids
    assert config.to_dict() == AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file).to_dict()

    stat = tiny_gguf.stat()
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = b"\xff\xff\xff\xff"  # the format version: no reader accepts it
    tiny_gguf.write_bytes(bytes(data))
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_metadata(source)[0].to_dict() == config.to_dict()

    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(Exception):  # noqa: B017 - a new key: the damaged metadata is parsed, and fails
        load_metadata(source)


def test_unwritable_cache_warns_and_reads_the_file(tiny_gguf, tmp_path, monkeypatch):
    from signround.models import load_metadata

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SIGNROUND_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not cache .* parses the file again .set SIGNROUND_CACHE to a writable folder."):
        config, tokenizer = load_metadata(resolve(str(tiny_gguf)))
    assert config.model_type == "llama" and tokenizer("Paris").input_ids
