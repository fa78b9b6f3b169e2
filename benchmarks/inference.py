"""CPU inference of signround's own W4A16 format against the unquantized model: prefill and decode
throughput, weight memory and perplexity, side by side in one run.

    python benchmarks/inference.py                 # SmolLM2-135M, RTN W4A16 codes
    python benchmarks/inference.py --scheme W4A16G64 --decode 64
    python benchmarks/inference.py --scheme W8A8                  # torch's int8 matmul against the simulated W8A8

`signround.load(..., dtype=torch.bfloat16)` runs 4-bit layers through torch's packed int4 matmul for
short inputs (decoding) and dequantizes for long ones (prefill); `dtype=torch.float32` always dequantizes.
W8A8 layers multiply int8 inputs and weights with torch's int8 matmul (`--scheme W8A8` also times the
simulated path: dequantized weights, quantize-dequantized inputs).
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


def simulated(model):
    """W8A8 layers without torch's int8 matmul: dequantized weights times quantize-dequantized inputs."""
    from signround.qlinear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.INT8_MATMUL = False
    return model


def weight_bytes(model) -> int:
    """Parameters and buffers, and the kernels' weight copies built on first use (int4 repacked, int8 transposed)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for m in model.modules():
        cached = [*m.__dict__.get("_int4_cache", {}).values(), m.__dict__.get("_int8_cache", ())]
        tensors.update({id(t): t for entry in cached for t in entry if isinstance(t, torch.Tensor)})
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
        int8 = signround.WeightScheme.preset(args.scheme).act == "INT8"
        variants = {
            "fp32 (original)": lambda: base,
            "bf16 (original)": lambda: signround.load_model(args.model)[0].to(torch.bfloat16),
            f"{args.scheme} fp32 ({'int8 matmul' if int8 else 'dequantize'})": lambda: signround.load(Path(tmp) / "q", dtype=torch.float32),
            f"{args.scheme} bf16 ({'int8 matmul' if int8 else 'int4 kernel when decoding'})": lambda: signround.load(Path(tmp) / "q", dtype=torch.bfloat16),
        }
        if int8:
            variants[f"{args.scheme} fp32 (simulated)"] = lambda: simulated(signround.load(Path(tmp) / "q", dtype=torch.float32))
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
    protocol.write_result("inference.md" if args.scheme == "W4A16" else f"inference-{args.scheme}.md", lines)


if __name__ == "__main__":
    main()
