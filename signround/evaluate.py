"""Evaluation: perplexity on held-out text and the `eval` runner that gathers every metric into one record.

Perplexity follows ../shared/data/README.md's "wt2-32k" protocol by default: the text tokenized whole
without special tokens, the first `max_tokens` kept, non-overlapping windows of `seqlen`,
ppl = exp(total NLL / scored tokens)."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__


def is_hub_text(source: str | Path) -> bool:
    """`name:subset` or `org/name` that is not a local file: a hub dataset's test split."""
    path = Path(source)
    return not path.is_file() and (":" in str(source) or "/" in str(source) and not path.suffix)


def check_eval_text(source: str | Path) -> None:
    """Fail fast, before a model is loaded, on a perplexity text that is neither a file nor a hub name."""
    if not Path(source).is_file() and not is_hub_text(source):
        raise FileNotFoundError(f"perplexity text {source} not found: give a UTF-8 text file (or a hub dataset name when online)")


def read_eval_text(source: str | Path) -> str:
    """Text from a file, or the test split of a hub dataset (online), e.g. `wikitext:wikitext-2-raw-v1`."""
    check_eval_text(source)
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    import datasets  # optional extra: signround[data]

    name, _, subset = str(source).partition(":")
    ds = datasets.load_dataset(name, subset or None, split="test")
    return "\n\n".join(ds["text"])


def text_token_ids(tokenizer, source: str | Path, max_tokens: int | None = 32768) -> torch.Tensor:
    ids = torch.tensor(tokenizer(read_eval_text(source), add_special_tokens=False)["input_ids"])
    return ids[:max_tokens] if max_tokens else ids


LOGIT_ROWS = 256  # positions whose logits exist at once: 2,048 x 262k fp32 logits would be 2 GiB, twice over in log-softmax


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 2048, stride: int | None = None, bos_token_id: int | None = None, device=None) -> float:
    """exp(mean NLL) over windows of `seqlen` tokens, each scored on all but its first token.

    `stride` < seqlen gives overlapping windows that score only their last `stride` tokens.
    `bos_token_id` prepends BOS to every window (models trained to always see it, e.g. Gemma, Llama-2);
    the BOS is context only and never scored.
    """
    stride = stride or seqlen
    device = device or next(model.parameters()).device
    split = split_head(model, ids[: min(16, ids.numel())].to(device))
    nll, count = 0.0, 0
    for begin in range(0, ids.numel() - 1, stride):
        window = ids[begin : begin + seqlen]
        if window.numel() < 2:
            break
        inputs = window if bos_token_id is None else torch.cat([torch.tensor([bos_token_id]), window])
        losses = token_losses(model, inputs.to(device), split)
        if bos_token_id is not None:
            losses = losses[1:]
        if begin > 0 and stride < seqlen:
            losses = losses[-stride:]
        nll += losses.sum().item()
        count += losses.numel()
        if begin + seqlen >= ids.numel():
            break
    return math.exp(nll / count)


