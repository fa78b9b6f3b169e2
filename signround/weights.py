"""A checkpoint's tensors read a few at a time, so that quantizing holds one block's weights in
memory rather than the whole model's (a model larger than RAM still quantizes).

`open_lazy(spec)` builds the model's skeleton with every parameter on the meta device, fills in what
lies outside the decoder blocks (embeddings, final norm, lm_head, rotary tables) and returns a
`WeightSource`; `materialize(module, prefix, source)` later fills one block in from the files.
Safetensors files are read through safetensors' own memory map, GGUF tensors byte range by byte range
and dequantized by the gguf package, each file handle closed again so nothing stays resident.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .hardware import release_freed_memory


class StreamingUnsupported(ValueError):
    """The checkpoint cannot be read block by block (its tensors do not map onto the model's names)."""


class WeightSource(Protocol):
    def names(self) -> set[str]: ...

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]: ...

    def digest(self) -> str: ...


def files_digest(paths: list[Path]) -> str:
    """Names, sizes and modification times: a re-downloaded, re-converted or edited file differs."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class SafetensorsSource:
    """Tensors of safetensors files by name: a Hugging Face folder's shards, or one work-state file."""

    def __init__(self, files: list[Path], prefix: str = ""):
        from safetensors import safe_open

        self.prefix = prefix  # prepended to the names stored in the files
        self.file_of = {}
        for path in files:
            with safe_open(path, framework="pt") as reader:
                self.file_of.update({prefix + name: Path(path) for name in reader.keys()})

    @classmethod
    def from_folder(cls, folder: str | Path) -> SafetensorsSource:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file() else sorted(folder.glob("*.safetensors"))
        return cls(files)

    def names(self) -> set[str]:
        return set(self.file_of)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for path in dict.fromkeys(self.file_of[n] for n in names):
            with safe_open(path, framework="pt") as reader:
                out.update({n: reader.get_tensor(n[len(self.prefix):]).clone() for n in names if self.file_of[n] == path})
        return out

    def digest(self) -> str:
        return files_digest(sorted(set(self.file_of.values())))


class MultiSource:
    """Several sources as one (a work state's block files)."""

    def __init__(self, sources: list):
        self.sources = sources
        self.owner = {name: s for s in sources for name in s.names()}

    def names(self) -> set[str]:
        return set(self.owner)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for source in dict.fromkeys(self.owner[n] for n in names):
            out.update(source.tensors([n for n in names if self.owner[n] is source]))
        return out

    def digest(self) -> str:
        return hashlib.sha256("".join(s.digest() for s in self.sources).encode()).hexdigest()[:16]


DEQUANTIZE_ROWS = 4096  # a 262k-token embedding dequantized whole would briefly need ~4x its fp32 size


