"""Peak memory of quantization against model depth, and what the activation-cache options cost and save.

  depth   SmolLM2 truncated to 8, 16 and 30 blocks, quantized streamed (blocks read one at a time from
          the GGUF, finished blocks to disk) and loaded whole: peak RSS of each, model load included;
  caches  --cache-dtype float32/bfloat16 x in memory/--offload: tuning time, peak RSS and wt2-32k perplexity.

Every run is its own process (its peak RSS is its own); calibration is gutenberg-128x512.

    python benchmarks/memory.py                       # both tables
    python benchmarks/memory.py --tables caches        # the other table stays as the last run wrote it
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol


def child(args) -> dict:
    import signround
    from signround.evaluate import perplexity
    from signround.resume import finished_blocks
    from signround.weights import materialize_blocks, open_lazy

    if args.stream:
        model, tokenizer, weights = open_lazy(args.model)
    else:
        (model, tokenizer), weights = signround.load_model(args.model), None
    protocol.truncate(model, args.layers)
    calib = protocol.gutenberg_calibration(tokenizer, args.nsamples, args.seqlen)
    config = signround.QuantConfig(scheme=args.scheme, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        start = time.perf_counter()
        run = signround.RunConfig(cache_dtype=args.cache_dtype, offload=args.offload, work_dir=work, progress=False)
        signround.quantize(model, config, run, tokenizer=tokenizer, calibration=calib, weights=weights)
        row = {"tuning_s": time.perf_counter() - start, "peak_rss_mib": protocol.peak_rss_mib()}
        if args.ppl:
            if weights is not None:
                materialize_blocks(model, finished_blocks(work, model))
            row["ppl"] = perplexity(model, protocol.wikitext_ids(tokenizer))
    return row


def run(args, layers: int, stream: bool, cache_dtype: str = "float32", offload: bool = False, iters: int | None = None, ppl: bool = False) -> dict:
    argv = [sys.executable, __file__, "--child", "--model", args.model, "--scheme", args.scheme, "--layers", str(layers),
            "--iters", str(iters if iters is not None else args.iters), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--cache-dtype", cache_dtype, *(["--stream"] if stream else []), *(["--offload"] if offload else []), *(["--ppl"] if ppl else [])]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"   layers {layers} stream {stream} cache {cache_dtype} offload {offload}: {row}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--depths", default="8,16,30", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--iters", type=int, default=2, help="tuning steps per block in the depth table (memory does not depend on them)")
    p.add_argument("--cache-layers", type=int, default=30)
    p.add_argument("--cache-iters", type=int, default=10)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--tables", default="depth,caches", type=lambda s: s.split(","))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ppl", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    cache_mib = 2 * args.nsamples * args.seqlen * 576 * 4 / 2**20
    lines = [f"# Peak memory of quantization: {args.model} {args.scheme}, calibration gutenberg-{args.nsamples}x{args.seqlen}", "",
             f"machine: {protocol.cpu_name()}; peak RSS includes loading the model; one fp32 hidden-state cache "
             f"(both streams) is {cache_mib:.0f} MiB", ""]

    def write() -> None:  # after every row, so an interrupted run keeps what it measured
        protocol.write_result("memory.md", lines, echo=False)

    previous = (protocol.RESULTS / "memory.md").read_text() if (protocol.RESULTS / "memory.md").is_file() else ""

    def kept(title: str) -> list[str]:
        """A table not run this time, as the previous file had it (with its own settings in its heading)."""
        for section in previous.split("\n## ")[1:]:
            if section.startswith(title):
                body = section.split("\nupdated ")[0].rstrip("\n").splitlines()
                return ["## " + body[0], *body[1:], ""]
        return []

    if "depth" in args.tables:
        lines += [f"## Peak RSS against depth (iters {args.iters})", "", "| blocks | streamed MiB | loaded whole MiB |", "|---|---|---|"]
        for layers in args.depths:
            streamed, whole = run(args, layers, True), run(args, layers, False)
            lines.append(f"| {layers} | {streamed['peak_rss_mib']:.0f} | {whole['peak_rss_mib']:.0f} |")
            write()
        lines.append("")
    else:
        lines += kept("Peak RSS against depth")
    if "caches" in args.tables:
        lines += [f"## Activation caches ({args.cache_layers} blocks, iters {args.cache_iters}, streamed)", "",
                  "| cache dtype | where | tuning s | peak RSS MiB | wt2-32k ppl |", "|---|---|---|---|---|"]
        for cache_dtype in ("float32", "bfloat16"):
            for offload in (False, True):
                row = run(args, args.cache_layers, True, cache_dtype, offload, iters=args.cache_iters, ppl=True)
                lines.append(f"| {cache_dtype} | {'disk' if offload else 'memory'} | {row['tuning_s']:.0f} | {row['peak_rss_mib']:.0f} | {row['ppl']:.3f} |")
                write()
    else:
        lines += kept("Activation caches")
    protocol.write_result("memory.md", lines)


if __name__ == "__main__":
    main()
