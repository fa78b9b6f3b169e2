"""Tuning recipes compared on the first blocks of a model: the block-output loss each reaches after
tuning (the quantity SignRound minimises), for steps x batch x start-point variants, with the cost in
calibration rows processed relative to the full recipe (200 steps of 8 rows). Cheap enough to explore
recipes before paying for perplexity runs; protocol calibration gutenberg-128x512.

    python benchmarks/recipes.py --layers 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

import signround

VARIANTS = {  # name: QuantConfig overrides (cache_dtype: the RunConfig's)
    "paper, unprojected: 200 x 8, RTN start, keep best": dict(recipe="paper", project_clipping=False),
    "paper: clipping projected onto [0, 1]": dict(recipe="paper"),
    "paper, bf16 caches": dict(recipe="paper", cache_dtype="bfloat16"),
    "full 200 x 8 (clip search, projected at 2 bits, bf16 caches)": dict(recipe="full"),
    "64 x 8, RTN start": dict(recipe="paper", project_clipping=False, iters=64),
    "64 x 8, clip search": dict(recipe="paper", project_clipping=False, iters=64, clip_search=True),
    "100 x 4, clip search": dict(recipe="paper", project_clipping=False, iters=100, batch_size=4, clip_search=True),
    "160 x 2, clip search": dict(recipe="paper", project_clipping=False, iters=160, batch_size=2, clip_search=True),
    "128 x 4, RTN start": dict(recipe="paper", project_clipping=False, iters=128, batch_size=4),
    "200 x 2, clip search, keep best": dict(recipe="fast", iters=200, batch_size=2, keep="best"),
    "128 x 4, clip search, keep best": dict(recipe="fast", batch_size=4, keep="best"),
    "fast: 128 x 3, clip search, keep best": dict(recipe="fast", iters=128),
    "fast: 112 x 3, clip search, keep best": dict(recipe="fast"),
    "fast, clipping projected onto [0, 1]": dict(recipe="fast", project_clipping=True),
    "128 x 3, clip search, keep best, fp32 caches": dict(recipe="fast", cache_dtype="float32", keep="best"),
    "200 x 3, clip search, keep best": dict(recipe="fast", iters=200, keep="best"),
    "128 x 3, clip search, keep last": dict(recipe="fast", keep="last"),
    "128 x 3, clip search, keep last, lr 1.5/iters": dict(recipe="fast", lr=1.5 / 128, keep="last"),
    "128 x 3, clip search, keep last, lr 0.7/iters": dict(recipe="fast", lr=0.7 / 128, keep="last"),
    "clip search only (0 steps)": dict(recipe="fast", iters=0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--variants", default=";".join(VARIANTS), type=lambda s: s.split(";"), help="names separated by ;")
    args = p.parse_args()
    base, tokenizer = signround.load_model(args.model)
    protocol.truncate(base, args.layers)
    calib = protocol.gutenberg_calibration(tokenizer, 128, 512)
    lines = [f"# Recipes on the first {args.layers} blocks of {args.model}, {args.scheme}, gutenberg-128x512", "",
             "Block-output MSE after tuning, each block on the inputs the quantized blocks before it produce.", "",
             "| recipe | cost (rows vs full) | " + " | ".join(f"block {i}" for i in range(args.layers)) + " | tuning s |",
             "|---|---|" + "---|" * args.layers + "---|"]
    name_out = f"recipes-{args.layers}{'' if args.scheme == 'W4A16' else '-' + args.scheme}.md"
    earlier = (protocol.RESULTS / name_out).read_text().splitlines() if (protocol.RESULTS / name_out).exists() else []
    lines += [row for row in earlier[len(lines):] if row.startswith("| ") and row.split(" | ")[0][2:] not in args.variants]  # rows not rerun stay
    for name in args.variants:
        settings = dict(VARIANTS[name])
        caches = settings.pop("cache_dtype", "float32" if settings.get("recipe") == "paper" else "bfloat16")  # the paper ran fp32 caches
        config = signround.QuantConfig(scheme=args.scheme, nsamples=128, seqlen=512, **settings).resolved()
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = signround.quantize(model, config, signround.RunConfig(cache_dtype=caches), tokenizer=tokenizer, calibration=calib)
        cost = config.iters * config.batch_size / (200 * 8)
        lines.append(f"| {name} | {cost:.2f} | " + " | ".join(f"{after:.4f}" for _, after in report.block_losses)
                     + f" | {time.perf_counter() - start:.0f} |")
        print(lines[-1], flush=True)
    protocol.write_result(name_out, lines, echo=False)


if __name__ == "__main__":
    main()