class GGUFSource:
    """The tensors of a GGUF file under their Hugging Face names, dequantized to fp32, with what llama.cpp's
    converter changed undone as transformers' GGUF loader undoes it: LLaMA's rotary row order of q/k,
    Gemma's norm weights stored as 1 + w. Architectures with other changes are not streamed."""

    ARCHITECTURES = {"llama": ("LLAMA", True, 0.0), "gemma3": ("GEMMA3", False, -1.0)}  # name map, q/k reordered, norm offset

    def __init__(self, path: str | Path, model: nn.Module, reader=None):
        """`reader`: the file's `gguf.GGUFReader` where the caller has one (parsing Gemma's metadata takes ~12 s)."""
        import gguf

        from .blocks import find_blocks
        from .export.gguf import llama_row_order
        from .models import read_gguf

        self.path = Path(path)
        reader = reader or read_gguf(self.path)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        if arch not in self.ARCHITECTURES:
            raise StreamingUnsupported(f"GGUF architecture {arch!r} is not streamed (only {', '.join(self.ARCHITECTURES)})")
        arch_name, reordered, norm_offset = self.ARCHITECTURES[arch]
        by_name = {t.name: t for t in reader.tensors}
        cfg = model.config
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), len(find_blocks(model)[1]))
        self.entries = {}
        for hf_name, param in model.state_dict().items():
            base, _, suffix = hf_name.rpartition(".")
            gguf_base = names.get_name(base)
            t = by_name.get(f"{gguf_base}.{suffix}") if gguf_base else None
            if t is None:
                continue
            rows = heads if gguf_base.endswith("attn_q") else kv_heads if gguf_base.endswith("attn_k") else None
            order = torch.argsort(llama_row_order(param.shape[0], rows)) if reordered and rows and param.dim() == 2 else None
            offset = norm_offset if t.name.endswith("norm.weight") else 0.0
            self.entries[hf_name] = (int(t.data_offset), int(t.n_bytes), t.tensor_type, tuple(t.data.shape), tuple(param.shape), order, offset)
        del reader, by_name  # drops the memory map

    def names(self) -> set[str]:
        return set(self.entries)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        from gguf.quants import dequantize

        out = {}
        with open(self.path, "rb") as f:
            for name in names:
                offset, nbytes, qtype, raw_shape, shape, order, shift = self.entries[name]
                f.seek(offset)
                rows = int(np.prod(raw_shape[:-1])) if len(raw_shape) > 1 else 1
                raw = np.frombuffer(bytearray(f.read(nbytes)), dtype=np.uint8).reshape(rows, -1)
                values = torch.empty(shape, dtype=torch.float32)
                flat = values.view(raw.shape[0], -1)
                for start in range(0, raw.shape[0], DEQUANTIZE_ROWS):  # gguf's dequantize makes several full-size temporaries
                    part = np.ascontiguousarray(dequantize(raw[start : start + DEQUANTIZE_ROWS], qtype), dtype=np.float32)
                    flat[start : start + DEQUANTIZE_ROWS] = torch.from_numpy(part).reshape(part.shape[0], -1)
                if shift:
                    values += shift
                out[name] = values[order] if order is not None else values
        return out

    def digest(self) -> str:
        return files_digest([self.path])


def materialize(module: nn.Module, prefix: str, source: WeightSource, *, init=None, recurse: bool = True, memo: dict | None = None) -> None:
    """Replace `module`'s meta tensors by CPU tensors filled from `source` (names are `prefix` + the
    module's own). Modules with non-persistent buffers (rotary tables) are first run through `init`, the
    model's own weight initialiser, which rebuilds those. `memo` maps meta tensors already materialized
    elsewhere to their new tensors, so tied weights stay tied. The loaded tensors become the parameters
    themselves (no second copy: a 262k-token embedding is 640 MiB in fp32)."""
    memo = {} if memo is None else memo
    wanted: dict[str, tuple[dict, str, torch.Tensor]] = {}  # full name -> (the dict holding it, its key, the meta tensor)
    for sub_name, sub in (module.named_modules() if recurse else [("", module)]):
        rebuilt = False
        for kind in (sub._parameters, sub._buffers):
            for name, t in kind.items():
                if t is None or t.device.type != "meta":
                    continue
                if id(t) in memo:
                    kind[name] = memo[id(t)]
                elif kind is sub._buffers and name in sub._non_persistent_buffers_set:
                    kind[name] = memo[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    rebuilt = True
                else:
                    wanted[prefix + (f"{sub_name}." if sub_name else "") + name] = (kind, name, t)
        if rebuilt:
            if init is None:
                raise StreamingUnsupported(f"{prefix}{sub_name} has buffers that are not in the checkpoint")
            init(sub)
    available = source.names()
    missing = [n for n in wanted if n not in available]
    if missing:
        raise StreamingUnsupported(f"the checkpoint has no tensor {missing[0]!r}")
    first = {id(t): n for n, (_, _, t) in reversed(list(wanted.items()))}  # a weight tied within this module loads once
    loaded = source.tensors(list(first.values()))
    for name, (kind, key, t) in wanted.items():
        if id(t) not in memo:
            value = loaded.pop(name)
            if tuple(value.shape) != tuple(t.shape):
                raise StreamingUnsupported(f"{name} has shape {tuple(value.shape)} in the checkpoint but {tuple(t.shape)} in the model")
            value = value.to(t.dtype)
            memo[id(t)] = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
        kind[key] = memo[id(t)]


def unload_input_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Put the input embedding's weight on the meta device, in every module that holds it (a tied
    lm_head too), and return those modules for `reload`. Once the first block's inputs are captured a
    streamed run needs no embedding until the end, and it is the largest tensor left in memory
    (SmolLM2: 108 MiB of fp32 against one block's 14 MiB)."""
    weight = model.get_input_embeddings().weight
    meta = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=weight.requires_grad)
    holders = []
    for name, module in model.named_modules():
        for key, param in module._parameters.items():
            if param is weight:
                module._parameters[key] = meta
                holders.append((name, module))
    return holders


