"""Exports to the checkpoint formats that runtimes load, one module per format, registered by name.

A format says which schemes it can represent (`refusal`), so an impossible request is refused before
any tuning, and writes an output folder from a model that `signround.quantize` has packed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from ..blocks import find_blocks, find_linears, linear_weight
from ..config import ConfigError, QuantConfig, WeightScheme
from ..qlinear import QuantLinear


class FormatError(ConfigError):
    """The chosen scheme cannot be written in the chosen format; the message says which schemes can."""


class Format(Protocol):
    name: str
    fits: str  # the schemes it represents, in words, for error messages

    def refusal(self, scheme: WeightScheme, in_features: int) -> str | None:
        """Why a layer with this scheme and input width cannot be written, or None."""

    def write(self, model, tokenizer, folder: Path) -> None:
        """Write the whole model into the (empty, temporary) `folder`."""


_REGISTRY: dict[str, Format] = {}
NATIVE = "signround"


def register_format(cls):
    _REGISTRY[cls.name] = cls()
    return cls


def available() -> list[str]:
    _load_builtin()
    return [NATIVE, *sorted(_REGISTRY)]


def get_format(name: str) -> Format:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown format {name!r}: choose from {', '.join(available())}")
    return _REGISTRY[name]


def _load_builtin() -> None:
    from . import auto_round, compressed_tensors, gguf, gptq  # noqa: F401  (each registers itself)


def quantized_layers(model) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def check_formats(names: list[str], model, config: QuantConfig) -> None:
    """Refuse, before tuning, a format that cannot represent the scheme some layer will get."""
    blocks_name, blocks = find_blocks(model)
    for name in names:
        if name == NATIVE:
            continue
        fmt = get_format(name)
        reason = getattr(fmt, "model_refusal", lambda m: None)(model)
        if reason:
            raise FormatError(f"format {name} cannot hold this model: {reason}")
        for i, block in enumerate(blocks):
            for layer, module in find_linears(block).items():
                full = f"{blocks_name}.{i}.{layer}"
                scheme = config.scheme_for(full)
                if scheme is None:
                    continue
                reason = fmt.refusal(scheme, linear_weight(module).shape[1])
                if reason:
                    raise FormatError(f"format {name} cannot hold {full} as {scheme.name()}: {reason}; {name} takes {fmt.fits}")


def export(model, tokenizer, path: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Write a model packed by `signround.quantize` (or `signround.load`) in format `name`, atomically."""
    from ..checkpoint import atomic_folder, save

    if name == NATIVE:
        return save(model, path, tokenizer, overwrite=overwrite)
    fmt = get_format(name)
    reason = getattr(fmt, "model_refusal", lambda m: None)(model)
    if reason:
        raise FormatError(f"format {name} cannot hold this model: {reason}")
    layers = quantized_layers(model)
    if not layers:
        raise ConfigError("the model holds no quantized layers: run signround.quantize first")
    for layer_name, layer in layers.items():
        reason = fmt.refusal(layer.scheme, layer.in_features)
        if reason:
            raise FormatError(f"format {name} cannot hold {layer_name} as {layer.scheme.name()}: {reason}; {name} takes {fmt.fits}")
    with atomic_folder(path, overwrite) as tmp:
        fmt.write(model, tokenizer, tmp)
    return Path(path).resolve()


def write_packed_folder(model, tokenizer, folder: Path, layer_tensors, quantization_config: dict, dtype=None) -> None:
    """An HF folder whose quantized layers hold the tensors `layer_tensors(name, layer)` returns in
    place of signround's own qweight/qzeros/scales; everything else in `dtype` (fp16 by default)."""
    import torch

    from ..checkpoint import state_for_saving, write_hf_folder

    state = state_for_saving(model, dtype or torch.float16)
    for name, layer in quantized_layers(model).items():
        for key in ("qweight", "qzeros", "scales"):
            del state[f"{name}.{key}"]
        state.update({f"{name}.{k}": v.contiguous() for k, v in layer_tensors(name, layer).items()})
    write_hf_folder(folder, model, tokenizer, state, quantization_config)


def unquantized_block_linears(model) -> list[str]:
    """Linear layers inside the decoder blocks that were kept in 16 bit (by overrides or skips)."""
    blocks_name, blocks = find_blocks(model)
    return [f"{blocks_name}.{i}.{n}" for i, block in enumerate(blocks) for n, m in find_linears(block).items() if not isinstance(m, QuantLinear)]


def partial_group(scheme: WeightScheme, in_features: int, wider_ok: bool = False) -> str | None:
    """Runtimes' kernels want whole groups: refuse a last group cut short (576 inputs at group 128), and
    a group wider than the layer unless the format can call it per-channel (`wider_ok`)."""
    g = scheme.group_size
    if g != -1 and g > in_features and not wider_ok:
        return f"its kernels need the group size to be at most the layer's width ({in_features} < {g})"
    if g != -1 and g < in_features and in_features % g:
        return f"its kernels need the group size to divide the layer's width ({in_features} % {g} != 0; a partial last group is signround's own extension)"
    return None


class GPTQLayout:
    """What formats built on GPTQ's int32 layout (gptq, auto_round) accept: 2/3/4/8 bits, whole groups."""

    fits = "integer schemes of 2, 3, 4 or 8 bits whose group size divides every layer's width (or -1)"

    def refusal(self, scheme: WeightScheme, in_features: int) -> str | None:
        if scheme.bits not in (2, 3, 4, 8):
            return f"its GPTQ-layout kernels take 2, 3, 4 or 8 bits, not {scheme.bits}"
        return partial_group(scheme, in_features)


def default_scheme(model) -> WeightScheme:
    qcfg = model.config.quantization_config
    return WeightScheme(qcfg["bits"], qcfg["group_size"], qcfg["sym"])
