"""llama.cpp interop: build llama-cpp-python when it is missing, run signround's GGUF export of
SmolLM2-135M in llama.cpp itself, and report its perplexity next to signround's own on the same
token ids (wt2, no BOS).

    python benchmarks/llama_cpp_interop.py                 # RTN codes, Q4_0, Q4_1, the K-quants and Q4_K_M, 4,096 tokens
    python benchmarks/llama_cpp_interop.py --method signround --iters 50
    python benchmarks/llama_cpp_interop.py --model gemma3-270m --types Q4_0,Q8_0      # gemma3 (BOS before each window)
    python benchmarks/llama_cpp_interop.py --upcycle 8 --types Q4_0,Q4_K              # SmolLM2 upcycled to a Mixtral, top-2

Building llama-cpp-python from source takes minutes (too slow for CI), which is why this is a script
and not a test. Writes benchmarks/results/llama_cpp.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

import signround
from signround.evaluate import perplexity
from signround.export import export
from signround.export.gguf import FILE_NAME

SCHEMES = {"Q4_0": "bits=4,group_size=32,sym=true", "Q4_1": "bits=4,group_size=32,sym=false", "Q8_0": "bits=8,group_size=32,sym=true",
           **{k: k for k in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")}}  # K-quants: 576-wide layers take llama.cpp's legacy fallback


def ensure_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        print("building llama-cpp-python from source (several minutes)...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True)


def llama_cpp_perplexity(gguf_path: Path, ids: torch.Tensor, window: int, bos: int | None = None) -> float:
    """exp(mean NLL) over non-overlapping windows, the same windows signround's perplexity scores (`bos` put
    before each window and not scored, as signround's perplexity does for models trained with it)."""
    from llama_cpp import Llama

    prefix = [] if bos is None else [bos]
    llm = Llama(model_path=str(gguf_path), n_ctx=window + len(prefix), logits_all=True, verbose=False, n_threads=torch.get_num_threads())
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = prefix + ids[start : start + window].tolist()
        if len(chunk) - len(prefix) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[len(prefix) : len(chunk)], dtype=np.float64)  # predictions of chunk[len(prefix) + 1:]
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        targets = np.asarray(chunk[len(prefix) + 1 :])
        nll -= logprobs[np.arange(len(targets)), targets].sum()
        count += len(targets)
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--types", default="Q4_0,Q4_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_K_M", type=lambda s: s.split(","), help=f"GGUF block types: {', '.join(SCHEMES)}")
    p.add_argument("--method", default="rtn")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--upcycle", type=int, default=0, help="experts: run the model upcycled to a Mixtral of this many (top-2)")
    args = p.parse_args()
    ensure_llama_cpp()

    _, tokenizer = signround.load_model(args.model)
    ids = protocol.wikitext_ids(tokenizer, args.tokens)
    bos = tokenizer.bos_token_id if protocol.needs_bos(tokenizer) else None
    calibration = protocol.gutenberg_calibration(tokenizer, 32, 512) if args.method != "rtn" else None
    rows = []
    for qtype in args.types:
        model = signround.load_model(args.model)[0]
        if args.upcycle:
            from signround.upcycle import upcycle

            model = upcycle(model, experts=args.upcycle, top_k=2)
        config = signround.QuantConfig(scheme=SCHEMES[qtype], method=args.method, iters=args.iters, nsamples=32, seqlen=512)
        signround.quantize(model, config, tokenizer=tokenizer, calibration=calibration)
        ours = perplexity(model, ids, seqlen=args.window, bos_token_id=bos)
        with tempfile.TemporaryDirectory() as tmp:
            folder = export(model, tokenizer, Path(tmp) / "gguf", "gguf")
            theirs = llama_cpp_perplexity(folder / FILE_NAME, ids, args.window, bos)
        rows.append((qtype, ours, theirs))
        print(f"{qtype}: signround {ours:.3f}, llama.cpp {theirs:.3f} ({(theirs / ours - 1) * 100:+.2f}%)", flush=True)

    import llama_cpp

    name = f"{args.model}{f' upcycled to {args.upcycle} experts (Mixtral)' if args.upcycle else ''}"
    lines = [f"# {name} GGUF export run in llama.cpp (llama-cpp-python {llama_cpp.__version__})", "",
             f"{args.method} codes{f', {args.iters} iters' if args.method != 'rtn' else ''}; wt2 first {args.tokens} tokens, "
             f"windows of {args.window}, {'BOS before each' if bos is not None else 'no BOS'}, the same token ids for both", "",
             "K-quant rows: layers whose rows hold no whole 256-weight super-block (SmolLM2's 576-wide, Gemma-3's 640-wide) take "
             "llama.cpp's fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0), as llama.cpp's own quantizer does", "",
             "| GGUF type | signround ppl | llama.cpp ppl | diff |", "|---|---|---|---|"]
    lines += [f"| {q} | {a:.3f} | {b:.3f} | {(b / a - 1) * 100:+.2f}% |" for q, a, b in rows]
    suffix = f"-{args.model}" if args.model != "smollm2-135m" else ""
    protocol.write_result(f"llama_cpp{suffix}{f'-moe{args.upcycle}' if args.upcycle else ''}.md", lines)


if __name__ == "__main__":
    main()
