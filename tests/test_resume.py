"""Resume: a run stopped after block k and started again writes exactly what an uninterrupted run writes."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import calib_ids, make

import signround
from signround.algorithms.signround import SignRound
from signround.config import QuantConfig, RunConfig
from signround.resume import ResumeMismatch

CONFIG = dict(scheme="W4A16G32", iters=6, nsamples=8, seqlen=16, batch_size=4)


def packed(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def stop_at_block(monkeypatch, k: int) -> None:
    original = SignRound.quantize_block

    def interrupted(self, block, layers, data, config):
        if data.index == k:
            raise KeyboardInterrupt
        return original(self, block, layers, data, config)

    monkeypatch.setattr(SignRound, "quantize_block", interrupted)


def interrupted_run(monkeypatch, work: Path, k: int) -> None:
    """A 4-block run into `work` stopped by Ctrl-C at block k."""
    with monkeypatch.context() as patch:
        stop_at_block(patch, k)
        with pytest.raises(KeyboardInterrupt):
            signround.quantize(make("llama", num_hidden_layers=4), QuantConfig(**CONFIG), calibration=calib_ids(), run=RunConfig(work_dir=work))


def tuned_blocks(monkeypatch) -> list[int]:
    """The indices of the blocks tuned from now on, in order."""
    calls, original = [], SignRound.quantize_block
    monkeypatch.setattr(SignRound, "quantize_block", lambda self, *a: calls.append(a[2].index) or original(self, *a))
    return calls


@pytest.mark.parametrize("k", [1, 3])
def test_interrupted_run_resumes_to_identical_weights(monkeypatch, tmp_path, k):
    reference = make("llama", num_hidden_layers=4)
    ref_report = signround.quantize(reference, QuantConfig(**CONFIG), calibration=calib_ids())

    work = tmp_path / "work"
    with monkeypatch.context() as patch:
        stop_at_block(patch, k)
        with pytest.raises(KeyboardInterrupt):
            signround.quantize(make("llama", num_hidden_layers=4), QuantConfig(**CONFIG), calibration=calib_ids(), run=RunConfig(work_dir=work))
    assert json.loads((work / "state.json").read_text())["finished"] == k

    calls = []
    original = SignRound.quantize_block
    monkeypatch.setattr(SignRound, "quantize_block", lambda self, *a: calls.append(a[2].index) or original(self, *a))
    resumed = make("llama", num_hidden_layers=4)
    report = signround.quantize(resumed, QuantConfig(**CONFIG), calibration=calib_ids(), run=RunConfig(work_dir=work))
    assert calls == list(range(k, 4))  # finished blocks are not tuned again
    assert_identical(packed(resumed), packed(reference))
    assert report.block_losses == ref_report.block_losses and report.calibration_shape == ref_report.calibration_shape


def test_offloaded_caches_resume_to_what_memory_caches_give(monkeypatch, tmp_path):
    """Caches on disk change where the hidden states live, not the result; bf16 caches resume too."""
    config = QuantConfig(**CONFIG)
    reference = make("llama", num_hidden_layers=4)
    signround.quantize(reference, config, RunConfig(cache_dtype="bfloat16"), calibration=calib_ids())

    work = tmp_path / "work"
    with monkeypatch.context() as patch:
        stop_at_block(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            signround.quantize(make("llama", num_hidden_layers=4), config, calibration=calib_ids(),
                               run=RunConfig(work_dir=work, offload=True, cache_dtype="bfloat16"))
    resumed = make("llama", num_hidden_layers=4)
    signround.quantize(resumed, config, calibration=calib_ids(), run=RunConfig(work_dir=work, offload=True, cache_dtype="bfloat16"))
    assert_identical(packed(resumed), packed(reference))
    assert not any((work / "caches").iterdir()), "every cache file is removed once its block is done"


def test_a_different_run_keeps_the_finished_blocks_until_told(monkeypatch, tmp_path, caplog):
    """Changed settings (or a changed torch or signround version) make finished blocks unusable as they
    are; they were once deleted without asking. Now the run refuses, says why and keeps them; --resume
    (force) continues with them, --restart (never) discards them."""
    work = tmp_path / "work"
    interrupted_run(monkeypatch, work, 2)
    state = json.loads((work / "state.json").read_text())
    state["fingerprint"]["torch"] = "1.0.0"  # as if written by another torch
    (work / "state.json").write_text(json.dumps(state))
    kept = sorted(p.name for p in work.iterdir())

    for changed in (QuantConfig(**CONFIG), QuantConfig(**{**CONFIG, "iters": 7})):
        with pytest.raises(ResumeMismatch, match=r"holds 2 finished blocks of a run that differs in .*torch \(1.0.0 -> .*they are kept"):
            signround.quantize(make("llama", num_hidden_layers=4), changed, calibration=calib_ids(), run=RunConfig(work_dir=work))
        assert sorted(p.name for p in work.iterdir()) == kept

    with caplog.at_level(logging.WARNING, logger="signround"):
        model = make("llama", num_hidden_layers=4)
        signround.quantize(model, QuantConfig(**CONFIG), calibration=calib_ids(), run=RunConfig(work_dir=work, resume="force"))
    assert "although the run differs in: torch (1.0.0 -> " in caplog.text and "(forced)" in caplog.text
    assert json.loads((work / "state.json").read_text())["finished"] == 4

    other_data = calib_ids(seed=1)
    with pytest.raises(ResumeMismatch, match="differs in calibration"):
        signround.quantize(make("llama", num_hidden_layers=4), QuantConfig(**CONFIG), calibration=other_data, run=RunConfig(work_dir=work))


def test_the_cli_says_so_in_one_line_and_keeps_the_blocks(monkeypatch, tmp_path, capsys, tiny_model_dir):
    from signround.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    argv = ["quantize", str(tiny_model_dir), "-o", str(out), "--scheme", "W4A16G32", "--nsamples", "4", "--seqlen", "16",
            "--dataset", str(text), "-q", "--iters"]
    work = tmp_path / "out.signround-work"
    with monkeypatch.context() as patch:
        stop_at_block(patch, 1)
        assert main([*argv, "2"]) == 130
    assert main([*argv, "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("signround: error: ") and "iters (2 -> 3)" in err and "--restart" in err
    assert json.loads((work / "state.json").read_text())["finished"] == 1
    assert main([*argv, "3", "--restart"]) == 0 and not work.exists()


def test_restart_discards_saved_state(monkeypatch, tmp_path):
    work = tmp_path / "work"
    interrupted_run(monkeypatch, work, 2)
    calls = tuned_blocks(monkeypatch)
    signround.quantize(make("llama", num_hidden_layers=4), QuantConfig(**CONFIG), calibration=calib_ids(), run=RunConfig(work_dir=work, resume="never"))
    assert calls == [0, 1, 2, 3]


def _cli(out: Path, model: Path, text: Path) -> list[str]:
    return [sys.executable, "-m", "signround.cli", "quantize", str(model), "-o", str(out), "--scheme", "W4A16G32", "--iters", "60",
            "--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--dataset", str(text), "-q"]


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama-6")
    make("llama", num_hidden_layers=6, vocab_size=len(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    text = folder / "calib.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 100)
    return folder, text


def _finished(work: Path) -> int:
    try:
        return json.loads((work / "state.json").read_text())["finished"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.parametrize("k", [1, 4])
def test_sigkill_mid_run_then_same_command_gives_identical_output(tmp_path, deep_model, k):
    model, text = deep_model
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cli(reference, model, text), check=True, env=env, capture_output=True)

    out = tmp_path / "out"
    work = out.parent / "out.signround-work"
    proc = subprocess.Popen(_cli(out, model, text), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _finished(work) < k and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _finished(work)
    assert k <= killed_at < 6 and not out.exists(), "the kill must land mid-run"

    result = subprocess.run(_cli(out, model, text), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {work}: {killed_at} blocks already finished" in result.stderr
    assert not work.exists()
    assert load_file(out / "model.safetensors").keys() == load_file(reference / "model.safetensors").keys()
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert (out / "config.json").read_text() == (reference / "config.json").read_text()


def test_a_work_dir_that_is_no_work_folder_is_refused_untouched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ResumeMismatch, match="holds files but no state.json"):
        signround.quantize(make("llama"), QuantConfig(**CONFIG), calibration=calib_ids(), run=RunConfig(work_dir=mine))
    assert (mine / "notes.txt").read_text() == "keep me"


def test_offloaded_caches_without_a_work_dir_leave_nothing_behind(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    signround.quantize(make("llama"), QuantConfig(**CONFIG), calibration=calib_ids(), run=RunConfig(offload=True))
    assert not list(tmp_path.glob("signround-caches-*"))


def test_fingerprints_of_the_version_before_the_run_settings_moved_still_resume(monkeypatch, tmp_path):
    """States written when device and amp were quantization settings compare equal on everything else."""
    work = tmp_path / "work"
    interrupted_run(monkeypatch, work, 2)
    state = json.loads((work / "state.json").read_text())
    state["fingerprint"].update({"setting.device": "auto", "setting.amp": "auto"})
    (work / "state.json").write_text(json.dumps(state))
    calls = tuned_blocks(monkeypatch)
    signround.quantize(make("llama", num_hidden_layers=4), QuantConfig(**CONFIG), calibration=calib_ids(), run=RunConfig(work_dir=work))
    assert calls == [2, 3]
