"""Command line: a thin face of QuantConfig and the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .demo import DEMO

DEFAULT_PROMPT = "The capital of France is"


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save the packed result")
    p.add_argument("model", help="local HF folder, .gguf file, hub id, or built-in name (smollm2-135m)")
    p.add_argument("-o", "--output", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--scheme", default="W4A16", help="preset: W2A16, W3A16, W4A16 (default), W8A16, with optional G<group>, e.g. W2A16G64; "
                        "a float format: MXFP4A16, NVFP4A16, MXFP8A16, FP8A16; with quantized inputs: W8A8, W4A8, FP8, FP8_BLOCK, "
                        "MXFP8, MXFP4, NVFP4; "
                        "or a llama.cpp K-quant: Q2_K .. Q6_K, or a K mixture: Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M")
    p.add_argument("--bits", type=int, help="override the preset's bits (2-8)")
    p.add_argument("--group-size", type=int, help="override the preset's group size (-1: per output channel)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric quantization")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric quantization (per-group zero point)")
    p.add_argument("--layer", action="append", default=[], metavar="REGEX=SPEC",
                   help="per-layer override, e.g. 'down_proj=W8A16', 'q_proj=bits=3,group_size=64' or 'lm_head|mlp.0=fp16'")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-bits", type=float, metavar="B",
                        help="mixed precision: choose each layer's scheme among --options so that the average stored bits per weight is at most B")
    budget.add_argument("--plan", metavar="PATH", help="reuse the per-layer schemes of an earlier --target-bits run (its output folder, "
                        "config.json or plan.json) instead of searching")
    p.add_argument("--options", help="schemes --target-bits chooses from (default W2A16G64,W3A16,W4A16,W5A16,W6A16,W8A16, "
                        "less those the --format cannot store; with --format gguf Q2_K..Q6_K; fp16 keeps a layer 16-bit)")
    p.add_argument("--split-fused", action="store_true", help="let --target-bits give q/k/v, gate/up and one block's experts different "
                        "schemes (runtimes that fuse them cannot load the result; with --format gguf alone only the experts are kept "
                        "together anyway, as llama.cpp runs q/k/v apart)")
    p.add_argument("--method", default="signround", help="rtn or signround (default)")
    p.add_argument("--quantize-lm-head", action="store_true", help="also quantize an untied lm_head (round-to-nearest)")
    p.add_argument("--quantize-routers", action="store_true", help="also quantize mixture-of-experts routing layers (kept 16-bit by default)")
    p.add_argument("--smooth", type=float, metavar="ALPHA", help="SmoothQuant for layers with quantized inputs (W8A8 ...): migrate activation "
                        "outliers into the weights with strength ALPHA (0.5 is typical)")
    p.add_argument("--recipe", default="fast", choices=["fast", "full", "paper"],
                   help="fast (default): 112 steps of 3 rows from an activation-weighted clipping search (336 steps of 1 row in "
                        "blocks whose rows' gradients agree); full: 200 steps of 8 rows "
                        "from the same start; paper: 200 steps of 8 rows from round-to-nearest, clipping projected (the paper's and "
                        "auto-round's default); all keep the best-loss step; --iters, --batch-size, --clip-search, --adapt-batch, --keep and "
                        "--project-clipping override any (auto-round's fp32 caches: --cache-dtype float32)")
    p.add_argument("--iters", type=int, help="tuning steps per block (default: the recipe's)")
    clip = p.add_mutually_exclusive_group()
    clip.add_argument("--clip-search", dest="clip_search", action="store_true", default=None,
                      help="start the clipping scales at an activation-weighted search (default: the recipe's)")
    clip.add_argument("--no-clip-search", dest="clip_search", action="store_false")
    adapt = p.add_mutually_exclusive_group()
    adapt.add_argument("--adapt-batch", dest="adapt_batch", action="store_true", default=None,
                       help="in a block whose calibration rows' gradients agree in sign, spend the same rows on single-row steps "
                            "(iters x batch steps of 1 row; default: the recipe's, on for fast)")
    adapt.add_argument("--no-adapt-batch", dest="adapt_batch", action="store_false")
    tame = p.add_mutually_exclusive_group()
    tame.add_argument("--tame-outliers", dest="tame_outliers", action="store_true", default=None,
                      help="weigh tokens with massive hidden states (attention sinks) down to a typical token's weight in the "
                           "block loss (default off: no perplexity gain shown yet)")
    tame.add_argument("--no-tame-outliers", dest="tame_outliers", action="store_false")
    p.add_argument("--project-clipping", choices=["on", "off", "auto"],
                   help="clamp the clipping scales back onto [0, 1] after each step, as auto-round does; off: a scale stepped "
                        "past 1 stays unclipped; auto: on at 2 bits (default: the recipe's, full on, fast auto)")
    p.add_argument("--keep", choices=["best", "last", "average"],
                   help="which parameters a block keeps: the lowest-batch-loss step's, the last step's, or their mean over the "
                        "second half of the steps (default: the recipe's)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, help="calibration tokens per sample (default 2048, or the model's maximum when shorter)")
    p.add_argument("--batch-size", type=int, help="calibration rows per step (default: the recipe's)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, help="rounding-offset learning rate (default 1/iters)")
    p.add_argument("--minmax-lr", type=float, help="clipping-scale learning rate (default: --lr)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache-dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="dtype of the hidden states cached between blocks (default bfloat16)")
    p.add_argument("--threads", type=int, help="torch threads for the run (default: torch's, one per core)")
    p.add_argument("--offload", action="store_true", help="keep the cached hidden states in files beside the output instead of in memory")
    p.add_argument("--fp-inputs", action="store_true", help="tune each block on the original model's inputs instead of the quantized model's")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast dtype for tuning; auto: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32")
    p.add_argument("--compile", default="auto", choices=["on", "off", "auto"],
                   help="run the tuning step through torch.compile (~55 s once on 2 CPU cores, then ~5%% faster steps); "
                        "auto: on runs of at least 20000 rows (blocks x iters x batch: the full recipe) where a compiler is found")
    p.add_argument("--dataset", nargs="+", help="calibration: .txt/.jsonl/.parquet files or folders, a hub dataset, or 'self' (text the model "
                                                "samples); default NeelNanda/pile-10k online, public-domain text shipped with signround offline")
    p.add_argument("--eval-text", help="print perplexity before and after on this text file")
    p.add_argument("--eval-tokens", type=int, default=32768, help="tokens of --eval-text to score (default 32768)")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--save-dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"], help="dtype of the unquantized tensors")
    p.add_argument("--format", nargs="+", default=["signround"], metavar="F",
                   help="output format(s): signround (default), auto_round, awq, gptq, compressed-tensors, gguf; one writes OUT itself, "
                        "several write OUT/<format>/ each")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", dest="resume", action="store_const", const="force", default="auto",
                       help="continue the saved state beside the output even if settings changed (by default it is continued only when they match)")
    again.add_argument("--restart", dest="resume", action="store_const", const="never", help="discard any saved state and start over")
    p.add_argument("--report-json", help="also write the quantization report (block losses, time, memory) as JSON")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (off by default)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt pickle checkpoints (they can run code when loaded)")
    p.add_argument("--no-stream", action="store_true",
                   help="load the whole model first; by default a local safetensors folder or LLaMA/Gemma-3 GGUF is read one block at a time "
                        "and finished blocks go to disk, so memory holds about one block (--eval-text also loads it whole)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="what SignRound buys: fp32, round-to-nearest and SignRound perplexity side by side, then generate")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, local HF folder or .gguf (default smollm2-135m)")
    p.add_argument("-o", "--output", default="demo-out", help="where the SignRound model is saved (an earlier demo output there is replaced)")
    p.add_argument("--scheme", default=DEMO["scheme"])
    p.add_argument("--iters", type=int, default=DEMO["iters"])
    p.add_argument("--nsamples", type=int, default=DEMO["nsamples"])
    p.add_argument("--seqlen", type=int, default=DEMO["seqlen"])
    p.add_argument("--batch-size", type=int, default=DEMO["batch_size"])
    p.add_argument("--eval-tokens", type=int, default=DEMO["eval_tokens"], help="tokens of the held-out text to score")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a signround output folder in another format")
    p.add_argument("path", help="a signround output folder")
    p.add_argument("--format", required=True, help="auto_round, awq, gptq, compressed-tensors or gguf")
    p.add_argument("-o", "--output", required=True, help="folder to write (must be new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")


def _add_upcycle(sub) -> None:
    p = sub.add_parser("upcycle", help="make a mixture-of-experts model from a dense LLaMA (sparse upcycling), to quantize as an MoE")
    p.add_argument("model", help="local HF folder, .gguf file, hub id, or built-in name (smollm2-135m)")
    p.add_argument("-o", "--output", required=True, help="folder to write the Mixtral-class model to")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, help="experts each token is routed to")
    p.add_argument("--noise", type=float, default=0.01, help="relative perturbation that makes the expert copies differ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="load a quantized output folder and continue a prompt")
    p.add_argument("path", help="a signround output folder")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="compute dtype; bfloat16 (default) runs 4-bit layers through torch's int4 kernel on CPU, float32 is exact")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, zero-shot task accuracy and lm-eval tasks for any model or output folder")
    p.add_argument("model", help="original model (folder, .gguf, hub id, built-in) or a signround output folder")
    p.add_argument("--ppl", nargs="+", default=[], metavar="TEXT", help="text files (or hub datasets such as wikitext:wikitext-2-raw-v1 online)")
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--ppl-tokens", type=int, default=32768, help="score the first N tokens (0: all)")
    p.add_argument("--ppl-stride", type=int, help="overlapping windows that score only their last STRIDE tokens")
    p.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                   help="prepend BOS to every perplexity window: auto (default) does so when the model's tokenizer adds BOS itself")
    p.add_argument("--tasks", nargs="+", default=[], metavar="JSON", help="BIG-bench task.json files or folders of them")
    p.add_argument("--lm-eval", nargs="+", default=[], metavar="TASK",
                   help="lm-evaluation-harness tasks (hellaswag, arc_easy, ... online) or BIG-bench .json files run through lm-eval offline")
    p.add_argument("--limit", type=int, help="at most N examples per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the results here (default: print only)")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="quantize over a grid of methods x schemes, evaluate all, write a report with plots")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="report folder (runs already in it are reused)")
    p.add_argument("--methods", default="rtn,signround")
    p.add_argument("--schemes", default="W2A16G64,W3A16,W4A16,W8A16")
    p.add_argument("--ppl", nargs="+", default=[], metavar="TEXT")
    p.add_argument("--ppl-tokens", type=int, default=32768)
    p.add_argument("--tasks", nargs="+", default=[], metavar="JSON")
    p.add_argument("--limit", type=int, help="at most N examples per task")
    p.add_argument("--target-bits", default="", help="also mixed-precision runs at these average bits per weight, e.g. 2.5,3,3.5 "
                        "(plotted against the uniform schemes and K mixtures)")
    p.add_argument("--quantize-args", default="", help="extra flags for every quantize run, e.g. '--iters 50 --nsamples 32 --dataset books/'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="signround", description="SignRound weight quantization for Hugging Face causal LMs")
    parser.add_argument("--version", action="version", version=f"signround {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_demo(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_upcycle(sub)
    _add_eval(sub)
    _add_compare(sub)
    return parser


def config_from_args(args):
    """The quantization settings the flags give (`QuantConfig`); unset tuning flags stay None for the recipe."""
    from .config import QuantConfig, WeightScheme, parse_scheme
    from .mixtures import find_mixture
    from .search import read_plan

    mixture = find_mixture(args.scheme)  # QuantConfig resolves it into its base scheme and per-layer rules
    changes = {k: v for k, v in (("bits", args.bits), ("group_size", args.group_size), ("sym", args.sym)) if v is not None}
    if mixture and changes:
        raise _usage(f"--scheme {mixture} sets every layer's K type: drop --bits/--group-size/--sym/--asym, or change layers with --layer REGEX=SPEC")
    scheme = mixture or dataclasses.replace(WeightScheme.preset(args.scheme), **changes)
    overrides = {}
    for item in args.layer:
        pattern, sep, spec = item.partition("=")
        if not sep or not pattern:
            raise _usage(f"--layer {item!r} must look like REGEX=SPEC, e.g. 'down_proj=W8A16'")
        overrides[pattern] = parse_scheme(spec)
    return QuantConfig(
        scheme=scheme, method=args.method, layer_overrides=overrides, quantize_lm_head=args.quantize_lm_head, quantize_routers=args.quantize_routers,
        recipe=args.recipe, iters=args.iters, clip_search=args.clip_search, adapt_batch=args.adapt_batch, keep=args.keep, tame_outliers=args.tame_outliers,
        project_clipping=_on_off_auto(args.project_clipping),
        nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, minmax_lr=args.minmax_lr, seed=args.seed, quantized_inputs=not args.fp_inputs, smooth=args.smooth,
        target_bits=args.target_bits, options=args.options, plan=read_plan(args.plan) if args.plan else None, fuse_groups=not args.split_fused,
    )


def run_config_from_args(args):
    """The run settings the flags give (`RunConfig`)."""
    from .config import RunConfig

    return RunConfig(device=args.device, amp=args.amp, compile=_on_off_auto(args.compile), cache_dtype=args.cache_dtype,
                     offload=args.offload, resume=args.resume, progress=not args.quiet, threads=args.threads)


def _on_off_auto(choice: str | None):
    """A CLI on/off/auto choice as the config field takes it: True, False, "auto" (None: unset)."""
    return {"on": True, "off": False}.get(choice, choice)


class _usage(ValueError):
    pass


def cmd_quantize(args) -> None:
    from . import distributed
    from .runner import run

    calibration = None
    if args.dataset:  # Paths: the library reads a list of strings as texts
        calibration = args.dataset[0] if len(args.dataset) == 1 else [Path(p) for p in args.dataset]
    report = run(args.model, args.output, config_from_args(args), run_config_from_args(args), calibration=calibration,
                 formats=args.format, eval_text=args.eval_text, eval_tokens=args.eval_tokens, eval_seqlen=args.eval_seqlen,
                 overwrite=args.overwrite, save_dtype=args.save_dtype, stream=not args.no_stream,
                 trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    if not distributed.is_writer():  # under torchrun rank 0 speaks for the run
        return
    print(report.summary(), flush=True)
    for out in report.outputs:
        print(f"saved {out}")
    if args.report_json:
        import json

        Path(args.report_json).write_text(json.dumps(report.to_dict(), indent=1, default=str))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.model, args.output, scheme=args.scheme, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
             batch_size=args.batch_size, eval_tokens=args.eval_tokens, progress=not args.quiet)


def cmd_export(args) -> None:
    from transformers import AutoTokenizer

    from . import checkpoint
    from .export import export, get_format

    get_format(args.format)
    checkpoint.check_output_dir(args.output, args.overwrite)
    model = checkpoint.load(args.path)
    out = export(model, AutoTokenizer.from_pretrained(args.path), args.output, args.format, overwrite=args.overwrite)
    print(f"saved {out}")


def cmd_upcycle(args) -> None:
    from .upcycle import upcycle_to

    out = upcycle_to(args.model, args.output, args.experts, args.top_k, args.noise, args.seed, args.overwrite)
    print(f"saved {out} ({args.experts} experts, top-{args.top_k}): quantize it with `signround quantize {out} ...`")


def cmd_generate(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from . import checkpoint

    start = time.perf_counter()
    model = checkpoint.load(args.path, device=args.device, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.path)
    ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(args.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    print(f"({time.perf_counter() - start:.1f} s, loaded from {args.path})", file=sys.stderr)


def cmd_eval(args) -> None:
    import json

    from .evaluate import EvalSettings, check_eval_text, format_record, run_eval
    from .models import load_any
    from .tasks import find_tasks, load_task

    for source in args.ppl:
        check_eval_text(source)
    for path in find_tasks(args.tasks):
        load_task(path)
    if not (args.ppl or args.tasks or args.lm_eval):
        raise _usage("nothing to evaluate: give --ppl TEXT, --tasks JSON and/or --lm-eval TASK")
    model, tokenizer = load_any(args.model, device=args.device)
    settings = EvalSettings(ppl=args.ppl, ppl_seqlen=args.ppl_seqlen, ppl_tokens=args.ppl_tokens or None, ppl_stride=args.ppl_stride,
                            bos=args.bos, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size, lm_eval_tasks=args.lm_eval)
    record = run_eval(model, tokenizer, settings, label=args.model)
    print(format_record(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
        print(f"wrote {args.json}")


def cmd_compare(args) -> None:
    import shlex

    from .compare import GridSettings, run_grid, write_report
    from .config import QuantConfig
    from .evaluate import EvalSettings
    from .models import resolve

    resolve(args.model)
    schemes = [s for s in args.schemes.split(",") if s]
    for scheme in schemes:
        QuantConfig(scheme=scheme)  # a preset or a K mixture; anything else fails here, before any run
    if not (args.ppl or args.tasks):
        raise _usage("nothing to compare on: give --ppl TEXT and/or --tasks JSON")
    try:
        targets = [float(b) for b in args.target_bits.split(",") if b.strip()]
    except ValueError:
        raise _usage(f"--target-bits {args.target_bits!r} must list numbers, e.g. 2.5,3,3.5") from None
    for bits in targets:
        QuantConfig(target_bits=bits)
    grid = GridSettings(args.model, [m for m in args.methods.split(",") if m], schemes, shlex.split(args.quantize_args), targets)
    evaluation = EvalSettings(ppl=args.ppl, ppl_tokens=args.ppl_tokens or None, tasks=args.tasks, limit=args.limit)
    report = write_report(run_grid(grid, evaluation, Path(args.output)), Path(args.output))
    print(report.read_text())
    print(f"wrote {report}")


def main(argv=None) -> int:
    from .blocks import UnsupportedModelError
    from .calibration import DataError
    from .checkpoint import DiskFullError, NotACheckpointError, OutputExistsError
    from .config import ConfigError
    from .models import CorruptModelError, ModelNotFoundError, UnsafeCheckpointError
    from .pipeline import CorruptWeightsError, OutOfMemory
    from .resume import ResumeMismatch
    from .tasks import TaskFormatError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    handlers = {"quantize": cmd_quantize, "demo": cmd_demo, "export": cmd_export, "generate": cmd_generate, "eval": cmd_eval, "compare": cmd_compare,
                "upcycle": cmd_upcycle}
    try:
        handlers[args.command](args)
    except (ConfigError, DataError, ModelNotFoundError, UnsupportedModelError, OutputExistsError, FileNotFoundError, TaskFormatError,
            UnsafeCheckpointError, CorruptWeightsError, CorruptModelError, NotACheckpointError, OutOfMemory, ResumeMismatch, _usage) as e:
        print(f"signround: error: {e}", file=sys.stderr)
        return 2
    except DiskFullError as e:
        print(f"signround: error: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"signround: {e or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
