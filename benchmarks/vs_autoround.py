"""signround against auto-round on one model, scheme and set of calibration token ids (gutenberg-128x512),
each run in its own process (so peak RSS is its own), the tools alternating:

  same settings   both tools at iters/batch/lr identical: tuning wall time, s/iter, achieved GFLOP/s of
                  forward+backward and its share of the machine's matmul peak measured in this run (bf16
                  where the CPU has fast bf16, else fp32);
  default recipe  signround's default (`--recipe` of the CLI) against auto-round's default (iters 200,
                  batch 8): wall time ratio, wt2-32k and prose-16k perplexity (protocol.scores; BOS windows for Gemma);
  and the peak RSS of every run (model load included: signround streams the blocks, auto-round loads whole),
  on a GPU beside the peak of its allocations there.
  A signround run also saves its packed checkpoint and reloads it: the same-settings table gives both perplexities.

    python benchmarks/vs_autoround.py --layers 4          # a quick look
    python benchmarks/vs_autoround.py                     # the headline: full depth, W4A16 and W2A16G64
    python benchmarks/vs_autoround.py --device cuda       # the same on a GPU
    python benchmarks/vs_autoround.py --schemes W3A16 --recipes default --tools signround --no-project-clipping
                                                          # a signround variant: rows of its own, beside the default's

On a CPU without AMX/AVX512-BF16 auto-round's default bf16 autocast runs ~8x slower than fp32 matmuls;
`--autoround-amp auto` (default) then turns it off for auto-round as signround does for itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak(dtype: torch.dtype, device: str, seconds: float = 2.0) -> float:
    """GFLOP/s of a square matmul in `dtype`: the machine's practical peak, measured in this run."""
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    on_gpu = torch.device(device).type == "cuda"  # "cuda:1" too
    if on_gpu:
        torch.cuda.synchronize()  # the warm-up is done before the clock starts
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if on_gpu:
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def flops_per_iter(config, batch: int, seqlen: int) -> float:
    """Forward + backward FLOPs of one tuning step of one decoder block (backward ~ 2x forward)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    linear = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    tokens = batch * seqlen
    attention = 2 * 2 * batch * seqlen * seqlen * heads * head_dim
    return 3 * (2 * tokens * linear + attention)


ERROR_ROWS = 8  # calibration rows each run's per-block output error is measured on (protocol.block_errors)


# ---- one run, in a child process --------------------------------------------------------------

def _child_signround(args) -> dict:
    import tempfile

    import signround
    from signround.resume import finished_blocks

    logging.basicConfig(format="%(message)s")  # to stderr: the parent reads adapt_batch's choices from it (`schedule`)
    logging.getLogger("signround.algorithms.signround").setLevel(logging.INFO)
    from signround.weights import materialize_blocks, open_lazy

    model, tokenizer, weights = open_lazy(args.model)
    protocol.truncate(model, args.layers)
    calib = protocol.gutenberg_calibration(tokenizer, args.nsamples, args.seqlen)
    # same settings: compiled as auto-round compiles its block forward, whatever the run's length ("auto" leaves
    # short runs eager, where a cold compile would not pay back, and they would compare eager steps with compiled ones)
    recipe = {} if args.recipe == "default" else dict(recipe="full", iters=args.iters, batch_size=args.batch_size, lr=args.lr)
    for name in VARIANT_SETTINGS:
        if getattr(args, name) is not None and name != "cache_dtype":
            recipe[name] = getattr(args, name)
    recipe.setdefault("seed", 42)
    config = signround.QuantConfig(scheme=args.scheme, nsamples=args.nsamples, seqlen=args.seqlen, **recipe).resolved()
    run = signround.RunConfig(device=args.device, compile=True if args.recipe != "default" else "auto", cache_dtype=args.cache_dtype or "bfloat16",
                              offload=args.offload, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        report = signround.quantize(model, config, dataclasses.replace(run, work_dir=work), tokenizer=tokenizer, calibration=calib, weights=weights)
        rss, gpu = protocol.peak_rss_mib(), protocol.peak_device_mib(args.device)
        materialize_blocks(model, finished_blocks(work, model))
    scores = protocol.scores(model.to(args.device), tokenizer, args.device)
    reloaded_ppl = protocol.reloaded_perplexity(model, tokenizer, device=args.device)
    errors = protocol.block_errors(protocol.truncate(signround.load_model(args.model)[0], args.layers), model, calib[:ERROR_ROWS])
    return {"block_errors": errors, "tuning_s": report.tuning_seconds, "iters": config.iters, "steps": report.tuning_steps,
            "ppl": scores["wt2"], "prose_ppl": scores["prose"], "reloaded_ppl": reloaded_ppl, "peak_rss_mib": rss, "peak_gpu_mib": gpu,
            "batch": config.batch_size, "nsamples": args.nsamples, "seqlen": args.seqlen, "work": config.iters * args.nsamples * args.seqlen,
            "compile": run.compile, "compiled": run.compiles(config, torch.device(args.device), args.layers_run)}


def _child_autoround(args) -> dict:
    from auto_round import AutoRound

    import signround
    from signround.hardware import cpu_has_fast_bf16

    model, tokenizer = signround.load_model(args.model)
    protocol.truncate(model, args.layers)
    calib = protocol.gutenberg_calibration(tokenizer, args.nsamples, args.seqlen)
    s = signround.WeightScheme.preset(args.scheme)
    amp = args.autoround_amp == "on" or (args.autoround_amp == "auto" and (args.device == "cuda" or cpu_has_fast_bf16()))
    recipe = {} if args.recipe == "default" else dict(iters=args.iters, batch_size=args.batch_size, lr=args.lr)
    ar = AutoRound(model, tokenizer, bits=s.bits, group_size=s.group_size, sym=s.sym, nsamples=args.nsamples, seqlen=args.seqlen,
                   seed=42, amp=amp, device_map=args.device, dataset=[{"input_ids": row.unsqueeze(0)} for row in calib], **recipe)
    start = time.perf_counter()
    result = ar.quantize()
    seconds = time.perf_counter() - start
    rss, gpu = protocol.peak_rss_mib(), protocol.peak_device_mib(args.device)
    qmodel = result[0] if isinstance(result, tuple) else ar.model
    scores = protocol.scores(qmodel.to(args.device), tokenizer, args.device)
    errors = protocol.block_errors(protocol.truncate(signround.load_model(args.model)[0], args.layers), qmodel, calib[:ERROR_ROWS])
    return {"block_errors": errors, "tuning_s": seconds, "iters": getattr(ar, "iters", None), "steps": ar.iters * args.layers_run,
            "ppl": scores["wt2"], "prose_ppl": scores["prose"], "peak_rss_mib": rss, "peak_gpu_mib": gpu,
            "batch": getattr(ar, "batch_size", None), "amp": amp}


def same_is_autoround_default(args) -> bool:
    """Whether the same-settings run is auto-round's default recipe (iters 200, batch 8, lr 1/iters)."""
    return args.iters == 200 and args.batch_size == 8 and not args.lr


