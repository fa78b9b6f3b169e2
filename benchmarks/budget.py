"""Mixed precision under a bit budget (issue 31): `--target-bits` at several budgets against the uniform
schemes and llama.cpp's K mixtures, with the protocol of ../shared/data/README.md (calibration
gutenberg-128x512, perplexity wt2-32k). Each row runs `signround.run` streamed, in a process of its own (so
its peak RSS is its own), and is stored in results/budget-<model>.json; a cut row resumes from its work
folder when the same command runs again.

    python benchmarks/budget.py                                 # SignRound fast recipe at 2.5, 3.0, 3.5, 4.25 bits
    python benchmarks/budget.py --method rtn --name budget-rtn  # the search alone, in minutes
    python benchmarks/budget.py --mixtures Q3_K_M,Q4_K_M        # + K mixtures and K-type searches at their sizes, scored in GGUF
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol
from exports import consumer, stored_bits

import signround
from signround.evaluate import perplexity
from signround.export import quantized_layers
from signround.hardware import cpu_has_fast_bf16
from signround.search import GGUF_OPTIONS

RESULTS = Path(__file__).resolve().parent / "results"
# uniform SignRound rows of the fast recipe (112 x 3, bf16 autocast, AVX512-BF16 EPYC) recorded with this protocol in
# results/vs_autoround-all.md, for the comparison when this file has no row of its own: (bits/weight, ppl, tuning s)
RECORDED_UNIFORM = {("smollm2-135m", "signround", "fast"): {"W2A16G64": (2.281, 125.500, 894), "W3A16": (3.161, 30.256, 949),
                                                            "W4A16": (4.169, 21.057, 911)}}


def rows_of(args) -> dict[str, dict]:
    """Every row this command asks for, by key: its settings for `run_row`."""
    rows = {}
    for scheme in args.uniform:
        rows[f"uniform {scheme}"] = {"scheme": scheme}
    for bits in args.budgets:
        rows[f"target {bits:g}"] = {"scheme": "W4A16", "target_bits": bits}
    for mixture in args.mixtures:
        rows[f"mixture {mixture}"] = {"scheme": mixture, "gguf": True}
        rows[f"target at {mixture} (K types)"] = {"scheme": "W4A16", "target_bits": ("size of", f"mixture {mixture}"), "options": list(GGUF_OPTIONS),
                                                  "gguf": True}
    return rows


def run_row(key: str, settings: dict, args, store: Path) -> dict:
    """Quantize, save (and export), score; the row's numbers."""
    results = json.loads(store.read_text()) if store.exists() else {}
    target = settings.get("target_bits")
    if isinstance(target, list):  # a mixture's size, measured by its own row
        target = results[target[1]]["bits_per_weight"]
    tokenizer = protocol.tokenizer_of(args.model)
    calibration = protocol.gutenberg_calibration(tokenizer, 128, 512)
    config = signround.QuantConfig(scheme=settings["scheme"], method=args.method, recipe=args.recipe, nsamples=128, seqlen=512,
                                   seed=args.seed, target_bits=target, options=settings.get("options"))
    out = RESULTS / "work" / f"{store.stem}-{key.replace(' ', '_').replace('(', '').replace(')', '')}"
    formats = ["signround", "gguf"] if settings.get("gguf") else ["signround"]
    report = signround.run(args.model, out, config, signround.RunConfig(progress=False), calibration=calibration, formats=formats,
                           overwrite=True, stream=True)
    eval_ids = protocol.wikitext_ids(tokenizer)
    native = out / "signround" if len(formats) > 1 else out
    row = {"ppl": protocol.scored_perplexity(signround.load(native), tokenizer, eval_ids), "bits_per_weight": report.bits_per_weight,
           "target_bits": target, "search_s": report.search_seconds, "tuning_s": report.tuning_seconds,
           "peak_rss_mib": report.peak_memory_bytes / 2**20, "search_peak_rss_mib": report.search_peak_bytes / 2**20, "plan": report.plan}
    if settings.get("gguf"):
        model = consumer(out / "gguf", "gguf")
        row["gguf_ppl"] = perplexity(model, eval_ids)
        layers = quantized_layers(signround.load(native))
        row["gguf_bits_per_weight"] = stored_bits(out / "gguf", "gguf", layers)
    shutil.rmtree(out)
    return row


