"""The whole product on a GPU in one run, one table (issue 32): quantize with bf16 autocast and the caches on
the device, kill -9 and resume, reload, generate through the packed int4 kernel, every export in its
consumer, and auto-round on the same GPU.

    python benchmarks/cuda_check.py                                   # SmolLM2-135M on cuda
    python benchmarks/cuda_check.py --bundle .gpu --layers 9          # here: what a device machine without network needs
    SIGNROUND_BENCH_DATA=.gpu/data python3 benchmarks/cuda_check.py --model .gpu/smollm2-9.gguf --out $OUT   # there
    python benchmarks/cuda_check.py --device cpu --quick --stages quantize,reload,generate,resume   # the CPU test

A device call carries at most 64 MiB: SmolLM2's GGUF is 94 MiB, so `--bundle` writes its first N blocks
(embeddings and head whole) as a GGUF of their own, the benchmark data xz-packed and the wheels the GPU
machine lacks. Each stage is timed with its peak GPU memory; a stage that fails is a row saying how (its
traceback in cuda_check.log) and the others still run. The table is rewritten after every stage, so a run
cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

import signround

HERE = Path(__file__).resolve().parent
SCHEME = "W4A16"
QUICK = dict(iters=4, nsamples=8, seqlen=64, batch_size=2)  # every code path, no tuning worth the name


def quant_config(args) -> signround.QuantConfig:
    return signround.QuantConfig(scheme=SCHEME, **(QUICK if args.quick else {}))


def calibration(args, tokenizer) -> torch.Tensor:
    """The protocol's gutenberg-128x512 (quick: fewer, shorter rows)."""
    return protocol.gutenberg_calibration(tokenizer, QUICK["nsamples"], QUICK["seqlen"]) if args.quick else protocol.gutenberg_calibration(tokenizer)


def quantize_to(args, out: Path, kill_after: int | None = None) -> signround.QuantizeReport:
    """signround.run as a user calls it, streaming the model from its file; `kill_after`: SIGKILL this
    process once that block is finished (a crash no handler sees)."""
    tokenizer = protocol.tokenizer_of(args.model)

    def crash(index, report):
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    run = signround.RunConfig(device=args.device, progress=False)
    return signround.run(args.model, out, quant_config(args), run, calibration=calibration(args, tokenizer), on_block_done=crash)


# ---- stages: each returns (result text, ok, numbers for the other stages) --------------------------------

def stage_quantize(args, state):
    report = quantize_to(args, args.work / "out")
    losses = [after for _, after in report.block_losses if after is not None]
    state["report"] = report
    return (f"{len(report.quantized)} layers, {report.tuning_steps} steps, tuning {report.tuning_seconds:.1f} s, "
            f"last block loss {losses[-1]:.4g}"), True


def stage_reload(args, state):
    original, tokenizer = signround.load_model(args.model)
    ids = protocol.wikitext_ids(tokenizer, args.tokens)
    original.to(args.device)
    fp = protocol.scored_perplexity(original, tokenizer, ids, args.device)
    del original
    model = signround.load(args.work / "out", device=args.device)
    ppl = protocol.scored_perplexity(model, tokenizer, ids, args.device)
    state["ppl"] = ppl
    return f"wt2 ({ids.numel()} tokens) ppl {ppl:.3f} (unquantized {fp:.3f}), {sum(p.numel() for p in model.buffers()) / 1e6:.1f}M packed values", True


@torch.no_grad()
def stage_generate(args, state):
    from signround.qlinear import QuantLinear

    tokenizer = protocol.tokenizer_of(args.model)
    model = signround.load(args.work / "out", device=args.device, dtype=torch.bfloat16)
    device = torch.device(args.device)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.scheme.bits == 4]
    worst = 0.0
    for layer in layers:  # the int4 kernel against the dequantized weight, at a decoding-sized input
        x = torch.randn(1, 4, layer.in_features, dtype=torch.bfloat16, device=device)
        exact = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), None if layer.bias is None else layer.bias.float())
        worst = max(worst, ((layer(x).float() - exact).norm() / exact.norm()).item())
    kernel = sum(device in m.__dict__.get("_int4_cache", {}) for m in layers)
    prompt = tokenizer("The history of the city begins", return_tensors="pt").input_ids.to(device)
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up: kernels built, caches allocated
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    new = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)[0, prompt.shape[1]:]
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = new.numel() / (time.perf_counter() - start)
    text = tokenizer.decode(new[:12]).replace("\n", " ").replace("|", "/")
    ok = kernel == len(layers) > 0 and worst < 0.02
    return (f"{rate:.1f} tokens/s; int4 kernel in {kernel}/{len(layers)} layers, worst relative error against the dequantized "
            f"matmul {worst:.2e}; text: \"{text}...\""), ok


