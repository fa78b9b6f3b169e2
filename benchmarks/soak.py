"""Soak: quantize one model again and again in one process, each scheme once straight through and once
interrupted after a random block and resumed, and check that every result loads, that the resumed
result is byte-identical to its uninterrupted twin, and that memory does not grow from run to run.

    python benchmarks/soak.py                  # SmolLM2-135M, 5 schemes, light tuning settings
    python benchmarks/soak.py --iters 20 --layers 8
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

import signround


class _Stop(Exception):
    """Stands for a crash after a chosen block."""


def packed_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", default="W4A16,W3A16,W2A16G64,W8A16,W4A16G32", type=lambda s: s.split(","))
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--layers", type=int, help="truncate the model to its first N blocks")
    p.add_argument("--seed", type=int, default=0, help="picks the blocks the runs are interrupted after")
    args = p.parse_args()

    base, tokenizer = signround.load_model(args.model)
    protocol.truncate(base, args.layers)
    blocks = len(base.model.layers)
    calib = protocol.gutenberg_calibration(tokenizer, args.nsamples, args.seqlen)
    rng = random.Random(args.seed)
    rows, rss = [], [protocol.status_mib("VmRSS")]
    with tempfile.TemporaryDirectory() as tmp:
        for n, scheme in enumerate(args.schemes):
            config = signround.QuantConfig(scheme=scheme, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=4)
            start = time.perf_counter()
            twin = copy.deepcopy(base)
            signround.quantize(twin, config, calibration=calib)
            straight_s = time.perf_counter() - start

            stop_after = rng.randrange(0, blocks - 1)
            work = Path(tmp) / f"work-{n}"

            def crash(index, report, stop_after=stop_after):
                if index == stop_after:
                    raise _Stop

            interrupted = copy.deepcopy(base)
            try:
                signround.quantize(interrupted, config, calibration=calib, run=signround.RunConfig(progress=False, work_dir=work), on_block_done=crash)
                raise RuntimeError("the run was meant to be interrupted")
            except _Stop:
                pass
            del interrupted
            resumed = copy.deepcopy(base)
            start = time.perf_counter()
            signround.quantize(resumed, config, calibration=calib, run=signround.RunConfig(progress=False, work_dir=work))
            resumed_s = time.perf_counter() - start

            out = Path(tmp) / f"out-{n}"
            signround.save(resumed, out, tokenizer)
            reloaded = signround.load(out)
            same = identical(packed_state(resumed), packed_state(twin))
            loads = identical({k: v for k, v in packed_state(reloaded).items() if k.endswith(("qweight", "qzeros", "scales"))},
                              {k: v for k, v in packed_state(resumed).items() if k.endswith(("qweight", "qzeros", "scales"))})
            del twin, resumed, reloaded
            gc.collect()
            rss.append(protocol.status_mib("VmRSS"))
            rows.append((scheme, stop_after, straight_s, resumed_s, same, loads, rss[-1]))
            print(f"{scheme}: interrupted after block {stop_after}, identical to twin: {same}, reloads: {loads}, RSS {rss[-1]:.0f} MiB", flush=True)

    growth = rss[-1] - rss[1]  # after the first run: allocator pools and lazily built kernels are warm
    lines = [f"# Soak: {args.model}, {len(args.schemes)} schemes, each straight and interrupted-then-resumed in one process", "",
             f"iters {args.iters}, {args.nsamples} x {args.seqlen} Gutenberg tokens, {blocks} blocks", "",
             "| scheme | interrupted after block | straight s | resumed s | resumed == straight (bytes) | reload matches | RSS after (MiB) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {s} | {k} | {a:.1f} | {b:.1f} | {'yes' if same else 'NO'} | {'yes' if ok else 'NO'} | {r:.0f} |" for s, k, a, b, same, ok, r in rows]
    lines += ["", f"RSS before the first run {rss[0]:.0f} MiB; growth from the end of run 1 to the end of run {len(rows)}: {growth:+.0f} MiB"]
    protocol.write_result("soak.md", lines)
    if not all(same and ok for *_, same, ok, _ in rows) or growth > 200:
        sys.exit("soak failed: a resumed run differs, a result does not reload, or memory grew by more than 200 MiB")


if __name__ == "__main__":
    main()
