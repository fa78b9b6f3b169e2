"""Perplexity on held-out text, following ../shared/data/README.md's "wt2-32k" protocol by default:
the text tokenized whole without special tokens, the first `max_tokens` kept, non-overlapping windows
of `seqlen`, ppl = exp(total NLL / scored tokens)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def text_token_ids(tokenizer, path: str | Path, max_tokens: int | None = 32768) -> torch.Tensor:
    text = Path(path).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[:max_tokens] if max_tokens else ids


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 2048, stride: int | None = None, device=None) -> float:
    """exp(mean NLL) over windows of `seqlen` tokens, each window scored on all but its first token.
    `stride` < seqlen gives overlapping windows that score only their last `stride` tokens."""
    stride = stride or seqlen
    device = device or next(model.parameters()).device
    nll, count = 0.0, 0
    for begin in range(0, ids.numel() - 1, stride):
        window = ids[begin : begin + seqlen]
        if window.numel() < 2:
            break
        logits = model(input_ids=window.unsqueeze(0).to(device), use_cache=False).logits[0].float()
        targets = window[1:].to(device)
        losses = F.cross_entropy(logits[:-1], targets, reduction="none")
        if begin > 0 and stride < seqlen:
            losses = losses[-stride:]
        nll += losses.sum().item()
        count += losses.numel()
        if begin + seqlen >= ids.numel():
            break
    return math.exp(nll / count)
