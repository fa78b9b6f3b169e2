"""Report plots, drawn with matplotlib's object API (no pyplot global state, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _figure(width=7.0, height=4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def ppl_vs_bits(results: list[dict], source: str, path: Path) -> Path:
    """Perplexity against average bits per weight, one line per method and kind of run (uniform schemes,
    K mixtures, bit-budget plans), the original as a dashed line."""
    from .compare import series

    fig = _figure()
    ax = fig.add_subplot()
    curves = sorted({(r["method"], series(r["scheme"])) for r in results if r["scheme"]})
    markers = {"uniform": "o", "K mixture": "s", "bit budget": "^"}
    for index, (method, kind) in enumerate(curves):
        points = sorted((r["quantization_report"]["bits_per_weight"], r["eval"]["metrics"]["perplexity"][source]["ppl"], r["scheme"])
                        for r in results if r["method"] == method and r["scheme"] and series(r["scheme"]) == kind
                        and source in r["eval"]["metrics"]["perplexity"])
        if not points:
            continue
        xs, ys, labels = zip(*points)
        ax.plot(xs, ys, marker=markers[kind], label=f"{method}, {kind}" if len(curves) > len({m for m, _ in curves}) else method)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4 - 11 * index), fontsize=7)
    original = [r for r in results if r["scheme"] is None and source in r["eval"]["metrics"]["perplexity"]]
    if original:
        ax.axhline(original[0]["eval"]["metrics"]["perplexity"][source]["ppl"], linestyle="--", color="gray", label="original")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per weight (codes + scales + zeros)")
    ax.set_ylabel(f"perplexity ({Path(source).name}, log scale)")
    ax.set_title("Perplexity vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def block_losses(results: list[dict], path: Path) -> Path | None:
    """One panel per tuned run: each block's output MSE at round-to-nearest and after tuning."""
    runs = [r for r in results if r["quantization_report"] and any(b is not None for b, _ in r["quantization_report"]["block_losses"])]
    if not runs:
        return None
    fig = _figure(7.0, 2.6 * len(runs))
    for i, r in enumerate(runs, 1):
        ax = fig.add_subplot(len(runs), 1, i)
        before, after = zip(*r["quantization_report"]["block_losses"])
        blocks = range(len(before))
        ax.plot(blocks, before, marker=".", label="before (RTN)")
        ax.plot(blocks, after, marker=".", label="after")
        ax.set_yscale("log")
        ax.set_title(r["name"], fontsize=9)
        ax.set_ylabel("block MSE")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax.set_xlabel("block")
    fig.tight_layout()
    fig.savefig(path)
    return path
