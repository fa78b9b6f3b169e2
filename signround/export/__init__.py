"""Exports to the checkpoint formats that runtimes load, one module per format, registered by name.

A format says which schemes it can represent (`refusal`), so an impossible request is refused before
any tuning, and writes an output folder from a model that `signround.quantize` has packed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..blocks import find_blocks, find_linears
from ..budget import FUSED_KINDS, fuse_kinds, group_layers
from ..config import ConfigError, QuantConfig, WeightScheme
from ..qlinear import QuantLinear


class FormatError(ConfigError):
    """The chosen scheme cannot be written in the chosen format; the message says which schemes can."""


class Format:
    """A format: which schemes (and models) it can hold, and how it writes them. Subclasses set
    `name` and `fits` (the schemes it takes, in words, for error messages) and implement the rest."""

    name: str
    fits: str
    kinds = ("int",)  # the number formats (WeightScheme.kind) it stores: K-quant scales have a place only in GGUF
    activations: tuple[str, ...] = ()  # the input formats (WeightScheme.act) its config can name: quantized inputs (W8A8, MXFP4 ...)
    holds_experts = False  # stacked mixture-of-experts tensors: written only where the consumer's loading of them is tested
    holds_lm_head = True  # a quantized lm_head (AutoAWQ's loader keeps it 16-bit)
    fuses = FUSED_KINDS  # the matrices its runtime executes as one (vLLM's fused q/k/v, gate/up, experts), so one scheme each

    def refusal(self, scheme: WeightScheme, in_features: int) -> str | None:
        """Why a layer with this scheme and input width cannot be written, or None."""
        raise NotImplementedError

    def schemes_refusal(self, schemes: set[WeightScheme]) -> str | None:
        """Why these schemes cannot be written together (a format with one scheme per model), or None."""
        return None

    def model_refusal(self, model) -> str | None:
        """Why this model cannot be written at all (e.g. an architecture the format has no names for), or None."""
        return None

    def expert_refusal(self, scheme: WeightScheme | None) -> str | None:
        """Why one matrix of stacked experts cannot be written with this scheme (None: kept 16-bit), where the
        consumer loads experts by another path than its linear layers, or None."""
        return None

    one_scheme_per_stack = False  # whether each projection of an experts module is one tensor of one type on disk

    def write(self, model, tokenizer, folder: Path) -> None:
        """Write the whole model into the (empty, temporary) `folder`."""
        raise NotImplementedError


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
    from . import auto_round, awq, compressed_tensors, gguf, gptq  # noqa: F401  (each registers itself)


def has_experts(model) -> bool:
    """Whether the model holds stacked experts, quantized or not."""
    from ..experts import QuantExperts, is_experts

    return any(is_experts(m) or isinstance(m, QuantExperts) for m in model.modules())


def outside_blocks(model, names) -> list[str]:
    """The layer names not inside the decoder blocks (a quantized lm_head), which a loader converts only where
    its config names them."""
    prefix = f"{find_blocks(model)[0]}."
    return [name for name in names if not name.startswith(prefix)]


def quantized_layers(model) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _refuse(fmt: Format, model, layers: dict[str, tuple[WeightScheme, int]]) -> None:
    """Raise FormatError for the model or the first layer (name -> (scheme, in_features)) `fmt` cannot hold."""
    from ..experts import split_refusal, stacked_matrix_names

    stacked = stacked_matrix_names(model) if has_experts(model) else set()
    reason = None
    if stacked:
        reason = split_refusal(model) if fmt.holds_experts else (
            "its writer does not lay out mixture-of-experts tensors for its consumers yet; save signround's own folder "
            "(format signround), which signround.load runs")
    reason = reason or fmt.model_refusal(model)
    if reason:
        raise FormatError(f"format {fmt.name} cannot hold this model: {reason}")
    outside = outside_blocks(model, layers)
    if outside and not fmt.holds_lm_head:
        holders = ", ".join(sorted(f.name for f in _REGISTRY.values() if f.holds_lm_head))
        raise FormatError(f"format {fmt.name} cannot hold {outside[0]} quantized: its loader keeps it 16-bit; drop --quantize-lm-head "
                          f"(quantize_lm_head=False), or export as {holders}")
    for layer_name, (scheme, in_features) in layers.items():
        reason = _layer_refusal(fmt, scheme, in_features) or (fmt.expert_refusal(scheme) if layer_name.split(" (")[0] in stacked else None)
        if reason:
            raise FormatError(f"format {fmt.name} cannot hold {layer_name} as {scheme.name()}: {reason}")
    kept = sorted(stacked - {name.split(" (")[0] for name in layers})
    reason = fmt.expert_refusal(None) if kept else None
    if reason:
        raise FormatError(f"format {fmt.name} cannot hold {kept[0]} kept 16-bit: {reason}")
    if fmt.one_scheme_per_stack:
        _refuse_mixed_stacks(fmt, stacked, layers)
    _refuse_split_plan(fmt, model, layers)
    reason = fmt.schemes_refusal({scheme for scheme, _ in layers.values()})
    if reason:
        raise FormatError(f"format {fmt.name} cannot hold this model: {reason}; {fmt.name} takes {fmt.fits}")


def _refuse_split_plan(fmt: Format, model, layers: dict) -> None:
    """A bit-budget plan searched for outputs that run q/k/v (or gate/up) apart, as GGUF, written where the
    runtime runs them as one matrix (vLLM): the layers of such a group must share a scheme."""
    if not (getattr(model.config, "quantization_config", None) or {}).get("plan"):
        return
    for key, members in group_layers(list(layers), fmt.fuses).items():
        schemes = {layers[n][0] for n in members}
        if len(schemes) > 1:
            raise FormatError(f"format {fmt.name} cannot hold {key} as {', '.join(sorted(s.name() for s in schemes))}: its runtime runs them "
                              f"as one matrix, and this model's bit-budget plan (searched for GGUF or with --split-fused) splits them; "
                              f"quantize again with --format {fmt.name}")


def _refuse_mixed_stacks(fmt: Format, stacked: set[str], layers: dict) -> None:
    """Experts of one projection (`mlp.experts.*.gate_proj`) given different schemes, where the format stores them as one tensor."""
    by_stack: dict[str, set] = {}
    for name in stacked:
        module, _, part = name.rpartition(".")
        by_stack.setdefault(f"{module.rpartition('.')[0]}.*.{part}", set()).add(layers[name][0] if name in layers else None)
    for stack, schemes in sorted(by_stack.items()):
        if len(schemes) > 1:
            named = sorted("16-bit" if s is None else s.name() for s in schemes)
            raise FormatError(f"format {fmt.name} cannot hold {stack} as {', '.join(named)}: it stores each projection of an experts "
                              f"module as one tensor of one type; give all its experts one scheme (a --layer override, no --split-fused)")


def _layer_refusal(fmt: Format, scheme: WeightScheme, in_features: int) -> str | None:
    """Why `fmt` cannot store a layer of this scheme and width (the end of a FormatError message), or None."""
    if scheme.kind not in fmt.kinds:
        if scheme.kquant:
            why = "K-quant scales are quantized per 256 weights, which only GGUF stores; export it as gguf"
        else:
            why = f"its writer has no place for floating-point weights; export them as {_holders(scheme, in_features)}"
        return f"{why}, or quantize for {fmt.name} with a scheme it takes ({fmt.fits})"
    reason = fmt.refusal(scheme, in_features)
    if reason:
        return f"{reason}; {fmt.name} takes {fmt.fits}"
    if scheme.act and scheme.act not in fmt.activations:
        return (f"its config has no place for quantized inputs ({scheme.act}); export it as {_holders(scheme, in_features)}, "
                f"or quantize weights alone for {fmt.name}")
    return None


def _holders(scheme: WeightScheme, in_features: int) -> str:
    """The formats that can store such a layer, in words, signround's own folder last."""
    takes = [f.name for f in _REGISTRY.values() if scheme.kind in f.kinds and not f.refusal(scheme, in_features)
             and (not scheme.act or scheme.act in f.activations)]
    return " or ".join(sorted(takes)) + (" (or signround's own folder)" if takes else "signround's own folder")


