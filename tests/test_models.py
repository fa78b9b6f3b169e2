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
