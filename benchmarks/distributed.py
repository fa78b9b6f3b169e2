"""Data-parallel tuning against one process on SmolLM2-135M (issue 32's bar): the same run under
`torchrun --nproc-per-node N` and alone, each in processes of its own, side by side on this machine.
Reports wall time, tuning time, wt2-32k perplexity (protocol) and the share of identical codes.

    python benchmarks/distributed.py                      # W4A16, default recipe, 2 processes
    python benchmarks/distributed.py --layers 4 --procs 2
    python benchmarks/distributed.py --seeds 43,44    # also one-process runs with other seeds: the chance spread

On a 2-core CPU no speed-up is expected: one process already uses both cores (2 threads), two processes
one each; the point is that the result is the one-process result. On N GPUs each rank has its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

import signround
from signround.qlinear import QuantLinear


def child(args) -> None:
    """One run (alone, or one rank of several): signround.run as a user calls it."""
    from signround import distributed

    model, tokenizer = args.model, protocol.tokenizer_of(args.model)
    if args.layers:  # a truncated copy, loaded whole: the streamed path reads the file's full depth
        model = protocol.truncate(signround.load_model(args.model)[0], args.layers)
    config = signround.QuantConfig(scheme=args.scheme, seed=args.seed)
    report = signround.run(model, args.child, config, signround.RunConfig(progress=False, device=args.device, amp=args.amp),
                           calibration=protocol.gutenberg_calibration(tokenizer), tokenizer=tokenizer)
    if distributed.is_writer():
        print(json.dumps({"tuning_s": report.tuning_seconds, "steps": report.tuning_steps, "losses": report.block_losses}))


def launch(args, out: Path, procs: int, seed: int) -> dict:
    argv = [__file__, "--child", str(out), "--model", args.model, "--scheme", args.scheme, "--device", args.device, "--amp", args.amp, "--seed", str(seed),
            *(["--layers", str(args.layers)] if args.layers else [])]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else [sys.executable]
    start = time.perf_counter()
    done = subprocess.run([*launcher, *argv], capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise SystemExit(f"the {procs}-process run failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}


def codes(folder: Path) -> dict[str, torch.Tensor]:
    model = signround.load(folder)
    return {n: m.quantized_weight().codes for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--layers", type=int, help="truncate the model to its first N blocks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", help="autocast of the runs (off: fp32, where only the order of float sums differs)")
    p.add_argument("--seed", type=int, default=signround.QuantConfig().seed)
    p.add_argument("--seeds", default="", help="comma-separated seeds of extra one-process runs: how far chance alone moves perplexity")
    p.add_argument("--fresh", action="store_true", help="measure every run again instead of reusing the stored rows")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    name = f"distributed-{args.model}{f'-{args.layers}' if args.layers else ''}{'' if args.amp == 'auto' else f'-amp-{args.amp}'}"
    store = protocol.RESULTS / f"{name}.json"
    rows = json.loads(store.read_text()) if store.exists() and not args.fresh else {}
    base, many = f"1 process, seed {args.seed}", f"{args.procs} processes, seed {args.seed}"
    runs = {base: (1, args.seed), many: (args.procs, args.seed), **{f"1 process, seed {s}": (1, int(s)) for s in args.seeds.split(",") if s}}
    tokenizer = protocol.tokenizer_of(args.model)
    ids = protocol.wikitext_ids(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        for label, (procs, seed) in runs.items():
            if label in rows:  # measured before (--fresh measures again)
                continue
            out = Path(tmp) / label.replace(", ", "-").replace(" ", "")
            rows[label] = launch(args, out, procs, seed)
            rows[label]["ppl"] = protocol.scored_perplexity(signround.load(out), tokenizer, ids)
            rows[label]["folder"] = str(out)
            print(f"{label}: {rows[label]}", flush=True)
        fresh = [label for label in rows if "folder" in rows[label]]
        for b in [label for label in fresh if label != base] if base in fresh else []:  # only between folders of this invocation
            one, other = codes(Path(rows[base]["folder"])), codes(Path(rows[b]["folder"]))
            rows[b]["identical"] = sum(int((one[k] == other[k]).sum()) for k in one) / sum(v.numel() for v in one.values())
    for row in rows.values():
        row.pop("folder", None)
    store.write_text(json.dumps(rows, indent=1))
    a, b = rows[base], rows[many]
    depth = f" (first {args.layers} blocks)" if args.layers else ""
    lines = [f"# Data-parallel tuning: {args.model}{depth}, {args.scheme}, default recipe, amp {args.amp}", "",
             f"machine: {protocol.cpu_name()}, {os.cpu_count()} cores; calibration gutenberg-128x512, wt2-32k; "
             f"{args.procs} processes under torchrun (gloo, 1 thread each) against one process ({torch.get_num_threads()} threads). "
             "Other seeds of one process say how far chance alone moves the result.", "",
             "| run | wall s | tuning s | steps | wt2 ppl | ppl vs one process | identical codes |", "|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        vs = f"{(row['ppl'] / a['ppl'] - 1) * 100:+.3f}%" if label != base else ""
        same = f"{row['identical']:.2%}" if "identical" in row else ""
        lines.append(f"| {label} | {row['wall_s']:.0f} | {row['tuning_s']:.0f} | {row['steps']} | {row['ppl']:.3f} | {vs} | {same} |")
    lines += ["", f"wall-time ratio {b['wall_s'] / a['wall_s']:.2f}, tuning-time ratio {b['tuning_s'] / a['tuning_s']:.2f} "
                  f"(on {os.cpu_count()} cores no speed-up is expected: one process already uses them all)"]
    protocol.write_result(f"{name}.md", lines)

if __name__ == "__main__":
    main()
