"""`signround demo` runs on what the package ships: no network, no ../shared (a tiny model here; the
real one with `make demo`)."""

import math

import pytest

from signround.calibration import shipped_text
from signround.cli import main
from signround.demo import _table, run_demo


def test_demo_compares_three_models_and_generates_from_the_reloaded_one(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # nothing relative to the checkout is read
    said = []
    rows = run_demo(str(tiny_model_dir), tmp_path / "out", scheme="W4A16G32", iters=2, nsamples=4, seqlen=32, batch_size=2,
                    eval_tokens=256, progress=False, say=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert list(rows) == ["original (fp32)", "round-to-nearest W4A16G32", "SignRound W4A16G32"]
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows.values())
    assert rows["SignRound W4A16G32"]["bits"] == pytest.approx(rows["round-to-nearest W4A16G32"]["bits"])
    assert 4 < rows["SignRound W4A16G32"]["bits"] < 5
    text = "\n".join(said)
    assert str(shipped_text("calibration.txt").name) in text and "heldout.txt" in text  # says what it used
    assert "| SignRound W4A16G32 |" in text and "reloaded from" in text
    assert (tmp_path / "out" / "config.json").is_file()


def test_table_states_the_share_of_the_gap_closed():
    rows = {"a": {"bits": 32, "seconds": None, "ppl": 10.0}, "b": {"bits": 3.2, "seconds": 1, "ppl": 30.0},
            "c": {"bits": 3.2, "seconds": 60, "ppl": 15.0}}
    assert "SignRound closes 75% of round-to-nearest's perplexity gap" in _table(rows)


def test_demo_command_refuses_a_bad_setting_in_one_line(capsys, tmp_path):
    assert main(["demo", "--model", str(tmp_path / "nothing"), "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("signround: error: unknown model")


def test_demo_never_replaces_a_folder_that_is_not_its_own_output(tmp_path, tiny_model_dir):
    from signround.checkpoint import OutputExistsError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not an earlier signround output"):
        run_demo(str(tiny_model_dir), mine, iters=1, nsamples=2, seqlen=16, batch_size=2, eval_tokens=64, progress=False, say=lambda *a, **k: None)
    assert (mine / "thesis.txt").read_text() == "keep me"
