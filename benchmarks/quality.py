"""Perplexity of fp32 / RTN / SignRound (and auto-round's SignRound when the package is installed) on
one model, with the protocol of ../shared/data/README.md. Rows already in the results JSON are reused,
and a SignRound row keeps its finished blocks in results/work/, so an interrupted run (even one cut
off in the middle of a scheme) is completed by running the same command again.

    python benchmarks/quality.py                       # full protocol: iters 200, batch 8, 3 schemes
    python benchmarks/quality.py --iters 32 --layers 4 # a quick look
    python benchmarks/quality.py --recipe fast --name quality-fast   # signround's default recipe
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

import signround
from signround.config import RECIPES
from signround.evaluate import perplexity
from signround.hardware import cpu_has_fast_bf16

RESULTS = Path(__file__).resolve().parent / "results"
# auto-round 0.16 numbers recorded with this protocol (../shared/data/README.md), for when it is not installed here
AUTOROUND_RECORDED = {("rtn", "W4A16"): 22.63, ("rtn", "W3A16"): 47.62, ("rtn", "W2A16G64"): 984791.0,
                      ("signround", "W4A16"): 20.72, ("signround", "W3A16"): 31.43, ("signround", "W2A16G64"): 216.5}


def run_ours(base, tokenizer, method, scheme, calib, eval_ids, args) -> dict:
    model = copy.deepcopy(base)
    config = signround.QuantConfig(scheme=scheme, method=method, recipe=args.recipe, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                                   batch_size=args.batch_size, seed=args.seed, keep=args.keep,
                                   tame_outliers=args.tame_outliers, project_clipping=args.project_clipping,
                                   smooth=args.smooth if method == "signround" and signround.WeightScheme.preset(scheme).act else None)
    work = RESULTS / "work" / key("signround", method, scheme, args).replace("|", "_")  # survives a session's end: the run resumes
    report = signround.quantize(model, config, tokenizer=tokenizer, calibration=calib, run=signround.RunConfig(work_dir=work))
    row = {"ppl": perplexity(model, eval_ids), "tuning_s": report.tuning_seconds, "bits_per_weight": report.bits_per_weight,
           "peak_rss_gib": report.peak_memory_bytes / 2**30, "block_losses": report.block_losses}
    row["reloaded_ppl"] = protocol.reloaded_perplexity(model, tokenizer, eval_ids)
    shutil.rmtree(work)
    return row


# auto-round's names of the float element formats (weight-only with act_bits=16)
AUTOROUND_DATA_TYPES = {"MXFP4": "mx_fp", "MXFP8": "mx_fp", "NVFP4": "nv_fp", "FP8": "fp"}


def run_autoround(base, tokenizer, method, scheme, calib, eval_ids, args) -> dict:
    from auto_round import AutoRound

    s = signround.WeightScheme.preset(scheme)
    model = copy.deepcopy(base)
    iters, batch_size = autoround_settings(args)
    ar = AutoRound(model, tokenizer, bits=s.bits, group_size=s.group_size, sym=s.sym, data_type=AUTOROUND_DATA_TYPES.get(s.fp, "int"), act_bits=16,
                   iters=0 if method == "rtn" else iters, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=batch_size, seed=args.seed,
                   dataset=[{"input_ids": row.unsqueeze(0)} for row in calib])
    start = time.perf_counter()
    result = ar.quantize()  # fake-quantizes in place; returns (model, layer_config) in the versions we know
    qmodel = result[0] if isinstance(result, tuple) else ar.model
    return {"ppl": perplexity(qmodel, eval_ids), "tuning_s": time.perf_counter() - start}


def autoround_settings(args) -> tuple[int, int]:
    """auto-round runs its own defaults (200 steps, batch 8) whatever signround's recipe; only an explicit
    --iters / --batch-size (a quick look) changes them."""
    return args.explicit_iters or 200, args.explicit_batch_size or 8


def key(tool, method, scheme, args) -> str:
    # RTN ignores the recipe (its rows keep the untagged keys of the full recipe); a SignRound row always names its recipe
    recipe = f"|recipe-{args.recipe}" if tool == "signround" and (method == "signround" or args.recipe != "full") else ""
    recipe += f"|keep-{args.keep}" if (tool, method) == ("signround", "signround") and args.keep != "best" else ""  # rows from before --keep kept the best
    if (tool, method) == ("signround", "signround") and args.tame_outliers is not None:  # rows from before the option had it off
        recipe += f"|tame-{'on' if args.tame_outliers else 'off'}"
    if (tool, method) == ("signround", "signround") and args.project_clipping is not None:  # rows from before the option had it off
        recipe += f"|project-{'on' if args.project_clipping else 'off'}"
    if (tool, method) == ("signround", "signround") and args.smooth is not None and signround.WeightScheme.preset(scheme).act:
        recipe += f"|smooth-{args.smooth:g}"
    if method == "signround" and cpu_has_fast_bf16():  # tuned under bf16 autocast; rows without the tag were tuned in fp32
        recipe += "|amp-bf16"
    iters, batch_size = autoround_settings(args) if tool == "auto-round" else (args.iters, args.batch_size)
    return f"{tool}|{method}|{scheme}|iters{iters}|n{args.nsamples}x{args.seqlen}|bs{batch_size}|layers{args.layers or 'all'}|seed{args.seed}{recipe}"


def write_table(results: dict, args, path: Path) -> None:
    fp = results.get(key("fp32", "fp32", "-", args), {}).get("ppl")
    lines = [
        f"# Perplexity (wt2-32k) of {args.model}, calibration gutenberg-{args.nsamples}x{args.seqlen}",
        "",
        f"signround recipe {args.recipe}: iters {args.iters}, batch {args.batch_size}, keep the {args.keep} step, seed {args.seed}, "
        f"clipping projection {'the recipe default' if args.project_clipping is None else 'on' if args.project_clipping else 'off'}, "
        f"layers {args.layers or 'all'}; "
        f"machine: {protocol.cpu_name()}, {torch.get_num_threads()} threads, bf16 autocast {'on' if cpu_has_fast_bf16() else 'off (no AMX/AVX512-BF16: fp32)'}",
        "",
        f"fp32 perplexity: {fp:.3f}" if fp else "fp32 perplexity: (not run)",
        "",
        "| scheme | method | ppl | reloaded ppl | reload diff | share of RTN's gap left | vs auto-round SignRound | bits/weight | tuning s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    suffix = key("", "", "", args).split("|", 3)[3]
    stored = {k.split("|")[2] for k in results if k.endswith(suffix) and not k.startswith("fp32")}
    smooth_values = sorted({float(part[len("smooth-"):]) for k in results for part in k.split("|") if part.startswith("smooth-")})
    for scheme in list(dict.fromkeys(args.schemes + sorted(stored))):
        rtn = results.get(key("signround", "rtn", scheme, args), {}).get("ppl")
        variants = [(tool, method, key(tool, method, scheme, args)) for tool, method in
                    (("signround", "rtn"), ("signround", "signround"), ("auto-round", "rtn"), ("auto-round", "signround"))]
        variants[2:2] = [("signround", f"signround smooth {a:g}", key("signround", "signround", scheme, argparse.Namespace(**{**vars(args), "smooth": a})))
                         for a in smooth_values if a != args.smooth and signround.WeightScheme.preset(scheme).act]
        for tool, method, k in variants:
            row = results.get(k)
            if not row:
                continue
            if (tool, method) == ("auto-round", "rtn"):
                method = "rtn (iters 0: its calibrated OPT-RTN)"
            ppl = row["ppl"]
            reloaded = row.get("reloaded_ppl")
            gap = f"{(ppl - fp) / (rtn - fp):.2f}" if fp and rtn and method.startswith("signround") and rtn > fp else ""
            ar = results.get(key("auto-round", "signround", scheme, args), {}).get("ppl") or AUTOROUND_RECORDED.get(("signround", scheme))
            vs = f"{(ppl / ar - 1) * 100:+.1f}%" if tool == "signround" and method.startswith("signround") and ar else ""
            lines.append(f"| {scheme} | {tool} {method} | {ppl:.3f} | {reloaded:.3f} | {(reloaded / ppl - 1) * 100:+.2f}% | {gap} | {vs} | "
                         f"{row.get('bits_per_weight', 0):.3f} | {row.get('tuning_s', 0):.0f} |" if reloaded else
                         f"| {scheme} | {tool} {method} | {ppl:.3f} | | | {gap} | {vs} | | {row.get('tuning_s', 0):.0f} |")
    lines += ["", "auto-round 0.16 reference (recorded with this protocol at iters 200, batch 8, ../shared/data/README.md): "
              + ", ".join(f"{m} {s} {v:g}" for (m, s), v in AUTOROUND_RECORDED.items()),
              "", f"updated {datetime.datetime.now().isoformat(timespec='minutes')}"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", default="W4A16,W3A16,W2A16G64", type=lambda s: s.split(","))
    p.add_argument("--methods", default="rtn,signround", type=lambda s: s.split(","))
    p.add_argument("--recipe", default="full", choices=sorted(RECIPES), help="signround's recipe (auto-round always runs its default)")
    p.add_argument("--iters", type=int, help="default: the recipe's")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, help="default: the recipe's")
    p.add_argument("--keep", choices=["best", "last", "average"], help="default: the recipe's")
    p.add_argument("--tame-outliers", choices=["on", "off"], help="weigh down attention-sink tokens in the loss (default: the recipe's)")
    p.add_argument("--project-clipping", choices=["on", "off"], help="clamp the clipping scales onto [0, 1] after each step (default: the recipe's)")
    p.add_argument("--smooth", type=float, help="SmoothQuant alpha for schemes with quantized inputs (W8A8 ...); default: none")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--layers", type=int, help="truncate the model to its first N blocks")
    p.add_argument("--tools", default="signround,auto-round", type=lambda s: s.split(","),
                   help="whose rows to run: signround and/or auto-round (when installed), with the same calibration ids")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--name", default="quality", help="results file stem in benchmarks/results/")
    p.add_argument("--table-only", action="store_true", help="rewrite the markdown table from the stored results and stop")
    args = p.parse_args()
    args.tame_outliers = None if args.tame_outliers is None else args.tame_outliers == "on"
    args.project_clipping = None if args.project_clipping is None else args.project_clipping == "on"
    args.explicit_iters, args.explicit_batch_size = args.iters, args.batch_size
    args.iters = args.iters or RECIPES[args.recipe]["iters"]
    args.batch_size = args.batch_size or RECIPES[args.recipe]["batch_size"]
    args.keep = args.keep or RECIPES[args.recipe]["keep"]

    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / f"{args.name}.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if args.table_only:
        write_table(results, args, RESULTS / f"{args.name}.md")
        print((RESULTS / f"{args.name}.md").read_text())
        return
    base, tokenizer = signround.load_model(args.model)
    protocol.truncate(base, args.layers)
    calib = protocol.gutenberg_calibration(tokenizer, args.nsamples, args.seqlen)
    eval_ids = protocol.wikitext_ids(tokenizer, args.eval_tokens)
    tools = args.tools
    if "auto-round" in tools:
        try:
            import auto_round  # noqa: F401
        except ImportError:
            print("auto-round is not installed (pip install 'signround[bench]'): its rows are skipped", flush=True)
            tools = [t for t in tools if t != "auto-round"]

    def record(k, fn, *fn_args):
        if k in results:
            return
        print(f"== {k}", flush=True)
        results[k] = fn(*fn_args)
        store.write_text(json.dumps(results, indent=1))
        write_table(results, args, RESULTS / f"{args.name}.md")
        print(f"   {k}: ppl {results[k]['ppl']:.3f}", flush=True)

    record(key("fp32", "fp32", "-", args), lambda: {"ppl": perplexity(base, eval_ids)})
    for method in args.methods:  # every cheap RTN row first, then the tuned ones
        for scheme in args.schemes:
            for tool in tools:
                runner = run_ours if tool == "signround" else run_autoround
                record(key(tool, method, scheme, args), runner, base, tokenizer, method, scheme, calib, eval_ids, args)
    write_table(results, args, RESULTS / f"{args.name}.md")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