SCHEDULE_LINE = re.compile(r"block (\d+): row gradients agree ([\d.]+): (\d+) steps of (\d+) rows")


def run_child(tool: str, recipe: str, scheme: str, args, extra=()) -> dict:
    argv = [sys.executable, __file__, "--child", tool, "--recipe", recipe, "--scheme", scheme, "--model", args.model, "--device", args.device,
            "--iters", str(args.iters), "--batch-size", str(args.batch_size), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--autoround-amp", args.autoround_amp, *(["--layers", str(args.layers)] if args.layers else []), *extra]
    if tool == "signround":
        argv += variant_argv(args)
    if args.lr:
        argv += ["--lr", str(args.lr)]
    print(f"== {tool} {recipe} {scheme} {' '.join(extra)}", flush=True)
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{tool} {recipe} {scheme} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if tool == "signround":  # per block: the rows' gradient agreement, steps and rows per step that adapt_batch chose
        row["schedule"] = [[int(b), float(a), int(n), int(r)] for b, a, n, r in SCHEDULE_LINE.findall(done.stderr)]
    print(f"   {row}", flush=True)
    return row


# signround settings a run may override beside its recipe: each gives the run a row of its own
# (label when on, label when off) for a flag, a format for a value
VARIANT_SETTINGS = {"project_clipping": ("projected", "unprojected"), "clip_search": ("clip search", "RTN start"),
                    "tame_outliers": ("tamed outliers", "plain loss"), "adapt_batch": ("adapted batch", "fixed batch"),
                    "cache_dtype": "{} caches", "seed": "seed {}"}


def variant_argv(args) -> list[str]:
    """The command-line flags that repeat this run's variant settings in a child."""
    argv = []
    for name, labels in VARIANT_SETTINGS.items():
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if value is not None:
            argv += [flag, str(value)] if isinstance(labels, str) else [flag if value else "--no-" + flag[2:]]
    return argv


def signround_key(recipe: str, scheme_or_point: str, args) -> str:
    """Runs with variant settings (--project-clipping, --clip-search, --tame-outliers, --adapt-batch, --cache-dtype, --seed) keep
    rows of their own beside the recipe-default run."""
    parts = [(labels.format(value) if isinstance(labels, str) else labels[0 if value else 1])
             for name, labels in VARIANT_SETTINGS.items() if (value := getattr(args, name)) is not None]
    return f"signround|{recipe}|{scheme_or_point}" + "".join(f"|{part}" for part in parts)


def signround_rows(results: dict, recipe: str, scheme: str) -> list[tuple[str, dict]]:
    """(label, row) of every signround run of this recipe and scheme, the recipe-default one first."""
    prefix = f"signround|{recipe}|{scheme}"
    keys = sorted((k for k in results if k == prefix or k.startswith(prefix + "|")), key=len)
    return [("signround" + (f" ({k[len(prefix) + 1:].replace('|', ', ')})" if k != prefix else ""), results[k]) for k in keys]


def run_key(tool: str, recipe: str, scheme: str, args) -> str:
    """Where a run's row is stored: signround's carries its variant settings (`signround_key`)."""
    return signround_key(recipe, scheme, args) if tool == "signround" else f"{tool}|{recipe}|{scheme}"


def steps_cell(row: dict) -> str:
    """iters x batch, and in how many blocks adapt_batch took single-row steps instead (where recorded)."""
    cell = f"{row['iters']} x {row['batch']}" if row.get("batch") else str(row["iters"])
    schedule = row.get("schedule")
    return cell + (f" (1-row steps in {sum(r == 1 for *_, r in schedule)}/{len(schedule)} blocks)" if schedule else "")


def relative(row: dict, theirs: dict, key: str) -> str:
    """`row`'s perplexity against auto-round's, in percent (blank where either run lacks it)."""
    return f"{(row[key] / theirs[key] - 1) * 100:+.2f}%" if key in row and key in theirs else ""


def block_error_lines(results: dict, schemes: list[str]) -> list[str]:
    """Every run's per-block output error against the unquantized model (`protocol.block_errors`), where recorded:
    where one tool's quantized model starts to drift from the other's."""
    rows = [(key, row) for scheme in schemes for key, row in results.items() if key.split("|")[2] == scheme and "block_errors" in row]
    if not rows:
        return []
    depth = len(rows[0][1]["block_errors"])
    lines = ["", "## Block output error", "",
             f"||h - h_fp||^2 / ||h_fp||^2 after each block, on {ERROR_ROWS} calibration rows, the first position left out", "",
             "| run | " + " | ".join(str(i) for i in range(depth)) + " |", "|---|" + "---|" * depth]
    for key, row in rows:
        lines.append(f"| {key.replace('|', ' ')} | " + " | ".join(f"{e:.2e}" for e in row["block_errors"]) + " |")
    return lines


def seconds_per_iter(row: dict, layers: int) -> float:
    return row["tuning_s"] / (row["iters"] * layers)


def memory_mib(row: dict) -> str:
    """A run's peak RSS, and on a GPU also the peak of its allocations there."""
    gpu = row.get("peak_gpu_mib")
    return f"{row['peak_rss_mib']:.0f}" + (f" (GPU {gpu:.0f})" if gpu is not None else "")


def repeated_pairs(results: dict, schemes: list[str], layers: int) -> list[str]:
    """The same-settings pairs of `--repeats`, a row each, and the median of their time ratios: drift in
    the machine's speed over minutes moves single runs by several percent, alternating pairs cancel it."""
    lines = []
    for scheme in schemes:
        theirs = results.get(f"auto-round|same|{scheme}")
        for tool, ours in signround_rows(results, "same", scheme):
            if not theirs or not ours.get("repeats") or not theirs.get("repeats"):
                continue
            pairs = list(zip([ours, *ours["repeats"]], [theirs, *theirs["repeats"]]))
            if not lines:
                lines += ["", "### Same settings, repeated", "", f"{len(pairs)} pairs, each tool's runs alternating with the other's and "
                          "going first in every other pair (first pair: the rows above)", "",
                          "| scheme | tool | pair | first | s/iter | auto-round s/iter | ratio |", "|---|---|---|---|---|---|---|"]
            ratios = []
            for k, (a, b) in enumerate(pairs):
                ratios.append(a["tuning_s"] / b["tuning_s"])
                lines.append(f"| {scheme} | {tool} | {k + 1} | {'signround' if k % 2 == 0 else 'auto-round'} | "
                             f"{seconds_per_iter(a, layers):.3f} | {seconds_per_iter(b, layers):.3f} | {ratios[-1]:.3f} |")
            total = sum(a["tuning_s"] for a, _ in pairs) / sum(b["tuning_s"] for _, b in pairs)
            lines.append(f"| {scheme} | {tool} | all | | | | median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}), "
                         f"total time {total:.3f} |")
    return lines


def write_table(results: dict, args, peaks: dict, path: Path) -> None:
    import signround.models as models

    config = models.load_metadata(models.resolve(args.model))[0]
    layers = args.layers or config.num_hidden_layers
    step = flops_per_iter(config, args.batch_size, args.seqlen)
    measured = {key.split("|")[2] for key in results if not key.startswith("signround|scaling|")}
    schemes = [*args.schemes, *sorted(measured - set(args.schemes))]  # a run of one scheme keeps the others' rows
    best = max(peaks, key=peaks.get)  # without AMX/AVX512-BF16, bf16 matmuls are far slower than fp32 ones
    lines = [f"# signround vs auto-round: {args.model}, {layers} blocks, calibration gutenberg-{args.nsamples}x{args.seqlen}", "",
             f"machine: {protocol.cpu_name() if args.device == 'cpu' else torch.cuda.get_device_name()}, {torch.get_num_threads()} threads; "
             f"matmul peak measured in this run: bf16 {peaks['bf16']:.1f} GFLOP/s, fp32 {peaks['fp32']:.1f} GFLOP/s "
             f"(each row's share is of the peak measured beside its own run; * where that was not recorded)", "",
             "## Same settings", "",
             f"iters {args.iters}, batch {args.batch_size}, lr {args.lr or '1/iters'}; one step of one block is {step / 1e9:.1f} GFLOP forward+backward. "
             "signround runs its `full` recipe (the same steps from its clipping search, projected at 2 bits, bf16 caches); a row in brackets "
             "overrides some of that (projected, RTN start, float32 caches: the `paper` recipe, auto-round's)", "",
             f"| scheme | tool | tuning s | ratio | s/iter | GFLOP/s | share of the {best} matmul peak | ppl | reloaded ppl | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for scheme in schemes:
        theirs = results.get(f"auto-round|same|{scheme}")
        if theirs is None and same_is_autoround_default(args):
            theirs = results.get(f"auto-round|default|{scheme}")  # its default run is the same-settings run
        theirs_name = "auto-round" + ("" if not theirs or theirs.get("amp", True) else " (amp off)")
        for tool, row in (*signround_rows(results, "same", scheme), (theirs_name, theirs)):
            if not row:
                continue
            per_iter = seconds_per_iter(row, layers)
            rate = step / per_iter / 1e9
            ratio = f"{row['tuning_s'] / theirs['tuning_s']:.2f}" if theirs else ""
            own = row.get("matmul_peaks")  # the peak measured beside the row's own run; older rows share this run's (*)
            share = f"{rate / own[best]:.0%}" if own else f"{rate / peaks[best]:.0%}*"
            tool += f" ({row['note']})" if row.get("note") else ""
            tool += " (eager step)" if row.get("compiled") is False else ""
            reloaded = f"{row['reloaded_ppl']:.3f} ({(row['reloaded_ppl'] / row['ppl'] - 1) * 100:+.2f}%)" if "reloaded_ppl" in row else ""
            lines.append(f"| {scheme} | {tool} | {row['tuning_s']:.0f} | {ratio} | {per_iter:.3f} | {rate:.0f} | {share} | "
                         f"{row['ppl']:.3f} | {reloaded} | {memory_mib(row)} |")
    lines += repeated_pairs(results, schemes, layers)
    if any(key.split("|")[1] == "default" for key in results):  # a same-settings-only run has no such rows
        lines += ["", "## Default recipes", "", "ppl: wt2-32k; prose: prose-16k (benchmarks/protocol.py)", "",
                  "| scheme | tool | iters x batch | tuning s | time ratio | ppl | ppl vs auto-round | prose ppl | prose vs auto-round "
                  "| peak RSS MiB | RSS ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for scheme in schemes:
        theirs = results.get(f"auto-round|default|{scheme}")
        for tool, row in (*signround_rows(results, "default", scheme), ("auto-round", theirs)):
            if not row:
                continue
            vs, prose_vs = (relative(row, theirs, key) if theirs and tool.startswith("signround") else "" for key in ("ppl", "prose_ppl"))
            ratio = f"{row['tuning_s'] / theirs['tuning_s']:.2f}" if theirs else ""
            rss = f"{row['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}" if theirs else ""
            prose = f"{row['prose_ppl']:.3f}" if "prose_ppl" in row else ""
            lines.append(f"| {scheme} | {tool} | {steps_cell(row)} | {row['tuning_s']:.0f} | {ratio} | {row['ppl']:.3f} | {vs} | {prose} | {prose_vs} | "
                         f"{memory_mib(row)} | {rss} |")
    lines += block_error_lines(results, schemes)
    scaling = sorted((v for k, v in results.items() if k.startswith("signround|scaling|") and k == signround_key("scaling", k.split("|")[2], args)),
                     key=lambda r: (r["iters"], r["nsamples"], r["seqlen"]))
    if len(scaling) >= 3:
        lines += ["", "## Tuning time against the work (signround)", "",
                  "A step processes batch x seqlen tokens of one block whatever nsamples is; nsamples x seqlen tokens go through each block",
                  "twice more (the original and the quantized stream). So time should be a*(iters x batch x seqlen) + b*(nsamples x seqlen)",
                  "+ c over the blocks, with no fixed cost c (no compile or warm-up per block). Fitted on these rows by least squares:", "",
                  "| iters | nsamples | seqlen | steps x tokens | forward tokens | tuning s | fitted s |", "|---|---|---|---|---|---|---|"]
        design = torch.tensor([[r["iters"] * r["batch"] * r["seqlen"], r["nsamples"] * r["seqlen"], 1.0] for r in scaling], dtype=torch.float64)
        times = torch.tensor([r["tuning_s"] for r in scaling], dtype=torch.float64)
        a, b, c = torch.linalg.lstsq(design, times.unsqueeze(1)).solution.squeeze(1).tolist()
        for row, fit in zip(scaling, (design @ torch.tensor([a, b, c], dtype=torch.float64)).tolist()):
            lines.append(f"| {row['iters']} | {row['nsamples']} | {row['seqlen']} | {row['iters'] * row['batch'] * row['seqlen']:.3g} | "
                         f"{row['nsamples'] * row['seqlen']:.3g} | {row['tuning_s']:.1f} | {fit:.1f} |")
        lines += ["", f"a = {a * 1e6:.2f} s per million step tokens, b = {b * 1e6:.1f} s per million forward tokens, fixed cost c = {c:.1f} s "
                      f"({c / max(times).item():+.0%} of the longest run)"]
    lines += ["", f"updated {datetime.datetime.now().isoformat(timespec='minutes')}"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", default="W4A16,W2A16G64", type=lambda s: s.split(","))
    p.add_argument("--layers", type=int, help="truncate both models to their first N blocks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=200, help="same-settings runs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--recipes", default="same,default,scaling", type=lambda s: s.split(","),
                   help="same: identical settings; default: each tool's default recipe; scaling: signround at three sizes of iters x nsamples x seqlen")
    p.add_argument("--scaling-points", default="25x32x512,50x32x512,50x64x512,50x32x256", type=lambda s: s.split(","),
                   help="ITERSxNSAMPLESxSEQLEN for the scaling rows (first scheme)")
    p.add_argument("--repeats", type=int, default=1,
                   help="same-settings pairs to run (the tools alternate who goes first): one pair cannot separate a few percent from this machine's drift")
    p.add_argument("--tools", default="signround,auto-round", type=lambda s: s.split(","), help="whose runs to make (rows stored earlier are kept)")
    p.add_argument("--autoround-amp", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--name", default="vs_autoround", help="results file stem")
    p.add_argument("--rerun", action="store_true", help="run again where a row is stored (replacing it), e.g. to time both tools in one session")
    p.add_argument("--table-only", action="store_true", help="rewrite the markdown table from the stored results and stop")
    p.add_argument("--project-clipping", action=argparse.BooleanOptionalAction,
                   help="signround runs with (or without) the clipping-scale projection, whatever its recipe's default; stored as its own rows")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, help="signround variant: start the clipping scales at the search (or not)")
    p.add_argument("--tame-outliers", action=argparse.BooleanOptionalAction, help="signround variant: weigh down massive tokens in the loss (or not)")
    p.add_argument("--adapt-batch", action=argparse.BooleanOptionalAction,
                   help="signround variant: single-row steps where the rows' gradients agree (or always the recipe's batch)")
    p.add_argument("--seed", type=int, help="signround variant: the seed of its batch sampling (42 otherwise): how far one run is from another")
    p.add_argument("--cache-dtype", choices=["float32", "bfloat16"], help="signround variant: the activation caches' dtype")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import signround.models as models

        args.layers_run = args.layers or models.load_metadata(models.resolve(args.model))[0].num_hidden_layers
        row = (_child_signround if args.child == "signround" else _child_autoround)(args)
        print(json.dumps(row))
        return

    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / f"{args.name}.json"
    stored = json.loads(store.read_text()) if store.exists() else {}
    setting = f"{args.model}|layers{args.layers or 'all'}|n{args.nsamples}x{args.seqlen}|iters{args.iters}|bs{args.batch_size}|{args.device}"
    results = stored.setdefault(setting, {})
    peaks = {"bf16": matmul_peak(torch.bfloat16, args.device), "fp32": matmul_peak(torch.float32, args.device)}
    if args.table_only:
        args.recipes = []
    for point in args.scaling_points if "scaling" in args.recipes else []:
        key = signround_key("scaling", point, args)
        if key not in results:
            iters, nsamples, seqlen = (int(x) for x in point.split("x"))
            sized = argparse.Namespace(**{**vars(args), "iters": iters, "nsamples": nsamples, "seqlen": seqlen})
            results[key] = run_child("signround", "scaling", args.schemes[0], sized)
            store.write_text(json.dumps(stored, indent=1))
    table = RESULTS / f"{args.name}-{'all' if not args.layers else args.layers}.md"
    for recipe in [r for r in args.recipes if r != "scaling"]:
        for scheme in args.schemes:
            tools = [t for t in ("signround", "auto-round") if t in args.tools]
            for tool in tools:  # alternating, so drifting machine load hits both
                key = run_key(tool, recipe, scheme, args)
                twin = f"{tool}|{'default' if recipe == 'same' else 'same'}|{scheme}"
                if key in results and not args.rerun:
                    continue
                if tool == "auto-round" and twin in results and same_is_autoround_default(args) and not args.rerun:
                    results[key] = dict(results[twin])  # one run serves both tables: ~100 minutes saved at full depth on CPU
                else:
                    results[key] = {**run_child(tool, recipe, scheme, args), "matmul_peaks": peaks}
                store.write_text(json.dumps(stored, indent=1))  # the borrowed row too: a later --table-only needs it
                write_table(results, args, peaks, table)
            for round_ in range(1, args.repeats if recipe == "same" else 1):  # the first round is the rows above
                for tool in tools if round_ % 2 == 0 else tools[::-1]:  # who goes first alternates too
                    key = run_key(tool, recipe, scheme, args)
                    runs = results[key].setdefault("repeats", [])
                    if len(runs) < round_:
                        runs.append({**run_child(tool, recipe, scheme, args), "matmul_peaks": peaks})
                        store.write_text(json.dumps(stored, indent=1))
                        write_table(results, args, peaks, table)
    write_table(results, args, peaks, table)
    print(table.read_text())


if __name__ == "__main__":
    main()
