"""The tool's own checkpoint: a Hugging Face folder whose linear layers are stored packed.

config.json carries `quantization_config` (see pipeline.quantization_config_dict); safetensors shards
hold `<layer>.qweight`, `.qzeros`, `.scales` (and `.bias`) for quantized layers and plain tensors for
everything else. Writing goes to a temporary folder renamed into place, so an interrupted save never
leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import experts
from .blocks import set_submodule
from .config import WeightScheme
from .qlinear import QuantLinear

MAX_SHARD_BYTES = 2 * 2**30
INDEX_FILE = "model.safetensors.index.json"


class OutputExistsError(FileExistsError):
    pass


class DiskFullError(OSError):
    """The disk filled up (or there is too little room to start); the message says what was kept and what to do."""


def disk_full_error(error: OSError, message: str) -> DiskFullError | None:
    """A DiskFullError with `message` when `error` is a full disk or quota, else None."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(error.errno, message)
    return None


def expected_sizes(model, planned: dict, nsamples: int, seqlen: int) -> tuple[int, int]:
    """Bytes of (the output folder, the resumable work state), estimated before quantizing: the
    `planned` layers (`pipeline.planned_layers`) at their bits per weight, everything else in 16 bit,
    and two sets of fp32 hidden states of `seqlen` tokens per sample (0 for methods that calibrate on nothing)."""
    tasks = planned.values()
    shapes = [t.weight().shape for t in tasks]
    packed = sum(int(rows * cols * t.scheme.bits_per_weight(cols) / 8) for t, (rows, cols) in zip(tasks, shapes))
    plain = sum(p.numel() * 2 for p in {id(p): p for p in model.parameters()}.values()) - sum(rows * cols * 2 for rows, cols in shapes)
    hidden = model.get_input_embeddings().weight.shape[1]
    inputs = 2 * 2 * nsamples * seqlen * hidden * 4  # original and quantized streams; old and new file briefly
    return packed + plain, packed + inputs