def stage_resume(args, state):
    out = args.work / "resumed"
    child = [sys.executable, __file__, "--child-run", str(out), "--model", args.model, "--device", args.device, *(["--quick"] if args.quick else [])]
    killed = subprocess.run([*child, "--child-kill", str(args.kill_after)], capture_output=True, text=True)
    if killed.returncode != -signal.SIGKILL:
        return f"the run was not killed: exit {killed.returncode}: {killed.stderr[-500:]}", False
    resumed = subprocess.run(child, capture_output=True, text=True)
    if resumed.returncode:
        return f"the resumed run failed: {resumed.stderr[-500:]}", False
    steps = json.loads(resumed.stdout.strip().splitlines()[-1])["tuning_steps"]
    same, total = identical_codes(args.work / "out", out)
    full = state["report"].tuning_steps if "report" in state else None
    ok = full is None or steps < full
    return (f"killed (SIGKILL) after block {args.kill_after}, resumed: {steps} steps left of {full}; "
            f"{same / total:.2%} of packed values identical to the uninterrupted run"), ok


def identical_codes(a: Path, b: Path) -> tuple[int, int]:
    """How many packed values (codes, zeros, scales) two output folders share, position by position."""
    from safetensors.torch import load_file

    def packed(folder):
        state = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update({k: v for k, v in load_file(f).items() if k.endswith((".qweight", ".qzeros", ".scales"))})
        return state

    x, y = packed(a), packed(b)
    same = sum(int((x[k] == y[k]).sum()) for k in x if k in y and x[k].shape == y[k].shape)
    return same, sum(v.numel() for v in x.values())


def stage_exports(args, state):
    rows = args.work / "exports.json"
    done = subprocess.run([sys.executable, str(HERE / "exports.py"), "--model", args.model, "--device", args.device, "--tokens", str(args.tokens),
                           "--json", str(rows), "--name", f"exports-{torch.device(args.device).type}"], capture_output=True, text=True,
                          timeout=remaining(args))
    if not rows.exists():
        return f"exports.py failed: {done.stderr[-800:]}", False
    cells = [f"{r['format']} {r['scheme'].replace('bits=4,group_size=', 'g').replace(',sym=', ' sym=')}: "
             + (f"failed ({r['failure']})" if r.get("failure") else f"{r['ppl_diff'] * 100:+.2f}%") for r in json.loads(rows.read_text())]
    return "consumer ppl against ours: " + "; ".join(cells), done.returncode == 0


def stage_vs_autoround(args, state):
    name = f"vs_autoround-{torch.device(args.device).type}"
    done = subprocess.run([sys.executable, str(HERE / "vs_autoround.py"), "--model", args.model, "--device", args.device, "--layers",
                           str(args.vs_layers), "--schemes", SCHEME, "--recipes", "default", "--name", name, "--rerun"],
                          capture_output=True, text=True, timeout=remaining(args))
    store = protocol.RESULTS / f"{name}.json"
    if done.returncode or not store.exists():
        return f"vs_autoround.py failed: {done.stderr[-800:]}", False
    setting = next(v for k, v in json.loads(store.read_text()).items() if k.startswith(args.model) and f"layers{args.vs_layers}|" in k)
    ours, theirs = setting[f"signround|default|{SCHEME}"], setting[f"auto-round|default|{SCHEME}"]
    cells = [f"{tool} {row['tuning_s']:.0f} s, GPU {row['peak_gpu_mib']:.0f} MiB, ppl {row['ppl']:.4g}, last block's output error "
             f"{row['block_errors'][-1]:.3e}" for tool, row in (("signround", ours), ("auto-round", theirs))]
    return (f"{args.vs_layers} blocks, default recipes: {'; '.join(cells)}; time ratio {ours['tuning_s'] / theirs['tuning_s']:.2f}, "
            f"error ratio {ours['block_errors'][-1] / theirs['block_errors'][-1]:.2f}"), True


STAGES = {"quantize": stage_quantize, "reload": stage_reload, "generate": stage_generate, "exports": stage_exports,
          "vs_autoround": stage_vs_autoround, "resume": stage_resume}


IN_CHILDREN = {"exports", "vs_autoround", "resume"}  # stages run in processes of their own


def remaining(args) -> float:
    return max(1.0, args.budget_s - (time.perf_counter() - args.started))


def environment(args) -> list[str]:
    import transformers

    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else protocol.cpu_name()
    return [f"machine: {where}; torch {torch.__version__}, transformers {transformers.__version__}, Python {sys.version.split()[0]}",
            f"model: {args.model}; scheme {SCHEME}, {'quick settings ' + str(QUICK) if args.quick else 'default recipe'}; "
            f"calibration gutenberg (protocol), wt2 first {args.tokens} tokens"]


