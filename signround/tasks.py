"""Zero-shot multiple-choice accuracy on BIG-bench-style JSON tasks (`examples[].input`, `target_scores`).

Each choice is scored by the summed log-likelihood of `" " + choice` after `input.strip()`; the best
choice counts as correct when its target score is positive. Context and continuation are split the way
lm-evaluation-harness splits them (encode the whole string, the continuation is what follows the
context's tokens; an empty context becomes the BOS token), so the two agree example for example.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


class TaskFormatError(ValueError):
    """A task file that is not BIG-bench multiple-choice JSON; the message names the file and the entry."""


@dataclass
class Example:
    context: str
    choices: list[str]
    correct: set[int]


@dataclass
class Task:
    name: str
    examples: list[Example]

    @property
    def chance(self) -> float:
        return sum(len(e.correct) / len(e.choices) for e in self.examples) / len(self.examples)


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    chance: float

    def to_dict(self) -> dict:
        return asdict(self)


def load_task(path: str | Path) -> Task:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"task file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskFormatError(f"task file {path} is not valid JSON ({e}): give a BIG-bench task.json") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        raise TaskFormatError(f"task file {path} has no 'examples' list: expected BIG-bench JSON with examples[].input and target_scores")
    parsed = []
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(scores, dict) or len(scores) < 2:
            raise TaskFormatError(f"task file {path}: examples[{i}] needs a string 'input' and a 'target_scores' object with at least two choices")
        choices = list(scores)
        correct = {j for j, c in enumerate(choices) if float(scores[c]) > 0}
        if not correct:
            raise TaskFormatError(f"task file {path}: examples[{i}] has no choice with a positive target score")
        parsed.append(Example(ex["input"].strip(), choices, correct))
    return Task(path.stem if path.stem != "task" else (data.get("name") or path.parent.name), parsed)  # BIG-bench names are sub-task names


def find_tasks(paths: list[str | Path]) -> list[Path]:
    """Task files from files and folders (every *.json in a folder, sorted)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"task path {p} not found: give BIG-bench task .json files or a folder of them")
    return files


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; an empty context becomes BOS."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx) :]


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[float]:
    """Summed log-probability of each continuation given its context, batched longest-first."""
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    results = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        seqs = [requests[i][0] + requests[i][1] for i in batch]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logprobs = F.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float(), dim=-1)
        for row, i in enumerate(batch):
            ctx, cont = requests[i]
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=device)
            results[i] = logprobs[row, positions, torch.tensor(cont, device=device)].sum().item()
    return results


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate_task(model, tokenizer, task: Task, limit: int | None = None, batch_size: int = 16) -> TaskResult:
    """Raw and length-normalised (log-likelihood per character of the choice) accuracy with standard errors."""
    examples = task.examples[:limit] if limit else task.examples
    requests, spans = [], []
    for ex in examples:
        spans.append((len(requests), len(ex.choices)))
        requests += [encode_pair(tokenizer, ex.context, " " + c) for c in ex.choices]
    lls = loglikelihoods(model, requests, batch_size)
    hits, hits_norm = [], []
    for ex, (begin, count) in zip(examples, spans):
        scores = lls[begin : begin + count]
        normed = [s / len(c) for s, c in zip(scores, ex.choices)]  # per character of the choice, as lm-eval's acc_norm
        hits.append(float(max(range(count), key=scores.__getitem__) in ex.correct))
        hits_norm.append(float(max(range(count), key=normed.__getitem__) in ex.correct))
    acc, acc_se = _mean_stderr(hits)
    norm, norm_se = _mean_stderr(hits_norm)
    chance = Task(task.name, examples).chance
    return TaskResult(task.name, len(examples), acc, acc_se, norm, norm_se, chance)
