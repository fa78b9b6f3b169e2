"""EleutherAI lm-evaluation-harness as an optional back end (extra `eval`).

The in-memory model (original, fake-quantized or reloaded) is handed to lm-eval's own HFLM wrapper,
so lm-eval does its own tokenization, batching and scoring. Any task lm-eval can load works; a
BIG-bench task.json becomes a local lm-eval task (a JSONL file plus a task YAML written here) with the
same prompt format as signround's own scorer, so the two can be compared offline.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path

from .tasks import load_task

TASK_PREFIX = "signround_bigbench_"


def write_bigbench_task(json_path: str | Path, folder: str | Path) -> str:
    """Write `<name>.jsonl` and `<name>.yaml` for lm-eval into `folder`; return the lm-eval task name."""
    task = load_task(json_path)
    name = TASK_PREFIX + re.sub(r"\W+", "_", task.name).strip("_").lower()
    folder = Path(folder)
    data = folder / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for ex in task.examples:
            f.write(json.dumps({"context": ex.context, "choices": ex.choices, "gold": sorted(ex.correct)}) + "\n")
    # doc_to_* name fields of the documents; a list-valued target makes lm-eval accept any correct choice.
    yaml = "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: " "',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])
    (folder / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return name


@contextlib.contextmanager
def _without_quantization_config(config):
    """HFLM hands a config's `quantization_config` to transformers, which knows no "signround" method; the
    model is already built and runs its QuantLinear layers, so the entry is hidden while HFLM is set up."""
    saved = config.__dict__.pop("quantization_config", None)
    try:
        yield
    finally:
        if saved is not None:
            config.quantization_config = saved


def evaluate_with_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16) -> dict[str, dict]:
    """{task: {metric: value}} from lm-eval's `simple_evaluate` on the given in-memory model."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("lm-eval is not installed: pip install 'signround[eval]'") from None
    with tempfile.TemporaryDirectory(prefix="signround-lm-eval-") as folder:
        names = [write_bigbench_task(t, folder) if t.endswith(".json") and Path(t).is_file() else t for t in tasks]
        device = str(next(model.parameters()).device)
        with _without_quantization_config(model.config):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=folder), limit=limit,
                              log_samples=False, bootstrap_iters=1000, verbosity="WARNING")
    # lm-eval names metrics "acc,none", "acc_stderr,none" (metric, filter): keep the metric part
    return {name: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, float)} for name, metrics in out["results"].items()}
