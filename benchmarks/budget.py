"""Mixed precision under a bit budget (issue 31): `--target-bits` at several budgets against the uniform
schemes and llama.cpp's K mixtures, with the protocol of ../shared/data/README.md (calibration
gutenberg-128x512, perplexity wt2-32k). Each row runs `signround.run` streamed, in a process of its own (so
its peak RSS is its own), and is stored in results/budget-<model>.json; a cut row resumes from its work
folder when the same command runs again.

    python benchmarks/budget.py                                 # SignRound fast recipe at 2.5, 3.0, 3.5, 4.25 bits
    python benchmarks/budget.py --method rtn --name budget-rtn  # the search alone, in minutes
    python benchmarks/budget.py --mixtures Q3_K_M,Q4_K_M        # + K mixtures and K-type searches at their sizes, scored in GGUF
    python benchmarks/budget.py --autoscheme 2.5,3.5            # + auto-round's AutoScheme plans at those budgets, tuned by signround

An AutoScheme row takes auto-round's plan for the same options, the same fused groups (its `shared_layers`) and
the same 16 calibration rows our search reads (its dataloader is handed those ids), then quantizes with that plan
by the same method as our rows: the two searches are compared on equal footing, search time beside search time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol
import torch
from exports import consumer, stored_bits

import signround
from signround.evaluate import perplexity
from signround.export import quantized_layers
from signround.hardware import cpu_has_fast_bf16
from signround.search import DEFAULT_OPTIONS, GGUF_OPTIONS, SEARCH_ROWS

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
    for bits in args.autoscheme:
        rows[f"autoscheme {bits:g}"] = {"scheme": "W4A16", "autoscheme": bits}
    for mixture in args.mixtures:
        rows[f"mixture {mixture}"] = {"scheme": mixture, "gguf": True}
        rows[f"target at {mixture} (K types)"] = {"scheme": "W4A16", "target_bits": ("size of", f"mixture {mixture}"), "options": list(GGUF_OPTIONS),
                                                  "gguf": True}
    return rows


def autoscheme_plans(model_spec: str, budgets: list[float], calibration) -> tuple[dict, float]:
    """auto-round's AutoScheme plans (budget -> layer -> one of our default options) and its search seconds. One
    call scores every option once and solves each budget from those scores, as auto-round does for a list of
    `avg_bits`; its score cache goes to a fresh folder, so the time is a search, not a cache hit."""
    from auto_round.auto_scheme import AutoScheme, delta_loss
    from auto_round.auto_scheme.gen_auto_scheme import GenScheme
    from auto_round.schemes import QuantizationScheme

    model, tokenizer = signround.load_model(model_spec)
    ours = {o: signround.WeightScheme.preset(o) for o in DEFAULT_OPTIONS}
    options = [QuantizationScheme.from_dict({"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "data_type": "int", "act_bits": 16})
               for s in ours.values()]
    rows = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)} for row in calibration[:SEARCH_ROWS]]
    delta_loss.get_dataloader = lambda *a, **k: rows  # the benchmark's ids: auto-round would download pile-10k
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    scheme = AutoScheme(avg_bits=list(budgets), options=options, shared_layers=[["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]],
                        nsamples=len(rows), seqlen=calibration.shape[1], device_map="cpu", enable_torch_compile=False,
                        low_cpu_mem_usage=False)  # its offload would re-read weights from safetensors files a GGUF-born model lacks
    with tempfile.TemporaryDirectory() as cache:
        os.environ["AR_AUTO_SCHEME_CACHE"] = cache
        start = time.perf_counter()
        chosen = GenScheme(scheme, model, names, {}, dataset="gutenberg-128x512 (ids given)", tokenizer=tokenizer, device_map="cpu",
                           enable_torch_compile=False).get_layer_config()
        seconds = time.perf_counter() - start
    by_fields = {(s.bits, s.group_size, s.sym): name for name, s in ours.items()}
    return {str(b): {n: None if c[n]["bits"] >= 16 else by_fields[(c[n]["bits"], c[n]["group_size"], c[n]["sym"])] for n in names}
            for b, c in chosen.items()}, seconds


def plan_summary(plan: dict, model, title: str) -> str:
    """Per option: layers and share of the weights, as our plan table prints them."""
    sizes = {n: model.get_submodule(n).weight.numel() for n in plan}
    share = Counter()
    for name, option in plan.items():
        share[option or "fp16"] += sizes[name]
    return title + "".join(f"\n  {o:<10} {sum(1 for v in plan.values() if (v or 'fp16') == o):>5} layers  {w / sum(sizes.values()):6.1%} of "
                           f"the weights" for o, w in sorted(share.items()))


def autoscheme_plan(args, target_bits: float, calibration) -> tuple[dict, float, str]:
    """The plan for one AutoScheme row, from the plans searched once for all of `--autoscheme` (kept beside the results)."""
    cache = RESULTS / "work" / f"autoscheme-{args.model}.json"
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    if str(target_bits) not in saved.get("plans", {}):
        plans, seconds = autoscheme_plans(args.model, args.autoscheme, calibration)
        saved = {"plans": plans, "seconds": seconds, "budgets": args.autoscheme}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(saved))
    plan = saved["plans"][str(target_bits)]
    title = (f"auto-round AutoScheme plan (target {target_bits:g}); one search for the budgets {saved['budgets']} took "
             f"{saved['seconds']:.1f} s")
    return plan, saved["seconds"], plan_summary(plan, signround.load_model(args.model)[0], title)


def run_row(key: str, settings: dict, args, store: Path) -> dict:
    """Quantize, save (and export), score; the row's numbers."""
    results = json.loads(store.read_text()) if store.exists() else {}
    target = settings.get("target_bits")
    if isinstance(target, (list, tuple)):  # a mixture's size, measured by its own row
        target = results[target[1]].get("gguf_bits_per_weight", results[target[1]]["bits_per_weight"])  # as its GGUF file stores it
    tokenizer = protocol.tokenizer_of(args.model)
    calibration = protocol.gutenberg_calibration(tokenizer, 128, 512)
    plan = search_s = summary = None
    if settings.get("autoscheme"):
        plan, search_s, summary = autoscheme_plan(args, settings["autoscheme"], calibration)
        target = settings["autoscheme"]
    config = signround.QuantConfig(scheme=settings["scheme"], method=args.method, recipe=args.recipe, nsamples=128, seqlen=512,
                                   seed=args.seed, target_bits=None if plan else target, options=settings.get("options"), plan=plan)
    out = RESULTS / "work" / f"{store.stem}-{key.replace(' ', '_').replace('(', '').replace(')', '')}"
    formats = ["signround", "gguf"] if settings.get("gguf") else ["signround"]
    report = signround.run(args.model, out, config, signround.RunConfig(progress=False), calibration=calibration, formats=formats,
                           overwrite=True, stream=True)
    eval_ids = protocol.wikitext_ids(tokenizer)
    native = out / "signround" if len(formats) > 1 else out
    row = {"ppl": protocol.scored_perplexity(signround.load(native), tokenizer, eval_ids), "bits_per_weight": report.bits_per_weight,
           "target_bits": target, "search_s": search_s or report.search_seconds, "tuning_s": report.tuning_seconds,
           "peak_rss_mib": report.peak_memory_bytes / 2**20, "search_peak_rss_mib": report.search_peak_bytes / 2**20, "plan": summary or report.plan}
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
        vs = f"{(row['ppl'] / best[0] - 1) * 100:+.1f}%" if best and key.startswith(("target", "autoscheme")) else ""
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
    p.add_argument("--autoscheme", default=[], type=lambda s: [float(b) for b in s.split(",") if b], help="budgets for auto-round AutoScheme rows")
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
