"""`signround demo`: what SignRound buys over round-to-nearest, shown on the built-in model in ~10 minutes.

Perplexity of the original model, of plain round-to-nearest (RTN) and of SignRound at the same scheme,
on held-out public-domain text shipped with the package (so every machine, online or not, gets the
same numbers), with bits per weight and tuning time; then the saved SignRound model is reloaded and
continues a prompt. Calibration is the package's own public-domain text, so no network or data
folder is needed.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

# 3 bits is where rounding costs a small model the most and SignRound wins the most back per minute of
# tuning; these settings finish in about 10 minutes on 2 CPU cores (benchmarks/results/README.md)
DEMO = {"scheme": "W3A16", "iters": 48, "nsamples": 32, "seqlen": 512, "batch_size": 4, "eval_tokens": 8192}
PROMPT = "The capital of France is"


def run_demo(model: str = "smollm2-135m", output: str | Path = "demo-out", *, scheme: str = DEMO["scheme"], iters: int = DEMO["iters"],
             nsamples: int = DEMO["nsamples"], seqlen: int = DEMO["seqlen"], batch_size: int = DEMO["batch_size"],
             eval_tokens: int = DEMO["eval_tokens"], progress: bool = True, say=print) -> dict:
    """Run the comparison, print it with `say`, and return its rows ({label: {bits, seconds, ppl}})."""
    import torch

    from . import checkpoint, models
    from .calibration import shipped_text
    from .config import QuantConfig, RunConfig
    from .evaluate import perplexity, text_token_ids, use_bos
    from .pipeline import quantize
    from .runner import run

    _check_replaceable(Path(output))
    calibration, heldout = shipped_text("calibration.txt"), shipped_text("heldout.txt")
    say(f"model: {model}; calibration: {nsamples} x {seqlen} tokens of {calibration.name}, held-out perplexity: "
        f"{eval_tokens} tokens of {heldout.name} (public-domain texts shipped in {calibration.parent})", flush=True)
    original, tokenizer = models.load(model)
    ids = text_token_ids(tokenizer, heldout, eval_tokens)
    bos = tokenizer.bos_token_id if use_bos(tokenizer, "auto") else None

    def score(m) -> float:
        return perplexity(m, ids, seqlen=min(2048, ids.numel()), bos_token_id=bos)

    rows = {"original (fp32)": {"bits": 32.0, "seconds": None, "ppl": score(original)}}
    say(f"original: perplexity {rows['original (fp32)']['ppl']:.3f}", flush=True)
    config = QuantConfig(scheme=scheme, iters=iters, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size)
    rtn = copy.deepcopy(original)
    start = time.perf_counter()
    report = quantize(rtn, QuantConfig(scheme=scheme, method="rtn"), RunConfig(progress=False))
    rows[f"round-to-nearest {scheme}"] = {"bits": report.bits_per_weight, "seconds": time.perf_counter() - start, "ppl": score(rtn)}
    say(f"round-to-nearest: perplexity {rows[f'round-to-nearest {scheme}']['ppl']:.3f}", flush=True)
    del rtn
    say(f"SignRound {scheme}: {config.resolved().iters} steps of {batch_size} rows per block ...", flush=True)
    # the model already in memory: opening it again would parse its files (and convert a GGUF tokenizer) twice
    report = run(original, output, config, RunConfig(progress=progress, resume="never"), calibration=calibration, overwrite=True,
                 tokenizer=tokenizer)
    del original
    tuned = checkpoint.load(output)  # what a user gets back from disk
    rows[f"SignRound {scheme}"] = {"bits": report.bits_per_weight, "seconds": report.tuning_seconds, "ppl": score(tuned)}
    say(_table(rows), flush=True)
    prompt = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=bos is not None).input_ids
    with torch.no_grad():
        out = tuned.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    say(f"\nreloaded from {Path(output).resolve()}: {tokenizer.decode(out[0], skip_special_tokens=True)!r}", flush=True)
    return rows


def _check_replaceable(output: Path) -> None:
    """The demo replaces its own earlier output, never a folder holding anything else."""
    from .checkpoint import OutputExistsError
    from .models import is_signround_output

    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not is_signround_output(str(output)):
        raise OutputExistsError(f"{output} exists and is not an earlier signround output: choose another -o for the demo")


def _table(rows: dict) -> str:
    """The rows side by side, with the share of round-to-nearest's perplexity gap that SignRound closes."""
    lines = ["", "| model | bits per weight | tuning s | held-out perplexity |", "|---|---|---|---|"]
    for label, row in rows.items():
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(f"| {label} | {row['bits']:.2f} | {seconds} | {row['ppl']:.3f} |")
    fp, rtn, tuned = (row["ppl"] for row in rows.values())
    if rtn > fp:
        lines.append(f"\nSignRound closes {(rtn - tuned) / (rtn - fp):.0%} of round-to-nearest's perplexity gap to the original, "
                     f"at the same size.")
    return "\n".join(lines)
