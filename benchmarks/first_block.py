"""How closely a recipe tunes one block: the block's relative output error (`protocol.block_errors`) after
SignRound with each given recipe, on the error rows vs_autoround.py uses, every other block kept 16-bit.
Block 0 sees the same inputs (the embeddings) in every tool, so its error compares directly with
auto-round's block 0 in vs_autoround's "Block output error" table: a gap there is the tuning's own, not
propagated. A later block (`--block K`) sees the unquantized model's hidden states.

A recipe is ITERSxBATCH, then optional `:field=value` items setting QuantConfig or RunConfig fields
(`:cache_dtype=float32`, `:compile=true`, `:lr=0.005`); a bare `:float32` means float32 caches.

    python benchmarks/first_block.py --model gemma3-270m --scheme W2A16G64 --recipes 112x3,200x8,112x3:float32
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol
from vs_autoround import ERROR_ROWS

import signround


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--block", type=int, default=0, help="the block to tune (the others stay 16-bit)")
    p.add_argument("--recipes", default="112x3,200x8", type=lambda s: s.split(","),
                   help="ITERSxBATCH[:field=value...]: see above")
    args = p.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("signround.algorithms.signround").setLevel(logging.INFO)  # adapt_batch's agreement and choice
    model, tokenizer = signround.load_model(args.model)
    # one block past the tuned one, kept 16-bit: the tuned block's raw output is then a hidden state, not the final-normed last one
    protocol.truncate(model, args.block + 2)
    calib = protocol.gutenberg_calibration(tokenizer, 128, 512)
    others = {rf"\.layers\.(?!{args.block}\.)\d+\.": "fp16"}
    lines = [f"# Block {args.block} error by recipe: {args.model}, {args.scheme}, gutenberg-128x512, error on {ERROR_ROWS} rows", "",
             f"| recipe | steps | tuning s | block {args.block} relative error |", "|---|---|---|---|"]
    for spec in args.recipes:
        config, run = recipe(spec, signround.QuantConfig(scheme=args.scheme, seqlen=512, seed=42, layer_overrides=others),
                             signround.RunConfig(progress=False))
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        report = signround.quantize(quantized, config, run, tokenizer=tokenizer, calibration=calib)
        seconds = time.perf_counter() - start
        error = protocol.block_errors(model, quantized, calib[:ERROR_ROWS])[args.block]
        lines.append(f"| {spec} | {report.tuning_steps} | {seconds:.0f} | {error:.3e} |")
        print(lines[-1], flush=True)
    suffix = f"-block{args.block}" if args.block else ""
    protocol.write_result(f"first_block-{args.model}-{args.scheme}{suffix}.md", lines)


def recipe(spec: str, config, run):
    """`config` and `run` with a recipe spec's iters x batch and `field=value` items applied."""
    shape, *items = spec.split(":")
    iters, batch = (int(v) for v in shape.split("x"))
    config = dataclasses.replace(config, iters=iters, batch_size=batch)
    for item in items:
        key, _, text = item.partition("=") if "=" in item else ("cache_dtype", "=", item)
        value = {"true": True, "on": True, "false": False, "off": False}.get(text.lower(), text)
        if isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d*)?(e-?\d+)?", value):
            value = int(value) if value.lstrip("-").isdigit() else float(value)
        if key in {f.name for f in dataclasses.fields(config)}:
            config = dataclasses.replace(config, **{key: value})
        else:
            run = dataclasses.replace(run, **{key: value})
    return config, run

if __name__ == "__main__":
    main()