def _option_layers(model, config: QuantConfig, option: WeightScheme) -> dict:
    """The layers `config` plans, all at one bit-budget option (K types with llama.cpp's fallbacks)."""
    from ..pipeline import planned_layers

    return planned_layers(model, dataclasses.replace(config, scheme=option, target_bits=None))


def held_options(names: list[str], model, config: QuantConfig, options) -> tuple[str, ...]:
    """The bit-budget options (scheme names) that every format in `names` can store for every layer: a search's
    defaults narrowed to the outputs asked for (GPTQ has no 5- or 6-bit kernels, for instance; compressed-tensors
    loads only symmetric experts)."""
    from ..config import parse_scheme
    from ..experts import stacked_matrix_names

    formats = [get_format(name) for name in names if name != NATIVE]
    stacked = stacked_matrix_names(model) if has_experts(model) else set()
    kept = []
    for option in options:
        scheme = parse_scheme(option)
        chosen = _option_layers(model, config, scheme) if scheme else {}  # None: 16-bit
        stored = {(t.scheme, t.weight().shape[1]) for t in chosen.values()}
        experts = {t.scheme for name, t in chosen.items() if name in stacked} if scheme else ({None} if stacked else set())
        if not any(_layer_refusal(f, s, width) for f in formats for s, width in stored) and not any(
                f.expert_refusal(s) for f in formats for s in experts):
            kept.append(option)
    return tuple(kept)


def fused_by(names: list[str]) -> bool | tuple[str, ...]:
    """The kinds of fused matrices (`QuantConfig.fuse_groups`) the runtimes of these formats need at one scheme:
    all (True) for signround's own folder alone, which a later `signround export` may write for any runtime."""
    kinds = {kind for name in names if name != NATIVE for kind in get_format(name).fuses}
    return True if not kinds or kinds == set(FUSED_KINDS) else tuple(k for k in FUSED_KINDS if k in kinds)