def token_losses(model, ids: torch.Tensor, split=None) -> torch.Tensor:
    """Cross-entropy of each next token of the 1-D `ids` (one fewer than ids), in fp32. With `split`
    (`split_head`), the logits are made LOGIT_ROWS positions at a time."""
    if split is None:
        logits = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        return F.cross_entropy(logits, ids[1:], reduction="none")
    body, head, softcap = split
    hidden = body(input_ids=ids.unsqueeze(0), use_cache=False).last_hidden_state[0, :-1]
    parts = []
    for start in range(0, hidden.shape[0], LOGIT_ROWS):
        logits = head(hidden[start : start + LOGIT_ROWS]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        parts.append(F.cross_entropy(logits, ids[1 + start : 1 + start + LOGIT_ROWS], reduction="none"))
    return torch.cat(parts)


def split_head(model, probe: torch.Tensor):
    """(decoder body, head, softcap) when the model's logits are its head applied to its body's last hidden
    states (Gemma's logit softcapping included), checked on `probe` tokens against the model's own forward;
    None otherwise (the logits are then made whole)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None or body is model or probe.numel() < 2:
        return None
    split = (body, head, getattr(model.config, "final_logit_softcapping", None))
    # the model's own forward first: a model may finish loading on its first call (compressed-tensors
    # decompresses its int8 and fp8 layers there), which calling its body alone would skip
    whole = token_losses(model, probe)
    try:
        chunked = token_losses(model, probe, split)
    except (TypeError, AttributeError):  # a body that takes other arguments or returns no last_hidden_state
        return None
    return split if torch.allclose(chunked, whole, rtol=1e-3, atol=1e-3) else None


def use_bos(tokenizer, mode: str) -> bool:
    """Whether perplexity windows start with BOS: as the tokenizer itself does (auto), always, or never."""
    if tokenizer.bos_token_id is None or mode == "no":
        return False
    if mode == "yes":
        return True
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


@dataclass
class EvalSettings:
    ppl: list[str] = field(default_factory=list)
    ppl_seqlen: int = 2048
    ppl_tokens: int | None = 32768
    ppl_stride: int | None = None
    bos: str = "auto"  # auto: prepend BOS exactly when the model's own tokenizer does; yes; no
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 16
    lm_eval_tasks: list[str] = field(default_factory=list)


def versions() -> dict[str, str]:
    import transformers

    found = {"signround": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import lm_eval

        found["lm_eval"] = getattr(lm_eval, "__version__", "unknown")
    except ImportError:
        pass
    return found


def run_eval(model, tokenizer, settings: EvalSettings, label: str = "") -> dict:
    """Every requested metric for one model, as a JSON-ready record."""
    from .tasks import evaluate_task, find_tasks, load_task

    start = time.perf_counter()
    qcfg = getattr(model.config, "quantization_config", None)
    record = {
        "model": label,
        "quantization": qcfg if isinstance(qcfg, dict) else None,
        "settings": {k: v for k, v in vars(settings).items()},
        "metrics": {"perplexity": {}, "tasks": {}, "lm_eval": {}},
    }
    bos = tokenizer.bos_token_id if use_bos(tokenizer, settings.bos) else None
    for source in settings.ppl:
        ids = text_token_ids(tokenizer, source, settings.ppl_tokens)
        record["metrics"]["perplexity"][str(source)] = {
            "ppl": perplexity(model, ids, settings.ppl_seqlen, settings.ppl_stride, bos), "tokens": ids.numel(), "seqlen": settings.ppl_seqlen}
    for path in find_tasks(settings.tasks):
        result = evaluate_task(model, tokenizer, load_task(path), settings.limit, settings.batch_size)
        record["metrics"]["tasks"][result.task] = result.to_dict()
    if settings.lm_eval_tasks:
        from .lm_eval_adapter import evaluate_with_lm_eval

        record["metrics"]["lm_eval"] = evaluate_with_lm_eval(model, tokenizer, settings.lm_eval_tasks, settings.limit, settings.batch_size)
    record["versions"] = versions()
    record["wall_seconds"] = time.perf_counter() - start
    return record


def format_record(record: dict) -> str:
    """A plain-text table of one eval record."""
    lines = [f"model: {record['model']}"]
    q = record.get("quantization")
    if q:
        lines.append(f"quantization: {q.get('method')} W{q.get('bits')} g{q.get('group_size')} {'sym' if q.get('sym') else 'asym'}")
    for source, m in record["metrics"]["perplexity"].items():
        lines.append(f"perplexity  {source}: {m['ppl']:.3f}  ({m['tokens']} tokens, seqlen {m['seqlen']})")
    if record["metrics"]["tasks"]:
        lines.append(f"{'task':40s} {'n':>5s} {'acc':>14s} {'acc_norm':>14s} {'chance':>7s}")
        for name, r in record["metrics"]["tasks"].items():
            lines.append(f"{name:40s} {r['n']:5d} {r['acc']:7.3f}±{r['acc_stderr']:.3f} {r['acc_norm']:7.3f}±{r['acc_norm_stderr']:.3f} {r['chance']:7.3f}")
    for name, r in record["metrics"]["lm_eval"].items():
        lines.append(f"lm-eval {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float)))
    lines.append(f"wall time: {record['wall_seconds']:.1f} s")
    return "\n".join(lines)