def reload(modules: list[tuple[str, nn.Module]], source: WeightSource) -> None:
    """Fill the meta tensors of `modules` ((name, module) pairs, as `unload_input_embeddings` returns)
    from `source`, tied ones once."""
    memo = {}
    for name, module in modules:
        materialize(module, f"{name}." if name else "", source, recurse=False, memo=memo)


def materialize_blocks(model: nn.Module, source: WeightSource) -> None:
    """Fill every decoder block still on the meta device from `source` (e.g. `resume.finished_blocks`)."""
    from .blocks import find_blocks

    name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        if is_lazy(block):
            materialize(block, f"{name}.{i}.", source)


def is_lazy(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in module.state_dict().values())


def open_lazy(spec: str, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer, source): the model with its decoder blocks left on the meta device, to be
    filled block by block from `source` by `quantize(..., weights=source)`. Local safetensors folders
    and GGUF files of the architectures `GGUFSource` knows stream; anything else raises StreamingUnsupported."""
    from transformers import AutoModelForCausalLM

    from . import models
    from .blocks import find_blocks

    source_spec = models.resolve(spec)
    if source_spec.kind == "hub":
        raise StreamingUnsupported("hub models are loaded whole")
    models.check_loadable(source_spec, trust_remote_code, allow_pickle, read_weights=not source_spec.gguf_file)
    gguf_path = Path(source_spec.location) / source_spec.gguf_file if source_spec.gguf_file else None
    reader = models.read_gguf(gguf_path) if gguf_path else None  # the check, and kept for GGUFSource
    config, tokenizer = models.load_metadata(source_spec, trust_remote_code)
    dtype = torch.float32 if source_spec.gguf_file else (getattr(config, "dtype", None) or torch.float32)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if gguf_path:
        source = GGUFSource(gguf_path, model, reader)
        del reader
    else:
        if not any(Path(source_spec.location).glob("*.safetensors")):
            raise StreamingUnsupported("no safetensors files")
        source = SafetensorsSource.from_folder(source_spec.location)
    first_name = {}
    for name, t in model.state_dict(keep_vars=True).items():  # tied duplicates are stored once
        first_name.setdefault(id(t), name)
    missing = sorted(set(first_name.values()) - source.names())
    if missing:
        raise StreamingUnsupported(f"the checkpoint's tensor names differ from the model's (no {missing[0]!r})")
    _, blocks = find_blocks(model)
    inside = {id(m) for m in blocks.modules()}
    embed = model.get_input_embeddings()
    outside = [(n, m) for n, m in model.named_modules() if id(m) not in inside]
    outside.sort(key=lambda item: item[1] is not embed)  # the embedding first: a tied lm_head then reuses it
    memo = {}
    for name, module in outside:
        materialize(module, f"{name}." if name else "", source, init=model._init_weights, recurse=False, memo=memo)
    model.eval()
    release_freed_memory()  # parsing the file's metadata leaves much freed heap behind
    return model, tokenizer, source