def check_formats(names: list[str], model, config: QuantConfig, planned: dict | None = None) -> None:
    """Refuse, before tuning, a format that cannot represent the scheme some layer will get
    (`planned`: `pipeline.planned_layers(model, config)` when the caller has it already)."""
    from ..pipeline import planned_layers, planned_lm_head
    from ..search import option_schemes

    planned = {**(planned if planned is not None else planned_layers(model, config)), **planned_lm_head(model, config)}
    layers = {name: (task.scheme, task.weight().shape[1]) for name, task in planned.items()}
    if config.target_bits is not None and config.plan is None:  # any option may be chosen for any layer
        # and the search decides every block layer but those a --layer override fixes: the base scheme is no block's
        blocks_name = find_blocks(model)[0]
        layers = {n: v for n, v in layers.items() if not n.startswith(f"{blocks_name}.") or config.overridden(n)}
        stacking = [name for name in names if name != NATIVE and get_format(name).one_scheme_per_stack]
        if stacking and "experts" not in fuse_kinds(config.fuse_groups) and has_experts(model):
            raise FormatError(f"format {stacking[0]} stores each projection of an experts module as one tensor of one type, which "
                              f"--split-fused would let the search split; drop --split-fused")
        for option in filter(None, option_schemes(config)):
            chosen = _option_layers(model, config, option)
            layers.update({f"{name} ({option.name()})": (task.scheme, task.weight().shape[1]) for name, task in chosen.items()})
    for name in names:
        if name != NATIVE:
            _refuse(get_format(name), model, layers)


def export(model, tokenizer, path: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Write a model packed by `signround.quantize` (or `signround.load`) in format `name`, atomically."""
    from ..checkpoint import atomic_folder, save

    if name == NATIVE:
        return save(model, path, tokenizer, overwrite=overwrite)
    fmt = get_format(name)
    layers = quantized_layers(model)
    if not layers:
        raise ConfigError("the model holds no quantized layers: run signround.quantize first")
    _refuse(fmt, model, {layer_name: (layer.scheme, layer.in_features) for layer_name, layer in layers.items()})
    with atomic_folder(path, overwrite) as tmp:
        fmt.write(model, tokenizer, tmp)
    return Path(path).resolve()


def write_packed_folder(model, tokenizer, folder: Path, layer_tensors, quantization_config: dict, dtype=None, rename=None) -> None:
    """An HF folder whose quantized layers hold the tensors `layer_tensors(name, layer)` returns in
    place of signround's own buffers; everything else in `dtype` (fp16 by default), which config.json names when given.
    `rename(key)` gives a tensor's name on disk where the consumer reads another than the module tree's."""
    import torch

    from ..checkpoint import state_for_saving, write_hf_folder

    state = state_for_saving(model, dtype or torch.float16)
    for name, layer in quantized_layers(model).items():
        for key, _ in layer.named_buffers():
            if key != "bias":
                del state[f"{name}.{key}"]
        state.update({f"{name}.{k}": v.contiguous() for k, v in layer_tensors(name, layer).items()})
    if rename:
        state = {rename(key): tensor for key, tensor in state.items()}
    write_hf_folder(folder, model, tokenizer, state, quantization_config, dtype=dtype)


def unquantized_block_linears(model) -> list[str]:
    """Layers inside the decoder blocks that were kept in 16 bit (by overrides or skips), and routers that
    consumers run as linear layers once they split stacked experts into per-expert ones."""
    from ..experts import routers_outside_linears

    blocks_name, blocks = find_blocks(model)
    return [f"{blocks_name}.{i}.{n}" for i, block in enumerate(blocks)
            for n in [*(n for n, m in find_linears(block).items() if not isinstance(m, QuantLinear)), *routers_outside_linears(block)]]


def partial_group(scheme: WeightScheme, in_features: int, wider_ok: bool = False) -> str | None:
    """Runtimes' kernels want whole groups: refuse a last group cut short (576 inputs at group 128), and
    a group wider than the layer unless the format can call it per-channel (`wider_ok`)."""
    g = scheme.group_size
    if g != -1 and g > in_features and not wider_ok:
        return f"its kernels need the group size to be at most the layer's width ({in_features} < {g})"
    if g != -1 and g < in_features and in_features % g:
        return f"its kernels need the group size to divide the layer's width ({in_features} % {g} != 0; a partial last group is signround's own extension)"
    return None


class GPTQLayout(Format):
    """What formats built on GPTQ's int32 layout (gptq, auto_round) accept: 2/3/4/8 bits, whole groups."""

    fits = "integer schemes of 2, 3, 4 or 8 bits whose group size divides every layer's width (or -1)"

    def expert_refusal(self, scheme):
        if scheme is None:
            return ("auto-round's loader rebuilds every expert as a quantized layer, so 16-bit experts have no place; quantize them, "
                    "or save signround's own folder (format signround)")
        return None

    def refusal(self, scheme: WeightScheme, in_features: int) -> str | None:
        if scheme.bits not in (2, 3, 4, 8):
            return f"its GPTQ-layout kernels take 2, 3, 4 or 8 bits, not {scheme.bits}"
        return partial_group(scheme, in_features)


def default_scheme(model) -> WeightScheme:
    from ..checkpoint import stored_scheme

    return stored_scheme(model.config.quantization_config)
