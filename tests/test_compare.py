import json

from signround.compare import GridSettings, run_grid, series, write_report
from signround.evaluate import EvalSettings

PNG = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_report_with_plots_and_reuses_runs(tmp_path, tiny_model_dir):
    text = tmp_path / "eval.txt"
    text.write_text("the cat sat on the mat while the dog slept by the door. " * 40)
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"name": "toy", "examples": [
        {"input": "The sky is", "target_scores": {"blue": 1, "green": 0}},
        {"input": "Two plus two is", "target_scores": {"four": 1, "five": 0}}]}))
    grid = GridSettings(str(tiny_model_dir), ["rtn", "signround"], ["W4A16G32"], ["--iters", "2", "--nsamples", "2", "--seqlen", "32", "--dataset", str(text)])
    evaluation = EvalSettings(ppl=[str(text)], ppl_tokens=256, ppl_seqlen=64, tasks=[str(task)])
    out = tmp_path / "report"
    messages = []
    results = run_grid(grid, evaluation, out, log=messages.append)
    assert [r["name"] for r in results] == ["original", "rtn-W4A16G32", "signround-W4A16G32"]
    report = write_report(results, out).read_text()
    assert "| rtn-W4A16G32 | 4.625 |" in report and "toy acc" in report
    for png in ("ppl_vs_bits_eval.png", "block_losses.png"):
        assert (out / png).read_bytes()[:8] == PNG and f"]({png})" in report
    tuned = results[2]["quantization_report"]
    assert len(tuned["block_losses"]) == 2 and all(b is not None for b, _ in tuned["block_losses"])
    messages.clear()
    again = run_grid(grid, evaluation, out, log=messages.append)
    assert all("reusing" in m for m in messages) and [r["key"] for r in again] == [r["key"] for r in results]
    messages.clear()
    run_grid(grid, EvalSettings(ppl=[str(text)], ppl_tokens=128, ppl_seqlen=64), out, log=messages.append)
    assert "rtn-W4A16G32: reusing the quantized model, evaluating again" in messages


def test_compare_plots_bit_budget_runs_beside_uniform_ones(tmp_path, tiny_model_dir):
    text = tmp_path / "eval.txt"
    text.write_text("the cat sat on the mat while the dog slept by the door. " * 40)
    grid = GridSettings(str(tiny_model_dir), ["rtn"], ["W2A16G32", "W4A16G32"],
                        ["--nsamples", "2", "--seqlen", "32", "--dataset", str(text), "--options", "W2A16G32,W4A16G32"], target_bits=[3.0])
    out = tmp_path / "report"
    results = run_grid(grid, EvalSettings(ppl=[str(text)], ppl_tokens=256, ppl_seqlen=64), out, log=lambda m: None)
    assert [r["name"] for r in results] == ["original", "rtn-W2A16G32", "rtn-W4A16G32", "rtn-target3"]
    assert [series(r["scheme"]) for r in results] == ["original", "uniform", "uniform", "bit budget"]
    budgeted = results[-1]["quantization_report"]
    assert budgeted["bits_per_weight"] <= 3.0 and budgeted["plan"].startswith("bit-budget plan")
    report = write_report(results, out).read_text()
    assert "| rtn-target3 |" in report and (out / "ppl_vs_bits_eval.png").read_bytes()[:8] == PNG