def check_disk_space(folder: Path, needed_output: int, needed_work: int) -> None:
    """Refuse to start a run whose output and work state will not fit on the disk."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_output + needed_work > free:
        gib = 2**30
        raise DiskFullError(errno.ENOSPC, f"not enough disk space in {probe}: the output needs ~{needed_output / gib:.2f} GiB and the resumable work "
                                          f"state ~{needed_work / gib:.2f} GiB, but {free / gib:.2f} GiB is free: free some space or choose another -o")


class NotACheckpointError(ValueError):
    """A folder that is not a signround output (no signround `quantization_config`)."""


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"output {out} already exists and is not empty: choose another -o or pass --overwrite")
    return out


def _save_dtype(model, save_dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(save_dtype, torch.dtype):
        return save_dtype
    if save_dtype == "auto":
        return torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[save_dtype]


SCALE_BUFFERS = ("scales", "super_scales", "super_mins", "global_scale")  # packed layers' scales (QuantLinear.exact_dtypes)


def state_for_saving(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with tied duplicates dropped and unquantized float tensors in `dtype`
    (the packed layers' scales keep their own dtypes)."""
    scales = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, QuantLinear) for k in m.exact_dtypes()}
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        if tensor.is_floating_point() and name not in scales:
            tensor = tensor.to(dtype)
        state[name] = tensor.detach() if tensor.is_meta else tensor.detach().cpu().contiguous()
    return state


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int, weights=None) -> None:
    """Safetensors shards of at most `max_shard_bytes`. Meta tensors in `state` are placeholders read
    from `weights` one shard at a time, so a model streamed to disk block by block is saved without
    ever being whole in memory."""
    shards, current, size = [], [], 0
    for name, tensor in state.items():
        if current and size + _nbytes(tensor) > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += _nbytes(tensor)
    shards.append(current)
    lazy = [n for n, t in state.items() if t.is_meta]
    if lazy and weights is None:
        raise ValueError(f"{lazy[0]} is not in memory: pass the source of the finished blocks (weights=finished_blocks(work_dir, model))")

    def shard_tensors(names: list[str]) -> dict[str, torch.Tensor]:
        read = weights.tensors([n for n in names if state[n].is_meta]) if lazy else {}
        return {n: read[n].to(state[n].dtype).contiguous() if state[n].is_meta else state[n] for n in names}

    if len(shards) == 1:
        save_file(shard_tensors(shards[0]), folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard_tensors(names), folder / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in names})
    total = sum(_nbytes(t) for t in state.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path` and rename it to `path` when the block succeeds, so an
    interrupted write never leaves a folder that looks complete; a full disk becomes DiskFullError."""
    out = check_output_dir(path, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        full = disk_full_error(e, f"disk full while writing {out}: nothing was left there half-written; free some space and save again")
        if full:
            raise full from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_hf_folder(folder: Path, model, tokenizer, state: dict[str, torch.Tensor], quantization_config: dict | None,
                    max_shard_bytes: int = MAX_SHARD_BYTES, weights=None, dtype: torch.dtype | None = None) -> None:
    """config.json (with `quantization_config`, and `dtype` as the folder's dtype when given), generation config,
    tokenizer and safetensors shards."""
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _write_shards(state, folder, max_shard_bytes, weights)


def save(model, path: str | os.PathLike, tokenizer=None, *, overwrite: bool = False, save_dtype: str | torch.dtype = "auto",
         max_shard_bytes: int = MAX_SHARD_BYTES, weights=None) -> Path:
    """Write a quantized model (and its tokenizer) to `path` atomically, in the tool's own format.
    `weights` supplies the tensors of blocks that are on the meta device (a streamed run's finished
    blocks: `resume.finished_blocks(work_dir, model)`)."""
    if not isinstance(getattr(model.config, "quantization_config", None), dict):
        raise ValueError("the model has not been quantized by signround: run signround.quantize first")
    with atomic_folder(path, overwrite) as tmp:
        state = state_for_saving(model, _save_dtype(model, save_dtype))
        write_hf_folder(tmp, model, tokenizer, state, model.config.quantization_config, max_shard_bytes, weights)
    return Path(path).resolve()


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights: is it a signround output folder?")
    return files


def stored_scheme(qcfg: dict, layer: str | None = None) -> WeightScheme:
    """The scheme a saved `quantization_config` gives `layer` (its default scheme when `layer` is None)."""
    spec = qcfg.get("extra_config", {}).get(layer) if layer else None
    if spec:
        return WeightScheme(**spec)
    return WeightScheme(qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg.get("kquant", False), qcfg.get("fp"), qcfg.get("act"))


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Rebuild a runnable model from a signround output folder: QuantLinear where the shards hold
    packed layers, plain modules elsewhere."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: is it a signround output folder?")
    config = AutoConfig.from_pretrained(folder)
    qcfg = getattr(config, "quantization_config", None)
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "signround":
        raise NotACheckpointError(f"{folder} is not a signround output folder (its config.json has no signround quantization_config): "
                                  f"quantize it first, or use `signround eval` for original models")
    files = _shard_files(folder)
    state = {}
    for f in files:
        with safe_open(f, framework="pt") as reader:
            state.update({k: reader.get_tensor(k) for k in reader.keys()})
    packed_layers = {k[: -len(".qweight")] for k in state if k.endswith(".qweight")}
    if dtype is None:  # fp16 matmuls are slow and lossy on CPUs: compute in fp32 there
        dtype = torch.float32 if torch.device(device).type == "cpu" else _stored_float_dtype(files)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, module in [(n, m) for n, m in model.named_modules() if experts.is_experts(m)]:
        if any(k.startswith(f"{name}.0.") for k in state):  # stored per expert: quantized (or kept 16-bit) by signround
            set_submodule(model, name, experts.QuantExperts.shell(module, _stored_expert_schemes(qcfg, name, packed_layers), dtype))
    for name in sorted(packed_layers):
        linear = model.get_submodule(name)
        if isinstance(linear, QuantLinear):  # an expert's projection, made above
            continue
        weight = linear.weight
        in_features, out_features = (weight.shape[1], weight.shape[0]) if isinstance(linear, torch.nn.Linear) else weight.shape
        q = QuantLinear(in_features, out_features, stored_scheme(qcfg, name), getattr(linear, "bias", None) is not None, dtype=weight.dtype)
        set_submodule(model, name, q)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {n for n in missing if n.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder} does not match its config: missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for module in model.modules():  # keep scales exact whatever dtype the model runs in
        if isinstance(module, QuantLinear):
            for key, stored in module.exact_dtypes().items():
                setattr(module, key, getattr(module, key).to(stored))
    return model.to(device).eval()


def _stored_expert_schemes(qcfg: dict, module_name: str, packed_layers: set[str]):
    """The scheme of each projection (`3.gate_proj`) of the experts module `module_name`, None where it was kept 16-bit."""
    def scheme(suffix: str) -> WeightScheme | None:
        name = f"{module_name}.{suffix}"
        return stored_scheme(qcfg, name) if name in packed_layers else None

    return scheme


def _stored_float_dtype(files: list[Path]) -> torch.dtype:
    with safe_open(files[0], framework="pt") as reader:
        for key in reader.keys():
            if key.rpartition(".")[2] not in SCALE_BUFFERS:
                t = reader.get_slice(key)
                dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(t.get_dtype())
                if dtype:
                    return dtype
    return torch.float16
