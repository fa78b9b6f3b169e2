"""llama.cpp interop: build llama-cpp-python when it is missing, run signround's GGUF export of
SmolLM2-135M in llama.cpp itself, and report its perplexity next to signround's own on the same
token ids (wt2, no BOS).

    python benchmarks/llama_cpp_interop.py                 # RTN codes, Q4_0, Q4_1, the K-quants and Q4_K_M, 4,096 tokens
    python benchmarks/llama_cpp_interop.py --method signround --iters 50

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


def llama_cpp_perplexity(gguf_path: Path, ids: torch.Tensor, window: int) -> float:
    """exp(mean NLL) over non-overlapping windows, the same windows signround's perplexity scores."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=window, logits_all=True, verbose=False, n_threads=torch.get_num_threads())
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window].tolist()
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        targets = np.asarray(chunk[1:])
        nll -= logprobs[np.arange(len(chunk) - 1), targets].sum()
        count += len(chunk) - 1
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--types", default="Q4_0,Q4_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_K_M", type=lambda s: s.split(","), help=f"GGUF block types: {', '.join(SCHEMES)}")
    p.add_argument("--method", default="rtn")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    args = p.parse_args()
    ensure_llama_cpp()

    _, tokenizer = signround.load_model(args.model)
    ids = protocol.wikitext_ids(tokenizer, args.tokens)
    calibration = protocol.gutenberg_calibration(tokenizer, 32, 512) if args.method != "rtn" else None
    rows = []
    for qtype in args.types:
        model = signround.load_model(args.model)[0]
        config = signround.QuantConfig(scheme=SCHEMES[qtype], method=args.method, iters=args.iters, nsamples=32, seqlen=512)
        signround.quantize(model, config, tokenizer=tokenizer, calibration=calibration)
        ours = perplexity(model, ids, seqlen=args.window)
        with tempfile.TemporaryDirectory() as tmp:
            folder = export(model, tokenizer, Path(tmp) / "gguf", "gguf")
            theirs = llama_cpp_perplexity(folder / FILE_NAME, ids, args.window)
        rows.append((qtype, ours, theirs))
        print(f"{qtype}: signround {ours:.3f}, llama.cpp {theirs:.3f} ({(theirs / ours - 1) * 100:+.2f}%)", flush=True)

    import llama_cpp

    lines = [f"# {args.model} GGUF export run in llama.cpp (llama-cpp-python {llama_cpp.__version__})", "",
             f"{args.method} codes{f', {args.iters} iters' if args.method != 'rtn' else ''}; wt2 first {args.tokens} tokens, "
             f"windows of {args.window}, no BOS, the same token ids for both", "",
             "K-quant rows: the layers with 576-wide rows (all but down_proj) take llama.cpp's fallback type (Q4_K -> Q5_0, "
             "Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0), as llama.cpp's own quantizer does", "",
             "| GGUF type | signround ppl | llama.cpp ppl | diff |", "|---|---|---|---|"]
    lines += [f"| {q} | {a:.3f} | {b:.3f} | {(b / a - 1) * 100:+.2f}% |" for q, a, b in rows]
    protocol.write_result("llama_cpp.md", lines)


if __name__ == "__main__":
    main()