def one_line(text: str) -> str:
    """A table cell: a failure's last lines (where the error is) joined, pipes escaped."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-3:] if len(lines) > 3 else lines).replace("|", "/")


def write_table(args, header: list[str], rows: list[tuple]) -> None:
    lines = ["# The product on a GPU: benchmarks/cuda_check.py", "", *header, "",
             "| stage | ok | s | peak GPU MiB | result |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} | {seconds:.0f} | {peak} | {one_line(result)} |" for name, ok, seconds, peak, result in rows]
    path = protocol.write_result(args.table, lines, echo=False)
    if args.out:
        (args.out / args.table).write_text(path.read_text())


def main_check(args) -> None:
    args.started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    log = (args.out or args.work) / "cuda_check.log"
    header, rows = environment(args), []
    print("\n".join(header), flush=True)
    state = {}
    for name in args.stages:
        if remaining(args) <= 1.0:
            rows.append((name, False, 0.0, "", "not run: the time budget was spent"))
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            result, ok = STAGES[name](args, state)
        except Exception as e:  # the check's job is to report every stage: the traceback goes to the log, the table says how it failed
            with log.open("a") as f:
                f.write(f"== {name}\n{traceback.format_exc()}\n")
            result, ok = protocol.failure_line(e), False
        peak = None if name in IN_CHILDREN else protocol.peak_device_mib(args.device)  # children report their own
        rows.append((name, ok, time.perf_counter() - start, "" if peak is None else f"{peak:.0f}", result))
        print(f"{name}: {'ok' if ok else 'FAILED'} in {rows[-1][2]:.0f} s: {one_line(result)}", flush=True)
        write_table(args, header, rows)
    for extra in ("vs_autoround-cuda-8.md", "vs_autoround-cuda.json", "exports-cuda.md"):
        if args.out and (protocol.RESULTS / extra).exists():
            (args.out / extra).write_text((protocol.RESULTS / extra).read_text())
    print((protocol.RESULTS / args.table).read_text())
    if not all(ok for _, ok, *_ in rows):
        sys.exit("some stages failed: see the table and cuda_check.log")


# ---- the bundle a device machine needs (made here, where the model, the data and pip's index are) ------------

# the GPU machine's image lacks these (auto-round imports datasets; compressed-tensors needs pydantic): the versions tested here
WHEELS = ["gguf==0.19.0", "auto-round==0.16.1", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "compressed-tensors==0.20.1",
          "pydantic==2.14.4", "pydantic_core==2.50.5", "loguru==0.7.3", "annotated-types==0.8.0", "typing-inspection==0.4.5", "typing_extensions==4.16.0"]


def truncated_gguf(source: Path, target: Path, layers: int) -> None:
    """`source`'s first `layers` blocks with its embeddings, head, tokenizer and every other field."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = layers if field.name == f"{arch}.block_count" else field.contents()
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    kept = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data)
    writer.close()


def bundle(args) -> None:
    import shutil

    import signround.models as models

    folder = Path(args.bundle)
    folder.mkdir(parents=True, exist_ok=True)
    source = models.resolve("smollm2-135m")
    truncated_gguf(Path(source.location) / source.gguf_file, folder / f"smollm2-{args.layers}.gguf", args.layers)
    data = folder / "data"
    if data.exists():
        shutil.rmtree(data)
    subprocess.run(["tar", "-cJf", str(folder / "data.tar.xz"), "-C", str(protocol.DATA), "gutenberg", "wikitext-2/test.txt"], check=True)
    wheels = folder / "wheels"
    wheels.mkdir(exist_ok=True)
    platforms = [arg for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(wheels), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    print(f"{folder}: {size:.1f} MiB (a device call carries 64 MiB with the checkout)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--stages", default=",".join(STAGES), type=lambda s: s.split(","), help=f"which, in order (of {', '.join(STAGES)})")
    p.add_argument("--quick", action="store_true", help="tuning settings that only walk the code paths")
    p.add_argument("--tokens", type=int, default=32768, help="wt2 tokens to score")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--kill-after", type=int, default=4, help="the resume stage kills its run after this block")
    p.add_argument("--child-kill", type=int, help=argparse.SUPPRESS)
    p.add_argument("--vs-layers", type=int, default=8, help="blocks of the auto-round comparison")
    p.add_argument("--budget-s", type=float, default=560, help="start no stage after this many seconds")
    p.add_argument("--work", type=Path, default=Path("/tmp/cuda_check"), help="output folders of the stages")
    p.add_argument("--out", type=Path, help="also copy the table, the log and the comparison rows here")
    p.add_argument("--table", default="cuda_check.md")
    p.add_argument("--bundle", help="write the device bundle (truncated model, data, wheels) to this folder and stop")
    p.add_argument("--layers", type=int, default=9, help="blocks the bundle's model keeps")
    p.add_argument("--child-run", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}: choose from {', '.join(STAGES)}")
    if args.bundle:
        return bundle(args)
    if args.child_run:
        report = quantize_to(args, args.child_run, kill_after=args.child_kill)
        print(json.dumps({"tuning_steps": report.tuning_steps}))
        return
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    main_check(args)


if __name__ == "__main__":
    main()
