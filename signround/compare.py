"""`signround compare`: quantize one model over a grid of methods x schemes, evaluate every result and
the original, and write a report folder (markdown table + PNG plots).

Each quantization runs in its own process, so its peak memory is its own, and writes its output
folder and report into `<report>/runs/<method>-<scheme>/`. A run whose settings match what is on disk
is reused, so a grid can be extended or resumed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .evaluate import EvalSettings, run_eval

RESULT = "result.json"


@dataclass
class GridSettings:
    model: str
    methods: list[str] = field(default_factory=lambda: ["rtn", "signround"])
    schemes: list[str] = field(default_factory=lambda: ["W2A16G64", "W3A16", "W4A16"])
    quantize_args: list[str] = field(default_factory=list)  # extra `signround quantize` flags (iters, nsamples, dataset...)
    target_bits: list[float] = field(default_factory=list)  # --target-bits runs (mixed precision), per method

    def runs(self) -> list[tuple[str, str | None, str | None]]:
        """(run name, method, scheme) of the original and every quantization; a bit-budget run's scheme is `target<B>`."""
        grid = [(f"{m}-{s}", m, s) for m in self.methods for s in self.schemes]
        grid += [(f"{m}-target{b:g}", m, f"target{b:g}") for m in self.methods for b in self.target_bits]
        return [("original", None, None)] + grid


def series(scheme: str | None) -> str:
    """Which curve a run belongs to: uniform schemes, llama.cpp's K mixtures, or bit-budget plans."""
    from .mixtures import find_mixture

    if scheme is None:
        return "original"
    return "bit budget" if scheme.startswith("target") else "K mixture" if find_mixture(scheme) else "uniform"


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stored_result(folder: Path) -> dict:
    f = folder / RESULT
    return json.loads(f.read_text()) if f.is_file() else {}


def _quantize(model: str, method: str, scheme: str, extra: list[str], folder: Path) -> dict:
    report = folder / "quantize-report.json"
    choice = ["--target-bits", scheme.removeprefix("target")] if scheme.startswith("target") else ["--scheme", scheme]
    cmd = [sys.executable, "-m", "signround.cli", "quantize", model, "-o", str(folder / "model"), "--overwrite", "-q",
           "--method", method, *choice, "--report-json", str(report), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"quantizing {method} {scheme} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(report.read_text())


def run_grid(grid: GridSettings, evaluation: EvalSettings, out: Path, log=print) -> list[dict]:
    """Every run's result (the original model first), computing only what is not on disk yet."""
    from .models import load_any

    out.mkdir(parents=True, exist_ok=True)
    results = []
    eval_key = asdict(evaluation)
    for name, method, scheme in grid.runs():
        folder = out / "runs" / name
        folder.mkdir(parents=True, exist_ok=True)
        quant_key = _fingerprint([grid.model, method, scheme, grid.quantize_args])
        key = _fingerprint([quant_key, eval_key])
        previous = _stored_result(folder)
        if previous.get("key") == key:
            log(f"{name}: reusing {folder / RESULT}")
            results.append(previous)
            continue
        quant = None
        if scheme is not None:
            if previous.get("quant_key") == quant_key and (folder / "model").is_dir():
                quant = previous["quantization_report"]
                log(f"{name}: reusing the quantized model, evaluating again")
            else:
                log(f"{name}: quantizing")
                quant = _quantize(grid.model, method, scheme, grid.quantize_args, folder)
        log(f"{name}: evaluating")
        model, tokenizer = load_any(grid.model if scheme is None else str(folder / "model"))
        record = run_eval(model, tokenizer, evaluation, label=name)
        size = sum(f.stat().st_size for f in (folder / "model").glob("*.safetensors")) if scheme else _original_size(model)
        result = {"name": name, "method": method, "scheme": scheme, "key": key, "quant_key": quant_key,
                  "quantization_report": quant, "eval": record, "size_bytes": size}
        (folder / RESULT).write_text(json.dumps(result, indent=1, default=str))
        results.append(result)
    return results


def _original_size(model) -> int:
    return sum(p.numel() * 2 for p in model.parameters())  # as a 16-bit checkpoint


def write_report(results: list[dict], out: Path) -> Path:
    """report.md with the comparison table and the plots it links."""
    from . import plots

    tasks = sorted({t for r in results for t in r["eval"]["metrics"]["tasks"]})
    ppl_sources = sorted({s for r in results for s in r["eval"]["metrics"]["perplexity"]})
    header = ["run", "bits/weight", "size MB"] + [f"ppl {Path(s).name}" for s in ppl_sources] + [f"{t} acc" for t in tasks] + ["tuning s", "peak mem GiB"]
    lines = ["# signround compare", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        q = r["quantization_report"] or {}
        m = r["eval"]["metrics"]
        cells = [r["name"], f"{q['bits_per_weight']:.3f}" if q else "16", f"{r['size_bytes'] / 1e6:.1f}"]
        cells += [f"{m['perplexity'][s]['ppl']:.3f}" if s in m["perplexity"] else "" for s in ppl_sources]
        cells += [f"{m['tasks'][t]['acc']:.3f} ± {m['tasks'][t]['acc_stderr']:.3f}" if t in m["tasks"] else "" for t in tasks]
        cells += [f"{q['tuning_seconds']:.0f}" if q else "", f"{q['peak_memory_bytes'] / 2**30:.2f}" if q else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if tasks:
        chance = {t: next(r["eval"]["metrics"]["tasks"][t]["chance"] for r in results if t in r["eval"]["metrics"]["tasks"]) for t in tasks}
        lines += ["", "Chance accuracy: " + ", ".join(f"{t} {c:.3f}" for t, c in chance.items())]
    lines.append("")
    for source in ppl_sources:
        png = plots.ppl_vs_bits(results, source, out / f"ppl_vs_bits_{Path(source).stem}.png")
        lines += [f"![perplexity vs bits per weight]({png.name})", ""]
    png = plots.block_losses(results, out / "block_losses.png")
    if png:
        lines += ["Per-block loss (MSE of the block output against the original model) before and after tuning:", "", f"![block losses]({png.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
