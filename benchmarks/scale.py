"""A 70B-class model on this machine: a synthetic model of LLaMA-70B's shapes (random bf16 weights written
to safetensors shards, a block a shard, its real vocabulary) with a few blocks, quantized streamed with RTN
and with a few SignRound steps, each run in a process of its own. It measures seconds per block, peak RSS,
the disk the work folder's caches take and this CPU's matmul rate, checks the peak RSS against the
streamed bound (one block and its tuning state, the caches, the embeddings; never the model), runs two
depths to show the peak does not grow with depth, and projects the full model (80 blocks, the default
recipe) on this CPU and on 1 and 8 GPUs.

    python benchmarks/scale.py                         # LLaMA-70B shapes, 2 and 3 blocks
    python benchmarks/scale.py --shape llama-8b --depths 2,4

Projection: the default recipe's FLOPs per block (its steps' forward and backward, the calibration forwards
of both streams) at the matmul efficiency measured here (FLOP/s of the SignRound run's steps over this CPU's
bf16 matmul peak), on a GPU of `--gpu-tflops` (an H200's bf16 peak measured by vs_autoround.py on one:
660); 8 GPUs split the rows (data parallel), each still holding a whole block's tuning state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol
from vs_autoround import matmul_peak

SHAPES = {  # hidden, intermediate, heads, kv heads, vocabulary, full depth
    "llama-70b": (8192, 28672, 64, 8, 128256, 80),
    "llama-8b": (4096, 14336, 32, 8, 128256, 32),
}
STEPS, ROWS, SEQLEN = 2, 2, 128  # the measured SignRound run: a few steps of a few short rows
RECIPE = dict(iters=112, batch=3, nsamples=128, seqlen=512)  # the default recipe, projected


def block_params(shape) -> int:
    hidden, inter, heads, kv, _, _ = shape
    head_dim = hidden // heads
    return 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter


def write_model(folder: Path, shape, layers: int) -> None:
    """Random weights (std 0.02, norms at 1) as bf16 shards, one per block, and SmolLM2's tokenizer (the
    calibration is token ids below its vocabulary)."""
    import transformers as tf
    from safetensors.torch import save_file

    from signround.models import load_metadata, resolve

    hidden, inter, heads, kv, vocab, _ = shape
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                            num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(folder)
    load_metadata(resolve("smollm2-135m"))[1].save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)

    def rand(*size):
        return (torch.randn(*size, generator=gen) * 0.02).to(torch.bfloat16)

    head_dim = hidden // heads
    index = {}
    shards = {"model-outer.safetensors": {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                                          "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}}
    for i in range(layers):
        p = f"model.layers.{i}."
        shards[f"model-block-{i:03d}.safetensors"] = {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden), p + "self_attn.k_proj.weight": rand(kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv * head_dim, hidden), p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden), p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
        index.update({k: name for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def child(args) -> None:
    """One streamed run (signround.quantize on the lazily opened folder, finished blocks to the work folder);
    prints seconds, steps, peak RSS and the largest the work folder's input caches got."""
    import signround
    from signround.weights import open_lazy

    model, _, weights = open_lazy(args.child)
    calibration = torch.randint(0, 49152, (ROWS, SEQLEN), generator=torch.Generator().manual_seed(0))
    if args.method == "rtn":
        config = signround.QuantConfig(scheme="W4A16", method="rtn")
    else:  # no clipping search and no agreement probe: the steps alone, as projected
        config = signround.QuantConfig(scheme="W4A16", iters=STEPS, batch_size=ROWS, nsamples=ROWS, seqlen=SEQLEN, clip_search=False, adapt_batch=False)
    caches = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp) / "work"

        def measure(index, report):
            caches.append(sum(f.stat().st_size for f in work.glob("inputs-*")))

        start = time.perf_counter()
        report = signround.quantize(model, config, signround.RunConfig(work_dir=work, progress=False, compile=False), calibration=calibration,
                                    weights=weights, on_block_done=measure)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "steps": report.tuning_steps, "peak_rss_mib": protocol.peak_rss_mib(),
                      "cache_mib": max(caches, default=0) / 2**20, "blocks": len(report.block_losses)}))