def write_table(results: dict, args, path: Path) -> None:
    lines = [f"# Mixed precision under a bit budget: {args.model}, {args.method} (recipe {args.recipe}), calibration gutenberg-128x512, ppl wt2-32k",
             "", f"machine: {protocol.cpu_name()}, bf16 autocast {'on' if cpu_has_fast_bf16() else 'off'}; every row streamed, in a process "
             f"of its own. bits/weight: stored bits (codes, scales, zero points) per weight of the blocks' linear layers, 16-bit ones at 16; "
             f"GGUF bits: the written file's block tensors", "",
             "| row | bits/weight | ppl | best uniform of no more bits | vs it | GGUF bits | GGUF ppl | search s | tuning s | search share | "
             "peak RSS MiB (search) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    uniform = {k: r for k, r in results.items() if k.startswith("uniform ")}
    for scheme, (bits, ppl, seconds) in RECORDED_UNIFORM.get((args.model, args.method, args.recipe), {}).items():
        if f"uniform {scheme}" not in uniform:
            uniform[f"uniform {scheme} (recorded)"] = {"bits_per_weight": bits, "ppl": ppl, "tuning_s": seconds}
    for key, row in {**{k: r for k, r in uniform.items() if k not in results}, **results}.items():
        fits = [(r["ppl"], k) for k, r in uniform.items() if r["bits_per_weight"] <= row["bits_per_weight"] + 1e-9 and k != key]
        best = min(fits) if fits else None
        vs = f"{(row['ppl'] / best[0] - 1) * 100:+.1f}%" if best and key.startswith("target") else ""
        search_s = row.get("search_s", 0)
        share = f"{search_s / row['tuning_s']:.0%}" if search_s and row["tuning_s"] else ""
        gguf = (f"{row['gguf_bits_per_weight']:.3f} | {row['gguf_ppl']:.3f}" if "gguf_ppl" in row else " | ")
        rss = f"{row['peak_rss_mib']:.0f} ({row['search_peak_rss_mib']:.0f})" if "peak_rss_mib" in row else ""
        lines.append(f"| {key} | {row['bits_per_weight']:.3f} | {row['ppl']:.3f} | {f'{best[1]} ({best[0]:.3f})' if best else ''} | {vs} | {gguf} | "
                     f"{search_s:.0f} | {row['tuning_s']:.0f} | {share} | {rss} |")
    plans = [f"- {key}:\n```\n{row['plan']}\n```" for key, row in results.items() if row.get("plan")]
    protocol.write_result(path.name, lines + ["", "Plans:", ""] + plans, echo=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="signround", choices=["signround", "rtn"])
    p.add_argument("--recipe", default="fast")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--budgets", default=[2.5, 3.0, 3.5, 4.25], type=lambda s: [float(b) for b in s.split(",") if b])
    p.add_argument("--uniform", default=["W2A16G64", "W3A16", "W4A16"], type=lambda s: [u for u in s.split(",") if u])
    p.add_argument("--mixtures", default=[], type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--name", help="results file stem (default budget-<model>[-rtn])")
    p.add_argument("--row", help=argparse.SUPPRESS)  # run one row in this process (the parent launches one process per row)
    args = p.parse_args()
    name = args.name or f"budget-{args.model}{'-rtn' if args.method == 'rtn' else ''}"
    store = RESULTS / f"{name}.json"
    rows = rows_of(args)
    if args.row:
        row = run_row(args.row, rows[args.row], args, store)
        results = json.loads(store.read_text()) if store.exists() else {}
        results[args.row] = row
        store.write_text(json.dumps(results, indent=1))
        return
    for key in rows:
        if key in (json.loads(store.read_text()) if store.exists() else {}):
            continue
        print(f"== {key}", flush=True)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--row", key], check=True)
        write_table(json.loads(store.read_text()), args, RESULTS / f"{name}.md")
    write_table(json.loads(store.read_text()), args, RESULTS / f"{name}.md")
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
