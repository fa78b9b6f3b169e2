"""CPU inference of signround's own W4A16 format against the unquantized model: prefill and decode
throughput, weight memory and perplexity, side by side in one run.

    python benchmarks/inference.py                 # SmolLM2-135M, RTN W4A16 codes
    python benchmarks/inference.py --scheme W4A16G64 --decode 64

`signround.load(..., dtype=torch.bfloat16)` runs 4-bit layers through torch's packed int4 matmul for
short inputs (decoding) and dequantizes for long ones (prefill); `dtype=torch.float32` always dequantizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

import signround
from signround.evaluate import perplexity
from signround.hardware import cpu_has_fast_bf16


def weight_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def prefill_tokens_per_s(model, ids: torch.Tensor, repeats: int) -> float:
    model(ids)  # warm-up: lazily built kernels and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    start = time.perf_counter()
    model.generate(prompt, **kwargs)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill measurement")
    p.add_argument("--decode", type=int, default=32, help="tokens generated for the decode measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    args = p.parse_args()

    base, tokenizer = signround.load_model(args.model)
    ids = protocol.wikitext_ids(tokenizer, max(args.ppl_tokens, args.prefill))
    prompt = ids[: args.prefill].unsqueeze(0)
    short = ids[:16].unsqueeze(0)
    eval_ids = ids[: args.ppl_tokens]
    with tempfile.TemporaryDirectory() as tmp:
        quantized = signround.load_model(args.model)[0]
        signround.quantize(quantized, signround.QuantConfig(scheme=args.scheme, method="rtn"))
        signround.save(quantized, Path(tmp) / "q", tokenizer)
        variants = {
            "fp32 (original)": lambda: base,
            "bf16 (original)": lambda: signround.load_model(args.model)[0].to(torch.bfloat16),
            f"{args.scheme} fp32 (dequantize)": lambda: signround.load(Path(tmp) / "q", dtype=torch.float32),
            f"{args.scheme} bf16 (int4 kernel when decoding)": lambda: signround.load(Path(tmp) / "q", dtype=torch.bfloat16),
        }
        rows = []
        for name, build in variants.items():
            model = build().eval()
            rows.append((name, prefill_tokens_per_s(model, prompt, args.repeats), decode_tokens_per_s(model, short, args.decode),
                         weight_bytes(model) / 2**20, perplexity(model, eval_ids)))
            print(rows[-1], flush=True)

    ref_prefill, ref_decode = rows[0][1], rows[0][2]
    lines = [f"# CPU inference of {args.model}: {args.scheme} against the original", "",
             f"{torch.get_num_threads()} threads, {protocol.cpu_name()}, fast bf16 matmul: {'yes' if cpu_has_fast_bf16() else 'no (AVX2 only)'}; "
             f"prefill {args.prefill} tokens, decode {args.decode} tokens after a 16-token prompt; perplexity on wt2's first {args.ppl_tokens} tokens", "",
             "| model | prefill tok/s | vs fp32 | decode tok/s | vs fp32 | weights + buffers (MiB) | wt2 ppl |", "|---|---|---|---|---|---|---|"]
    for name, prefill, decode, mib, ppl in rows:
        lines.append(f"| {name} | {prefill:.0f} | {prefill / ref_prefill:.2f}x | {decode:.1f} | {decode / ref_decode:.2f}x | {mib:.0f} | {ppl:.3f} |")
    protocol.write_result("inference.md", lines)


if __name__ == "__main__":
    main()
