"""Where a quantized model's hidden-state error sits, token by token: the share of the squared error
at each depth that falls on the first token (the attention sink, whose hidden state is massive) and
on the four worst tokens of each row, with the sink's energy against a typical token's. This is what
the plain block-output MSE SignRound minimises is made of (`--tame-outliers` weighs it otherwise).

    python benchmarks/token_errors.py            # W4A16 round-to-nearest, 8 gutenberg rows of 512 tokens
    python benchmarks/token_errors.py --model gemma3-270m   # its rows start with BOS (protocol.py)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

import signround
from signround.blocks import as_param_layout, find_blocks, find_linears, linear_weight
from signround.quant.integer import fake_quant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--rows", type=int, default=8)
    args = p.parse_args()
    scheme = signround.WeightScheme.preset(args.scheme)
    model, tokenizer = signround.load_model(args.model)
    ids = protocol.gutenberg_calibration(tokenizer, args.rows, 512)
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for block in find_blocks(quantized)[1]:
            for module in find_linears(block).values():
                rounded = fake_quant(linear_weight(module), scheme.bits, scheme.group_size, scheme.sym)
                module.weight.copy_(as_param_layout(module, rounded))
        # the body alone: a 262k-token head would make gigabytes of logits nobody reads
        original = model.get_decoder()(ids, output_hidden_states=True).hidden_states
        rounded = quantized.get_decoder()(ids, output_hidden_states=True).hidden_states
    lines = [f"# Hidden-state error by token: {args.model}, {args.scheme} round-to-nearest, {args.rows} gutenberg rows of 512 tokens", "",
             "| after block | first token's share of the squared error | 4 worst tokens' share | first token's energy / median token's |",
             "|---|---|---|---|"]
    for depth in range(1, len(original)):
        err = (original[depth] - rounded[depth]).pow(2).sum(-1)
        energy = original[depth].pow(2).sum(-1)
        lines.append(f"| {depth - 1} | {err[:, 0].sum() / err.sum():.2f} | {err.topk(4, dim=1).values.sum() / err.sum():.2f} | "
                     f"{energy[:, 0].mean() / energy.median():.0f} |")
    protocol.write_result("token_errors.md" if args.model == "smollm2-135m" else f"token_errors-{args.model}.md", lines)


if __name__ == "__main__":
    main()
