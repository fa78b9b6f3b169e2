"""The measurement protocol of ../shared/data/README.md, so every benchmark measures the same way."""

from __future__ import annotations

import datetime
import os
import platform
import random
import tempfile
from pathlib import Path

import torch

# ../shared/data beside the checkout; SIGNROUND_BENCH_DATA names another copy (a device machine gets one carried)
DATA = Path(os.environ.get("SIGNROUND_BENCH_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
RESULTS = Path(__file__).resolve().parent / "results"


def _decode(raw: bytes) -> str:
    """Two of the books are Latin-1; the protocol names no encoding, so UTF-8 first, then Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def tokenizer_of(spec: str):
    """A model's tokenizer without loading its weights (a GGUF's is read from its metadata once, then cached)."""
    from signround.models import load_metadata, resolve

    return load_metadata(resolve(spec))[1]


def failure_line(error: Exception, width: int = 300) -> str:
    """An exception as one table cell: its type and the first line of its message."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:width] if text else ''}"


def needs_bos(tokenizer) -> bool:
    """Models whose tokenizer prepends BOS itself (Gemma) were trained always to see it: their calibration
    rows and perplexity windows start with it, as their users' inputs do (SmolLM2's tokenizer adds none)."""
    from signround.evaluate import use_bos

    return use_bos(tokenizer, "auto")


def gutenberg_calibration(tokenizer, nsamples: int = 128, seqlen: int = 512, data: Path = DATA) -> torch.Tensor:
    """"gutenberg-128x512": books joined by a blank line in sorted name order, 4,000-character slices at
    offsets from random.Random(0), each tokenized and cut to its first `seqlen` tokens (BOS and the first
    seqlen - 1 for a model that needs BOS)."""
    files = sorted((data / "gutenberg").glob("*.txt"))
    if not files:
        raise SystemExit(f"no gutenberg/*.txt under {data}: the benchmarks expect ../shared/data beside the checkout")
    text = "\n\n".join(_decode(f.read_bytes()) for f in files)
    rng = random.Random(0)
    rows, bos = [], int(needs_bos(tokenizer))
    for _ in range(nsamples):
        start = rng.randrange(0, len(text) - 4000)
        ids = tokenizer(text[start : start + 4000], add_special_tokens=False)["input_ids"]
        rows.append(([tokenizer.bos_token_id] if bos else []) + ids[: seqlen - bos])
    return torch.tensor(rows)


def wikitext_ids(tokenizer, max_tokens: int = 32768, data: Path = DATA) -> torch.Tensor:
    """"wt2-32k": wikitext-2 test tokenized whole, no special tokens, first 32,768 tokens."""
    from signround.evaluate import text_token_ids

    return text_token_ids(tokenizer, data / "wikitext-2" / "test.txt", max_tokens)


def prose_ids(tokenizer, max_tokens: int = 16384) -> torch.Tensor:
    """"prose-16k": the second held-out text, so a recipe is not tuned to wikitext alone: the shipped
    signround/data/heldout.txt (Austen's Persuasion, chapters 1-6, which no gutenberg-128x512 slice
    touches: the first one in that book starts ~157k characters in), its first 16,384 tokens."""
    from signround.calibration import shipped_text
    from signround.evaluate import text_token_ids

    return text_token_ids(tokenizer, shipped_text("heldout.txt"), max_tokens)


def scores(model, tokenizer, device: str = "cpu") -> dict[str, float]:
    """Perplexity on both held-out texts: "wt2-32k" (the README's protocol) and "prose-16k"; windows
    of 2,048 tokens, or BOS + 2,047 for a model that needs BOS."""
    return {"wt2": scored_perplexity(model, tokenizer, wikitext_ids(tokenizer), device),
            "prose": scored_perplexity(model, tokenizer, prose_ids(tokenizer), device)}


def scored_perplexity(model, tokenizer, ids: torch.Tensor, device: str = "cpu") -> float:
    from signround.evaluate import perplexity

    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    return perplexity(model, ids, seqlen=2048 - (bos is not None), bos_token_id=bos, device=device)


@torch.no_grad()
def block_errors(reference, model, ids: torch.Tensor) -> list[float]:
    """Each block's output error in `model` against `reference` (the unquantized model) on the rows `ids`,
    relative: ||h - h_ref||^2 / ||h_ref||^2 over every position but the first (Gemma keeps a huge
    attention-sink state there that would outweigh the rest). Tool-agnostic: the same numbers for any
    quantizer's output, so two tools' per-block errors compare on the same inputs."""
    errors = None
    for row in ids:  # the bodies alone: a 262k-token head would make gigabytes of logits nobody reads
        ref = reference.get_decoder()(input_ids=row.unsqueeze(0), output_hidden_states=True, use_cache=False).hidden_states[1:]
        got = model.get_decoder()(input_ids=row.unsqueeze(0).to(next(model.parameters()).device), output_hidden_states=True,
                                  use_cache=False).hidden_states[1:]
        pairs = [((g.float().cpu() - r.float())[:, 1:].pow(2).sum().item(), r.float()[:, 1:].pow(2).sum().item()) for g, r in zip(got, ref)]
        errors = pairs if errors is None else [(e + a, n + b) for (e, n), (a, b) in zip(errors, pairs)]
    return [e / n for e, n in errors]


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def truncate(model, layers: int | None):
    """Keep the model's first `layers` decoder blocks (all when None), also in its config."""
    from signround.blocks import find_blocks

    if layers:
        blocks = find_blocks(model)[1]
        del blocks[layers:]
        model.config.num_hidden_layers = len(blocks)
        if getattr(model.config, "layer_types", None):  # Gemma-3: one attention type per block
            model.config.layer_types = model.config.layer_types[:layers]
    return model


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak so far), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return status_mib("VmHWM")


def peak_device_mib(device: str) -> float | None:
    """The peak of torch's allocations on a GPU so far (None on the CPU, where RSS says it all)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None


def write_result(name: str, lines: list[str], echo: bool = True) -> Path:
    """A benchmark's markdown table under benchmarks/results/, stamped with when it was measured."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    while lines and not lines[-1]:  # a table ending in its own blank line gets one, not two, before the stamp
        lines = lines[:-1]
    path.write_text("\n".join([*lines, "", f"updated {datetime.datetime.now().isoformat(timespec='minutes')}"]) + "\n")
    if echo:
        print(path.read_text())
    return path


def reloaded_perplexity(model, tokenizer, eval_ids: torch.Tensor | None = None, device: str = "cpu") -> float:
    """Perplexity of `model` saved as a packed checkpoint and loaded back, on `eval_ids` (wt2-32k when None),
    scored as `scores` scores: what a user of the output folder gets (issue 2's bar: within 0.5% of the tuned model's)."""
    import signround

    with tempfile.TemporaryDirectory() as tmp:
        signround.save(model, Path(tmp) / "out", tokenizer)
        reloaded = signround.load(Path(tmp) / "out", device=device)
        return scored_perplexity(reloaded, tokenizer, wikitext_ids(tokenizer) if eval_ids is None else eval_ids, device)