def run_child(args, folder: Path, method: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(folder), "--method", method, "--work", str(args.work)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise SystemExit(f"the {method} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bound_mib(shape, rows: int, seqlen: int) -> dict[str, float]:
    """The streamed bound's parts, in MiB: what quantizing one block holds, whatever the depth."""
    hidden, inter, heads, kv, vocab, _ = shape
    params = block_params(shape)
    return {"block (bf16 read, fp32 while tuned)": params * (2 + 4) / 2**20,
            "tuning state (weight, offset, its gradient; fp32)": 3 * params * 4 / 2**20,
            "step activations (fp32 masters, bf16 autocast)": rows * seqlen * (12 * hidden + 4 * inter) * 4 / 2**20,
            "caches (two streams, in and out; bf16)": 4 * rows * seqlen * hidden * 2 / 2**20,
            "embeddings and head (bf16)": 2 * vocab * hidden * 2 / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-70b", choices=list(SHAPES))
    p.add_argument("--depths", default="2,3", type=lambda s: [int(x) for x in s.split(",")], help="blocks of the synthetic models")
    p.add_argument("--project", choices=list(SHAPES), help="project this shape's full model from the measured rate (default: --shape)")
    p.add_argument("--methods", default="rtn,signround", type=lambda s: s.split(","), help="rtn and/or signround runs")
    p.add_argument("--gpu-tflops", type=float, default=660.0, help="a GPU's bf16 matmul peak for the projection")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where the synthetic models and work folders go")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    shape = SHAPES[args.shape]
    hidden, inter, heads, kv, vocab, _ = shape
    params = block_params(shape)
    peak = matmul_peak(torch.bfloat16, "cpu") * 1e9
    rows = []
    for depth in args.depths:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            start = time.perf_counter()
            write_model(folder, shape, depth)
            disk = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
            print(f"{depth} blocks written ({disk:.1f} GiB) in {time.perf_counter() - start:.0f} s", flush=True)
            for method in args.methods:
                row = {"depth": depth, "method": method, "model_gib": disk, **run_child(args, folder, method)}
                rows.append(row)
                print(row, flush=True)
    bound = bound_mib(shape, ROWS, SEQLEN)
    # the SignRound run's time over its RTN twin's is its steps and calibration forwards: FLOPs over seconds is the rate achieved here
    tuned = [r for r in rows if r["method"] == "signround"]
    rtn = {r["depth"]: r for r in rows if r["method"] == "rtn"}
    per_block = [(r["seconds"] - rtn[r["depth"]]["seconds"]) / r["blocks"] for r in tuned]
    step_flops = 3 * 2 * ROWS * SEQLEN * params * STEPS + 2 * 2 * ROWS * SEQLEN * params  # steps' forward+backward; both streams' forwards
    rate = step_flops / max(min(per_block), 1e-9)
    efficiency = rate / peak
    target = SHAPES[args.project or args.shape]  # the full model projected: the measured shape's, or a larger one at the same rate
    target_params, target_hidden, full_depth = block_params(target), target[0], target[5]
    recipe_flops = (3 * 2 * RECIPE["batch"] * RECIPE["seqlen"] * RECIPE["iters"] + 2 * 2 * RECIPE["nsamples"] * RECIPE["seqlen"]) * target_params
    rtn_block = min(r["seconds"] / r["blocks"] for r in rtn.values()) * target_params / params  # RTN's time grows with the weights
    lines = [f"# Scale: a synthetic {args.shape} (hidden {hidden}, intermediate {inter}, {heads} heads, {kv} KV heads, "
             f"vocabulary {vocab}), {params / 1e9:.2f}B parameters a block", "",
             f"machine: {protocol.cpu_name()}, {os.cpu_count()} cores, bf16 matmul peak measured here {peak / 1e9:.0f} GFLOP/s; "
             f"W4A16, streamed from safetensors shards, finished blocks to the work folder; SignRound: {STEPS} steps of {ROWS} rows x {SEQLEN} "
             f"tokens, no clipping search", "",
             "| blocks | model on disk GiB | method | s per block | peak RSS MiB | largest input caches on disk MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['model_gib']:.1f} | {r['method']} | {r['seconds'] / r['blocks']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['cache_mib']:.1f} |")
    total = sum(bound.values())
    growth = tuned[-1]["peak_rss_mib"] - tuned[0]["peak_rss_mib"]
    lines += ["", "## The streamed bound (SignRound run)", "", "| part | MiB |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in bound.items()]
    lines += [f"| total | {total:.0f} |", "",
              f"measured peak RSS {max(r['peak_rss_mib'] for r in tuned):.0f} MiB ({max(r['peak_rss_mib'] for r in tuned) / total:.2f}x the bound); "
              f"from {args.depths[0]} to {args.depths[-1]} blocks it moved {growth:+.0f} MiB, while the model grew by "
              f"{(args.depths[-1] - args.depths[0]) * params * 2 / 2**20:.0f} MiB", "",
              f"## Projection to the full {args.project or args.shape} (the default recipe: 112 steps x 3 rows x 512 tokens, 128 x 512 calibration tokens)",
              "",
              f"SignRound's steps ran at {rate / 1e9:.0f} GFLOP/s here, {efficiency:.0%} of this CPU's bf16 peak; "
              "the projection assumes that share of a GPU's peak.",
              "", "| where | s per block | full depth | memory per device |", "|---|---|---|---|"]
    cpu_block = recipe_flops / rate
    target_bound = bound_mib(target, RECIPE["batch"], RECIPE["seqlen"])
    caches_full = 4 * RECIPE["nsamples"] * RECIPE["seqlen"] * target_hidden * 2 / 2**30
    state = (target_bound["block (bf16 read, fp32 while tuned)"] + target_bound["tuning state (weight, offset, its gradient; fp32)"]
             + target_bound["step activations (fp32 masters, bf16 autocast)"]) / 1024
    for where, seconds, devices in (("this CPU", cpu_block, 1), ("1 GPU", recipe_flops / (args.gpu_tflops * 1e12 * efficiency), 1),
                                    ("8 GPUs, data parallel", recipe_flops / (args.gpu_tflops * 1e12 * efficiency) / 8, 8)):
        memory = state + caches_full / devices + target_bound["embeddings and head (bf16)"] / 1024
        lines.append(f"| {where} | {seconds:.0f} | {hours(seconds * full_depth)} ({full_depth} blocks; RTN {hours(rtn_block * full_depth)} here) | "
                     f"{memory:.0f} GiB ({caches_full / devices:.1f} of it caches) |")
    lines += ["", "A GPU's share of its peak at these shapes is likely higher than a 2-core CPU's, and the per-step elementwise work",
              "(fake-quantizing a block's weights) does not shrink with data parallelism: read the GPU rows as estimates, not measurements."]
    protocol.write_result(f"scale-{args.shape}.md", lines)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


if __name__ == "__main__":
    main()
