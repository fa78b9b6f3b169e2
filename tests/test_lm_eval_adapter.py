import json

import pytest
from tiny_models import make

from signround.lm_eval_adapter import evaluate_with_lm_eval, write_bigbench_task
from signround.tasks import evaluate_task, load_task


def test_bigbench_json_becomes_an_lm_eval_task(tmp_path):
    src = tmp_path / "My Task.json"
    src.write_text(json.dumps({"name": "My Task", "examples": [{"input": " Q? ", "target_scores": {"a": 0, "b": 1, "c": 1}}]}))
    name = write_bigbench_task(src, tmp_path)
    assert name == "signround_bigbench_my_task"
    doc = json.loads((tmp_path / f"{name}.jsonl").read_text())
    assert doc == {"context": "Q?", "choices": ["a", "b", "c"], "gold": [1, 2]}
    assert "doc_to_target: gold" in (tmp_path / f"{name}.yaml").read_text()


def test_lm_eval_agrees_with_own_scorer_offline(smollm2_tokenizer, shared_data):
    model = make("llama", vocab_size=len(smollm2_tokenizer), seed=1)
    path = shared_data / "tasks" / "physical_intuition.json"
    ours = evaluate_task(model, smollm2_tokenizer, load_task(path), limit=30)
    theirs = evaluate_with_lm_eval(model, smollm2_tokenizer, [str(path)], limit=30, batch_size=8)["signround_bigbench_physical_intuition"]
    assert theirs["acc"] == pytest.approx(ours.acc, abs=0.01)
    assert theirs["acc_norm"] == pytest.approx(ours.acc_norm, abs=0.01)
