"""How closely a recipe tunes one block: the first block's relative output error (`protocol.block_errors`)
after SignRound with each given iters x batch, on the error rows vs_autoround.py uses. Block 0 sees the
same inputs (the embeddings) in every tool, so its error compares directly with auto-round's block 0 in
vs_autoround's "Block output error" table: a gap there is the tuning's own, not propagated.

    python benchmarks/first_block.py --model gemma3-270m --scheme W2A16G64 --recipes 112x3,112x8,200x3,200x8,112x3:float32
"""

from __future__ import annotations

import argparse
import copy
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
    p.add_argument("--recipes", default="112x3,200x8", type=lambda s: s.split(","),
                   help="ITERSxBATCH, optionally :float32 for float32 activation caches")
    args = p.parse_args()
    model, tokenizer = signround.load_model(args.model)
    protocol.truncate(model, 2)  # block 1 is kept 16-bit: block 0's raw output is then hidden state 1, not the final-normed last one
    calib = protocol.gutenberg_calibration(tokenizer, 128, 512)
    lines = [f"# First-block error by recipe: {args.model}, {args.scheme}, gutenberg-128x512, error on {ERROR_ROWS} rows", "",
             "| iters x batch | caches | tuning s | block 0 relative error |", "|---|---|---|---|"]
    for spec in args.recipes:
        shape, _, caches = spec.partition(":")
        iters, batch = (int(v) for v in shape.split("x"))
        quantized = copy.deepcopy(model)
        config = signround.QuantConfig(scheme=args.scheme, iters=iters, batch_size=batch, seqlen=512, seed=42,
                                       layer_overrides={r"\.layers\.1\.": "fp16"})
        run = signround.RunConfig(cache_dtype=caches or "bfloat16", progress=False)
        start = time.perf_counter()
        signround.quantize(quantized, config, run, tokenizer=tokenizer, calibration=calib)
        seconds = time.perf_counter() - start
        error = protocol.block_errors(model, quantized, calib[:ERROR_ROWS])[0]
        lines.append(f"| {iters} x {batch} | {caches or 'bfloat16'} | {seconds:.0f} | {error:.3e} |")
        print(lines[-1], flush=True)
    protocol.write_result(f"first_block-{args.model}-{args.scheme}.md", lines)


if __name__ == "__main__":
    main()
