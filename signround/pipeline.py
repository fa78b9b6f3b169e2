"""`quantize(model, config)`: the block-by-block driver.

For each decoder block: compute the original block's outputs on the original inputs (the target), let
the algorithm choose integer weights, swap its linear layers for packed `QuantLinear`s, then run the
quantized block on the quantized model's inputs to produce the next block's inputs. Only one block is
on the compute device at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__, distributed, experts, search, smoothing
from .algorithms import BlockData, BlockResult, LayerTask, block_loss, get_algorithm, needs_calibration
from .blocks import (
    UnsupportedModelError,
    capture_block_inputs,
    check_causal,
    find_blocks,
    find_linears,
    is_linear,
    linear_weight,
    move_except_blocks,
    run_block,
    set_submodule,
)
from .cache import CACHE_DTYPES, CACHE_FILES, CacheFactory
from .calibration import DataError, calibration_ids
from .config import ConfigError, QuantConfig, RunConfig, WeightScheme
from .distributed import Shard
from .hardware import cpu_has_fast_bf16, release_freed_memory
from .qlinear import QuantLinear
from .quant.formats import ACTIVATIONS
from .quant.fp import activation_global_scale
from .resume import WorkState, fingerprint
from .weights import is_lazy, materialize, reload, unload_input_embeddings

log = logging.getLogger("signround")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available: use --device cpu")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


class CorruptWeightsError(ValueError):
    """A weight tensor holds NaN or Inf before quantization starts."""


@dataclass
class QuantizeReport:
    """What happened: which layers were quantized or skipped, block losses, cost."""

    quantized: dict[str, WeightScheme] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # layer -> "Q4_K -> W5A16G32": rows no K-quant super-block divides
    block_losses: list[tuple[float | None, float | None]] = field(default_factory=list)
    calibration_shape: tuple[int, int] | None = None
    calibration_seconds: float = 0.0  # reading or sampling calibration text
    tuning_seconds: float = 0.0       # capture, tuning and packing, block by block
    tuning_steps: int = 0             # optimiser steps over the blocks tuned by this call
    peak_memory_bytes: int = 0
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # experts module -> calibration tokens routed to each expert
    bits_per_weight: float = 0.0
    # parameters by where they ended: "quantized", "kept 16-bit" (weight tensors inside the blocks left
    # unquantized, by name in `kept_16bit`), "outside the blocks" (embeddings, lm_head, norms), "block norms and biases"
    parameters: dict[str, int] = field(default_factory=dict)
    kept_16bit: dict[str, int] = field(default_factory=dict)
    plan: str | None = None           # the bit-budget search's summary (`target_bits`): bits, predicted loss, time, schemes
    search_seconds: float = 0.0
    search_peak_bytes: int = 0        # peak memory when the search had finished (opening the model included)
    perplexity: tuple[float, float] | None = None  # (before, after) on `run(..., eval_text=)`
    outputs: list[str] = field(default_factory=list)  # folders `run` wrote
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def share(self, part: str) -> float:
        """Fraction of the model's parameters in `part` (a key of `parameters`)."""
        total = sum(self.parameters.values())
        return self.parameters.get(part, 0) / total if total else 0.0

    def stored_bits(self, name: str, scheme: WeightScheme, in_features: int) -> float:
        """A quantized layer's bits per weight as stored: a K type's legacy fallback at GGUF's block size."""
        return scheme.legacy_bits_per_weight() if name in self.fallbacks else scheme.bits_per_weight(in_features)

    def summary(self) -> str:
        kept = len(self.kept_16bit)
        lines = [
            f"quantized: {len(self.quantized)} weight tensors, {self.share('quantized'):.1%} of the model's parameters",
            f"kept 16-bit: {kept} weight tensors in the blocks ({self.share('kept 16-bit'):.1%})"
            + (f": {', '.join(list(self.kept_16bit)[:4])}{', ...' if kept > 4 else ''}" if kept else "")
            + f"; outside the blocks (embeddings, head): {self.share('outside the blocks'):.1%}",
            f"average bits per quantized weight (incl. scales and zeros): {self.bits_per_weight:.3f}",
            f"tuning time: {self.tuning_seconds:.1f} s, peak memory: {self.peak_memory_bytes / 2**30:.2f} GiB",
        ]
        if self.calibration_shape:
            n, length = self.calibration_shape
            lines.insert(0, f"calibration: {n} samples x {length} tokens ({self.calibration_seconds:.1f} s to prepare)")
        if self.expert_tokens:
            counts = sorted(c for per_module in self.expert_tokens.values() for c in per_module)
            lines.append(f"calibration tokens per expert: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]} "
                         f"({len(counts)} experts in {len(self.expert_tokens)} blocks)")
        if self.plan:
            lines.append(self.plan)
        if self.perplexity:
            lines.append(f"perplexity: {self.perplexity[0]:.3f} before, {self.perplexity[1]:.3f} after")
        return "\n".join(lines + self.notes)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def plan_layers(model, blocks_name: str, blocks, config: QuantConfig, report: QuantizeReport) -> list[list[LayerTask]]:
    """Per block, the weight matrices to quantize with their scheme: linear layers' weights and each
    expert's projections in stacked experts modules. Matrices that cannot be are recorded as skipped."""
    plan = []
    for i, block in enumerate(blocks):
        tasks = []

        def planned(full: str, in_features: int) -> WeightScheme | None:
            scheme = _fitting(config.scheme_for(full, (i, len(blocks))), in_features, full, report)
            if scheme is None:
                report.skipped[full] = config.kept_reason(full)
            elif not scheme.fits(in_features, config.pad_groups):
                report.skipped[full] = (f"in_features={in_features} is odd: {scheme.name()} packs its 4-bit codes two a byte" if scheme.fp else
                                        f"in_features={in_features} is not divisible by group_size={scheme.group_size} (pad_groups is off)")
            else:
                report.quantized[full] = scheme
                return scheme
            return None

        for name, module in find_linears(block).items():
            full = f"{blocks_name}.{i}.{name}"
            _check_finite(f"{full}.weight", module.weight)
            scheme = planned(full, linear_weight(module).shape[1])
            if scheme is not None:
                tasks.append(LayerTask(name, module, scheme))
        for name in experts.routers_outside_linears(block):
            report.skipped[f"{blocks_name}.{i}.{name}"] = "a router that is not a linear layer: kept 16-bit"
        for name, module in experts.find_expert_modules(block).items():
            stacks: dict[str, list[tuple[str, WeightScheme | None]]] = {}
            for param in experts.stacked_params(module):
                _check_finite(f"{blocks_name}.{i}.{name}.{param}", getattr(module, param))
            for entry in experts.expert_matrices_of(module, name):
                scheme = planned(f"{blocks_name}.{i}.{entry.name}", experts.read(module, entry).shape[1])
                if scheme is not None and scheme.act:
                    raise ConfigError(f"{blocks_name}.{i}.{entry.name}: {scheme.name()} quantizes a layer's inputs, which the experts' stacked "
                                      f"forward does not do yet: keep the experts weight-only, e.g. --layer 'experts\\.=W4A16'")
                stacks.setdefault(entry.param, []).append((entry.name, scheme))
                if scheme is not None:
                    tasks.append(LayerTask(entry.name, module, scheme, entry))
            for param, chosen in stacks.items():
                kept = [n for n, scheme in chosen if scheme is None]
                if 0 < len(kept) < len(chosen):
                    raise ConfigError(f"{blocks_name}.{i}.{kept[0]} would stay 16-bit while other experts of {blocks_name}.{i}.{name}.{param} "
                                      f"are quantized: a stacked expert tensor is quantized or kept whole; override all of it, e.g. "
                                      f"--layer '{name.rpartition('.')[2]}\\.=fp16'")
        plan.append(tasks)
    if config.plan is None:  # a searched plan may put a group size on layers it only pads: chosen, not a mistake
        _check_group_sizes([t for tasks in plan for t in tasks])
    if config.smooth is not None and not any(s.act for s in report.quantized.values()):
        raise ConfigError(f"smooth={config.smooth} smooths the inputs of layers that quantize them, and this scheme quantizes none: "
                          f"use W8A8 (or another scheme with quantized inputs), or drop smooth")
    if not report.quantized:
        if report.skipped:
            why = next(iter(report.skipped.values()))
            raise ConfigError(f"no layer can be quantized with this scheme ({why}): choose a group size that divides the layers' input size, or -1")
        raise UnsupportedModelError(f"{type(model).__name__} has no linear layers in its blocks to quantize")
    return plan


def _fitting(scheme: WeightScheme | None, in_features: int, name: str, report: QuantizeReport) -> WeightScheme | None:
    """The scheme itself, or for a K-quant on rows that hold no whole number of super-blocks the legacy
    scheme llama.cpp falls back to (recorded in `report.fallbacks`)."""
    fallback = scheme.fallback() if scheme is not None and not scheme.fits(in_features) else None
    if fallback is None:
        return scheme
    report.fallbacks[name] = f"{scheme.name()} -> {fallback.name()}"
    return fallback


def _check_finite(name: str, weight: torch.Tensor) -> None:
    if not weight.is_meta and not torch.isfinite(weight).all():
        raise CorruptWeightsError(f"{name} holds NaN or Inf values: the model's weights are corrupt; re-download or re-convert it")


def _load_block(blocks_name: str, blocks, i: int, tasks: list[LayerTask], weights) -> None:
    """Read block i's weights from the checkpoint when the model was opened lazily (`weights.open_lazy`)."""
    if weights is None or not is_lazy(blocks[i]):
        return
    materialize(blocks[i], f"{blocks_name}.{i}.", weights)
    for task in tasks:
        _check_finite(f"{blocks_name}.{i}.{task.name}" + ("" if task.expert else ".weight"), task.weight())


def planned_layers(model, config: QuantConfig) -> dict[str, LayerTask]:
    """Every linear layer `quantize` would pack, by full name, with its scheme: the same rules as
    `plan_layers`, for checks made before tuning (disk space, export formats)."""
    blocks_name, blocks = find_blocks(model)
    plan = plan_layers(model, blocks_name, blocks, config, QuantizeReport())
    return {f"{blocks_name}.{i}.{t.name}": t for i, tasks in enumerate(plan) for t in tasks}


def _check_group_sizes(tasks: list[LayerTask]) -> None:
    """A partial last group is fine where a group size divides some layers (SmolLM2's 576-wide inputs at
    g128); one that divides none of its layers is a mistake, refused before any work."""
    widths: dict[int, set[int]] = {}
    for t in tasks:
        if t.scheme.group_size != -1:
            widths.setdefault(t.scheme.group_size, set()).add(t.weight().shape[1])
    for group, sizes in widths.items():
        if all(w % group for w in sizes):
            raise ConfigError(f"group_size={group} divides none of the layers' input sizes ({', '.join(map(str, sorted(sizes)))}): "
                              f"choose a divisor of them (e.g. 32, 64, 128) or -1 for one group per output channel")


def _swap(model, prefix: str, task: LayerTask, qw) -> None:
    bias = getattr(task.module, "bias", None)
    set_submodule(model, f"{prefix}{task.name}", QuantLinear.from_quantized(qw, task.scheme, bias))


def _install(model, prefix: str, tasks: list[LayerTask], layers: dict[str, torch.nn.Module]) -> None:
    """Put the packed `layers` (by task name) in place of what they quantize: a linear layer's at its
    name, the projections of an experts module all at once as one QuantExperts (projections without a
    packed layer stay 16-bit inside it)."""
    stacked: dict[str, tuple[torch.nn.Module, dict]] = {}
    for task in tasks:
        if task.expert is None:
            set_submodule(model, f"{prefix}{task.name}", layers[task.name])
        else:
            stacked.setdefault(task.expert.module, (task.module, {}))[1][(task.expert.expert, task.expert.part)] = layers[task.name]
    for name, (module, packed) in stacked.items():
        for entry in experts.expert_matrices_of(module):
            if (entry.expert, entry.part) not in packed:
                packed[(entry.expert, entry.part)] = experts.float_linear(experts.read(module, entry))
        set_submodule(model, f"{prefix}{name}", experts.QuantExperts(module, packed))


def _restore_dtype(block, dtype: torch.dtype) -> None:
    """Cast the block's float tensors back to the model's dtype, except the packed layers' fp16 scales."""
    for module in block.modules():
        if isinstance(module, QuantLinear):
            if module.bias is not None:
                module.bias = module.bias.to(dtype)
        else:
            module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _check_lm_head(model, config: QuantConfig) -> None:
    """lm_head is quantized after the blocks, by round-to-nearest, with no calibration pass of its own: an input
    format that needs a calibrated scale (NVFP4) cannot be given to it. Refused before any work."""
    head = model.get_output_embeddings()
    if not config.quantize_lm_head or head is None:
        return
    name = _module_name(model, head)
    scheme = config.scheme_for(name)
    if scheme is not None and scheme.act and ACTIVATIONS[scheme.act].calibrated:
        raise ConfigError(f"{name} would get {scheme.name()}, whose {scheme.act} inputs need a scale calibrated in the blocks' pass, "
                          f"which {name} (quantized after them) does not get: give it a weight-only scheme, "
                          f"e.g. layer_overrides={{'{name}': '{dataclasses.replace(scheme, act=None).name()}'}}")


def _untied_lm_head(model):
    """The output layer, where it is a linear layer of its own (not the embeddings' matrix), else None."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or not is_linear(head) or (embed is not None and head.weight is embed.weight):
        return None
    return head


def planned_lm_head(model, config: QuantConfig) -> dict[str, LayerTask]:
    """The lm_head `quantize` would pack (by name, as `planned_layers`), for checks made before tuning."""
    head = _untied_lm_head(model) if config.quantize_lm_head else None
    if head is None:
        return {}
    name = _module_name(model, head)
    scheme = _fitting(config.scheme_for(name), head.in_features, name, QuantizeReport())
    return {name: LayerTask(name, head, scheme)} if scheme is not None and scheme.fits(head.in_features, config.pad_groups) else {}


def _quantize_lm_head(model, config: QuantConfig, report: QuantizeReport) -> None:
    head = _untied_lm_head(model)
    if head is None:
        if model.get_output_embeddings() is not None and is_linear(model.get_output_embeddings()):
            report.notes.append("lm_head is tied to the embeddings: kept 16-bit")
        return
    name = _module_name(model, head)
    scheme = _fitting(config.scheme_for(name), head.in_features, name, report)
    if scheme is None or not scheme.fits(head.in_features, config.pad_groups):
        report.skipped[name] = "lm_head: scheme does not fit" if scheme else "kept 16-bit by a layer override"
        return
    _swap(model, "", LayerTask(name, head, scheme), scheme.quantize(head.weight.detach()))
    report.quantized[name] = scheme
    report.notes.append("lm_head quantized with round-to-nearest")


def quantization_config_dict(config: QuantConfig, report: QuantizeReport, computed: dict | None = None) -> dict:
    """The `quantization_config` written to config.json: enough for `signround.load` to rebuild every layer,
    with the tuning settings (recipe values filled in) and how the run computed, for the record."""
    default = config.scheme
    settings = config.resolved().to_dict()
    extra = {name: s.to_dict() for name, s in report.quantized.items() if s != default}
    tuning = {k: v for k, v in settings.items() if k not in ("scheme", "mixture", "layer_overrides", "plan")}
    return {
        "quant_method": "signround",
        "version": __version__,
        "method": config.method,
        "bits": default.bits,
        "group_size": default.group_size,
        "sym": default.sym,
        **({"kquant": True} if default.kquant else {}),
        **({"fp": default.fp} if default.fp else {}),
        **({"act": default.act} if default.act else {}),
        **({"mixture": config.mixture} if config.mixture else {}),  # llama.cpp's name for the per-layer K types in extra_config
        "packing": "gptq-int32",          # qweight (in*bits/32, out), qzeros (groups, out*bits/32), scales (groups, out)
                                          # K-quant layers: qweight, super_scales/super_mins (in/256, out), scale_codes/min_codes (groups, out)
                                          # float layers: qweight (out, in*bits/8) uint8, scales (out, groups), NVFP4's global_scale
        "zero_point": "stored",           # qzeros hold the zero point itself (no GPTQ v1 minus-one)
        "layer_overrides": settings["layer_overrides"],
        "extra_config": extra,
        "modules_not_quantized": sorted(report.skipped),
        **({"plan": settings["plan"]} if settings.get("plan") is not None else {}),  # every searched layer's scheme: `--plan` reuses it
        "tuning": tuning,
        **({"run": computed} if computed else {}),
    }


DEFAULT_SEQLEN = 2048


def calibration_seqlen(model, config: QuantConfig) -> int:
    """`config.seqlen`, or 2048 clamped to the model's context when unset; longer than the context is an error."""
    max_len = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if config.seqlen is None:
        return min(DEFAULT_SEQLEN, max_len) if max_len else DEFAULT_SEQLEN
    if max_len and config.seqlen > max_len:
        raise ConfigError(f"seqlen={config.seqlen} is longer than the model allows ({max_len} positions): use --seqlen {max_len} or less")
    return config.seqlen


def _calibration_token_ids(model, config: QuantConfig, tokenizer, calibration, report: QuantizeReport) -> torch.Tensor:
    if tokenizer is None and not isinstance(calibration, torch.Tensor):
        raise DataError("calibration needs a tokenizer (or pass token ids as a tensor)")
    start = time.perf_counter()
    ids = calibration_ids(calibration, model, tokenizer, config.nsamples, calibration_seqlen(model, config), config.seed)
    report.calibration_seconds = time.perf_counter() - start
    return ids


def _calibration(model, config: QuantConfig, tokenizer, calibration, report: QuantizeReport, state: WorkState | None, device) -> torch.Tensor:
    """The calibration token ids: the work state's, or sampled (rank 0's rows for every process) and kept there."""
    ids = state.calibration() if state else None
    if ids is None:
        ids = distributed.broadcast(_calibration_token_ids(model, config, tokenizer, calibration, report), device)
        if state:
            state.save_calibration(ids)
    return ids


def _search_plan(model, blocks_name, blocks, config: QuantConfig, state: WorkState | None, ids, device, amp_dtype, run: RunConfig, weights,
                 report: QuantizeReport) -> QuantConfig:
    """`config` with the bit-budget search's plan: the work state's when an interrupted run already searched."""
    chosen = state.plan() if state else None
    if chosen is None:
        summary = None
        if distributed.rank() == 0:  # under torchrun rank 0 searches and the others take its plan
            with tempfile.TemporaryDirectory(prefix="signround-search-") as folder:  # --offload: the hidden states on disk
                caches = CacheFactory(CACHE_DTYPES[run.cache_dtype], device if device.type == "cuda" else torch.device("cpu"),
                                      Path(folder) if run.offload else None)
                result = search.search(model, blocks_name, blocks, config, ids, device, amp_dtype, caches, weights)
            chosen = {name: None if s is None else s.to_dict() for name, s in result.plan.items()}
            summary = result.summary()
            report.search_seconds, report.search_peak_bytes = result.seconds, peak_memory_bytes(device)
        chosen, report.plan = distributed.share((chosen, summary), device)
        if state:
            state.save_plan(chosen, report.plan)
    else:
        report.plan = state.plan_summary()
    log.info("%s", report.plan)
    report.quantized.clear()
    report.skipped.clear()
    report.fallbacks.clear()
    return dataclasses.replace(config, plan=chosen)


def _restore_block(model, prefix: str, tasks: list[LayerTask], tensors: dict[str, torch.Tensor] | None) -> None:
    """Put a finished block, read back from the work state, in place: packed layers for its linears and
    its other tensors (norms). With `tensors` None (a lazily opened model) only the structure is rebuilt,
    on the meta device: the tensors stay on disk until the model is saved."""
    device = "meta" if tensors is None else None
    layers = {}
    for task in tasks:
        out_features, in_features = task.weight().shape
        bias = None if task.expert else getattr(task.module, "bias", None)
        layers[task.name] = QuantLinear(in_features, out_features, task.scheme, bias is not None,
                                        dtype=bias.dtype if bias is not None else torch.float16, device=device)
    _install(model, prefix, tasks, layers)
    if tensors is not None:
        model.get_submodule(prefix.rstrip(".")).load_state_dict(tensors, strict=False)


def _block_tensors(block) -> dict[str, torch.Tensor]:
    """Everything a finished block holds (packed layers and norms): enough to rebuild it from disk."""
    return dict(block.state_dict())


class OutOfMemory(MemoryError):
    """Tuning ran out of memory; the message names the knobs that lower it."""


def _out_of_memory(index: int, device, config: QuantConfig, state: WorkState | None) -> OutOfMemory:
    saved = f"; finished blocks (0 to {index - 1}) are saved in {state.folder}: the same command resumes from block {index}" if state and index else ""
    return OutOfMemory(f"out of memory ({device.type}) while quantizing block {index}: lower --batch-size (now {config.batch_size}; "
                       f"--grad-accum keeps the effective batch), --nsamples ({config.nsamples}) or --seqlen{saved}")


def quantize(model, config: QuantConfig | None = None, run: RunConfig | None = None, *, tokenizer=None, calibration=None,
             on_block_done=None, weights=None) -> QuantizeReport:
    """Quantize `model` in place: every linear layer of its decoder blocks becomes a packed QuantLinear.
    The in-memory step of `signround.run`, which also opens, checks, saves and exports.

    `calibration`: token ids (n, seqlen), a list of texts, a file/folder path, a hub dataset name or "self"
    (text the model samples); None uses the default hub dataset online, text the package ships offline.
    Needs `tokenizer` unless ids are given.
    `run.work_dir`: keep each finished block there, so that the same call after a crash continues after the
    last finished block (`run.resume`). `on_block_done(index, report)` is called after each block is finished (and saved).
    `weights`: the source of a model opened by `weights.open_lazy`, whose blocks are read one at a time;
    with a `work_dir` each finished block also leaves memory (save with `save(..., weights=finished_blocks(work_dir, model))`).
    """
    config = (config or QuantConfig()).resolved()
    if config.target_bits is not None and config.options is None:
        config = dataclasses.replace(config, options=search.default_options())
    run = run or RunConfig()
    work_dir = run.work_dir
    algorithm = get_algorithm(config.method)
    calibrates = needs_calibration(config)
    device = distributed.init(resolve_device(run.device))  # under torchrun: joins the process group (this rank's GPU)
    amp_dtype = resolve_amp(run.amp, device)
    blocks_name, blocks = find_blocks(model)
    report = QuantizeReport()
    plan = plan_layers(model, blocks_name, blocks, config, report)
    _check_lm_head(model, config)
    if config.target_bits is not None and config.plan is None:
        search.candidates(model, blocks_name, blocks, config)  # an unreachable budget fails before any data is read
    _load_block(blocks_name, blocks, 0, plan[0], weights)
    check_causal(model, blocks)
    if report.skipped:
        warnings.warn(f"{len(report.skipped)} layers stay unquantized: " + "; ".join(f"{n} ({why})" for n, why in report.skipped.items()))
    outside_linears = _weights_outside_linears(blocks_name, blocks)
    if outside_linears:
        warnings.warn(f"{len(outside_linears)} weight tensors in the blocks belong to no linear layer and stay 16-bit: "
                      + ", ".join(outside_linears[:4]) + (", ..." if len(outside_linears) > 4 else ""))
    if report.fallbacks:
        kinds = sorted(set(report.fallbacks.values()))
        names = list(report.fallbacks)
        warnings.warn(f"{len(names)} layers hold no whole number of 256-weight K-quant super-blocks per row and take "
                      f"llama.cpp's fallback ({', '.join(kinds)}), e.g. {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if calibrates:
        calibration_seqlen(model, config)  # a bad seqlen fails before any state is touched
        if weights is not None and isinstance(calibration, str) and calibration == "self":
            raise ConfigError("calibration='self' samples text from the whole model, but this one was opened block by block: "
                              "load it whole (signround.load_model, or run(..., stream=False))")

    state = None
    if work_dir is not None:
        source_digest = weights.digest() if weights is not None else None
        processes = f"/{distributed.world()} processes" if distributed.active() else ""  # each keeps its own share of the caches
        state = WorkState.open(work_dir, fingerprint(model, config, run, tokenizer, calibration, f"{device.type}/{amp_dtype}{processes}", source_digest),
                               run.resume)
    ids = None
    if config.target_bits is not None and config.plan is None:  # the plan decides every layer's scheme: before any block is restored
        ids = _calibration(model, config, tokenizer, calibration, report, state, device)
        config = _search_plan(model, blocks_name, blocks, config, state, ids, device, amp_dtype, run, weights, report)
        plan = plan_layers(model, blocks_name, blocks, config, report)
    if state:
        report.block_losses = [tuple(pair) for pair in state.block_losses]
        report.notes.extend(state.notes)
    streaming = weights is not None and state is not None  # finished blocks leave memory; they are on disk
    done = state.finished if state else 0
    for i in range(done):
        if streaming:
            blocks[i].to("meta")
        _restore_block(model, f"{blocks_name}.{i}.", plan[i], None if streaming else state.block_tensors(i))

    fp_in = q_in = calls = offload_dir = temporary = None
    if run.offload:  # in the work folder; without one, a temporary folder removed however the run ends
        if work_dir is None:
            temporary = tempfile.TemporaryDirectory(prefix="signround-caches-")
        offload_dir = Path(work_dir) / "caches" if work_dir is not None else Path(temporary.name)
        if distributed.active():  # each rank's own files
            offload_dir = offload_dir / f"rank{distributed.rank()}"
        offload_dir.mkdir(parents=True, exist_ok=True)
        for stale in offload_dir.glob(CACHE_FILES):  # left by an interrupted run; the work state keeps its own copies
            stale.unlink()
    caches = CacheFactory(CACHE_DTYPES[run.cache_dtype], device if device.type == "cuda" else torch.device("cpu"), offload_dir)
    shard = None
    if calibrates:
        ids = ids if ids is not None else _calibration(model, config, tokenizer, calibration, report, state, device)
        report.calibration_shape = tuple(ids.shape)
        shard = distributed.shard(ids.shape[0])  # all the rows in one process
        if done < len(blocks):
            move_except_blocks(model, blocks, device)
            if done:  # the hidden states are in the work state; one row gives every block's call
                calls = capture_block_inputs(model, blocks, ids[:1], device)[1]
                fp_in, q_in = state.inputs(caches)
            else:
                fp_in, calls = _capture(model, blocks, shard.local_ids(ids), device, caches)
                q_in = fp_in
    unloaded = unload_input_embeddings(model) if streaming else []  # inputs captured: not needed again until the end
    release_freed_memory()
    try:
        earlier_seconds = state.tuning_seconds if state else 0.0  # blocks finished by an interrupted run
        start = time.perf_counter()
        bar = tqdm(total=len(blocks), initial=done, desc=f"{config.method} {config.scheme.name()}", disable=not run.progress or not distributed.is_writer(),
                   unit="block")
        compiled = algorithm.needs_calibration and run.compiles(config, device, len(blocks))
        for i in range(done, len(blocks)):
            block_start = time.perf_counter()
            _load_block(blocks_name, blocks, i, plan[i], weights)
            try:
                fp_in, q_in, losses, notes, steps, routed = _quantize_one(model, blocks_name, blocks, i, plan[i], algorithm, config, fp_in, q_in, calls,
                                                                          device, amp_dtype, caches, compiled, shard)
            except (torch.OutOfMemoryError, MemoryError):
                raise _out_of_memory(i, device, config, state) from None
            report.block_losses.append(losses)
            report.notes.extend(notes)
            report.tuning_steps += steps
            report.expert_tokens.update(routed)
            if state:
                state.save_block(i, _block_tensors(blocks[i]), fp_in, q_in, losses, notes, time.perf_counter() - block_start)
            if streaming:
                blocks[i].to("meta")
                release_freed_memory()
            if losses[1] is not None:
                bar.set_postfix_str(f"loss {losses[0]:.3g} -> {losses[1]:.3g}")
                log.info("block %d: loss %.4g -> %.4g", i, *losses)
            bar.update()
            if on_block_done:
                on_block_done(i, report)
        bar.close()
        for cache in {id(c): c for c in (fp_in, q_in) if c is not None}.values():
            cache.discard()
        report.tuning_seconds = earlier_seconds + time.perf_counter() - start
    finally:
        reload(unloaded, weights)
        if temporary is not None:
            temporary.cleanup()
    if config.quantize_lm_head:
        _quantize_lm_head(model, config, report)
    model._apply(lambda t: t if t.is_meta else t.to("cpu"))

    report.peak_memory_bytes = peak_memory_bytes(device)
    _count_parameters(model, blocks_name, blocks, report)
    sizes = {}
    for name, scheme in report.quantized.items():
        module = model.get_submodule(name)
        sizes[name] = (module.in_features * module.out_features, report.stored_bits(name, scheme, module.in_features))
    total = sum(n for n, _ in sizes.values())
    report.bits_per_weight = sum(n * b for n, b in sizes.values()) / total
    computed = {"device": str(device), "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
                "compiled": compiled, "cache_dtype": run.cache_dtype}
    model.config.quantization_config = quantization_config_dict(config, report, computed)
    return report


def _weights_outside_linears(blocks_name: str, blocks) -> list[str]:
    """Weight tensors (two or more dimensions) of the blocks that neither a linear layer nor a known
    experts module holds, e.g. a 3-D tensor of an experts class transformers does not mark as one.
    Stacked biases (gpt-oss's experts) are biases, not weights."""
    names = []
    for i, block in enumerate(blocks):
        seen = {id(m.weight) for m in find_linears(block).values()}  # gpt2's Conv1D holds its weight transposed
        seen |= {id(getattr(m, p)) for m in experts.find_expert_modules(block).values() for p in experts.stacked_params(m)}
        seen |= {id(m.weight) for m in experts.routers_outside_linears(block).values()}
        names += [f"{blocks_name}.{i}.{n}" for n, p in block.named_parameters() if _is_weight(n, p) and id(p) not in seen]
    return names


def _is_weight(name: str, param: torch.Tensor) -> bool:
    return param.dim() >= 2 and not name.endswith("bias")


def _count_parameters(model, blocks_name: str, blocks, report: QuantizeReport) -> None:
    """Where the model's parameters ended up, so that nothing stays 16-bit silently: every weight tensor
    (two or more dimensions) inside the blocks that is not packed is listed in `report.kept_16bit`."""
    counts = {"quantized": 0, "kept 16-bit": 0, "block norms and biases": 0, "outside the blocks": 0}
    counts["quantized"] = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))  # a packed lm_head too
    inside = set()
    for i, block in enumerate(blocks):
        for name, param in block.named_parameters():
            inside.add(id(param))
            if _is_weight(name, param):
                report.kept_16bit[f"{blocks_name}.{i}.{name}"] = param.numel()
                counts["kept 16-bit"] += param.numel()
            else:
                counts["block norms and biases"] += param.numel()
    # model.parameters() yields a tied lm_head once, as the embedding
    counts["outside the blocks"] = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    report.parameters = counts


def _capture(model, blocks, ids, device, caches: CacheFactory):
    """(cache of the hidden states entering block 0, calls of every block)."""
    cache, filled = None, 0

    def sink(hidden):
        nonlocal cache, filled
        if cache is None:
            cache = caches.empty((ids.shape[0], *hidden.shape[1:]))
        cache.write(filled, hidden)
        filled += hidden.shape[0]

    calls = capture_block_inputs(model, blocks, ids, device, sink=sink)[1]
    return cache, calls


def _loss(output, target, batch_size: int, rows: int | None, tame_outliers: bool, shard: Shard, device) -> float:
    """The block loss (`block_loss`, as tuned) of an output cache against a target cache over the first `rows`
    calibration rows (all when None), batch by batch; summed over the processes, each holding some of them."""
    rows = shard.total if rows is None else min(rows, shard.total)
    summed = sum(block_loss(output.rows(chunk), target.rows(chunk), tame_outliers).item() * len(chunk)
                 for chunk in shard.held(torch.arange(rows)).split(batch_size))
    return distributed.sum_float(summed, device) / rows


SMOOTH_ROWS = 32  # calibration rows whose activation maxima set the smoothing scales


def _smooth(block, tasks: list[LayerTask], data: BlockData | None, config: QuantConfig, stored_dtype: torch.dtype) -> list[str]:
    """SmoothQuant on the block's layers with quantized inputs (config.smooth is its alpha), after the original
    block's outputs were taken (the smoothed block computes the same) and before tuning (smoothing.py)."""
    linears = {t.name: t.module for t in tasks if t.scheme.act and t.expert is None}
    if config.smooth is None or data is None or not linears:
        return []
    shard = data.rows()
    run = smoothing.block_runner(block, data.inputs, data.call, shard.held(torch.arange(min(SMOOTH_ROWS, shard.total))),
                                 config.resolved().batch_size, data.device)
    return smoothing.smooth_block(block, linears, run, config.smooth, stored_dtype)


def _calibrate_input_scales(block, tasks: list[LayerTask], data: BlockData | None, config: QuantConfig) -> None:
    """Each layer whose input format has a calibrated scale (NVFP4) gets it from the largest input it sees over
    every calibration row (of every process), the block as it is before quantization (smoothed, if it was), as
    llm-compressor calibrates it; vLLM reads it as the layer's `input_global_scale`."""
    layers = {t.name: t for t in tasks if t.scheme.act and ACTIVATIONS[t.scheme.act].calibrated}
    if not layers:
        return
    shard = data.rows()
    run = smoothing.block_runner(block, data.inputs, data.call, shard.held(torch.arange(shard.total)), config.resolved().batch_size, data.device)
    _, amax = smoothing.feeding_norms(block, {name: t.module for name, t in layers.items()}, run, data.device)
    for name, task in layers.items():
        task.input_scale = activation_global_scale(amax[name].amax().cpu())


def _quantize_one(model, blocks_name, blocks, i, tasks, algorithm, config, fp_in, q_in, calls, device, amp_dtype, caches: CacheFactory,
                  compiled: bool = False, shard: Shard | None = None):
    """Tune and pack block i; returns the next block's (original, quantized) inputs, (loss before, after), notes, steps
    and the calibration tokens routed to each expert of its experts modules."""
    original_dtype = next(blocks[i].parameters()).dtype
    blocks[i].to(device=device, dtype=torch.float32)  # tuning masters stay fp32; autocast does the fast math
    fp_out = data = None
    tokens: dict = {}
    calibrates = needs_calibration(config)
    if calibrates:
        call = calls[i].to(device)
        with experts.routed_tokens(blocks[i]) as tokens:
            fp_out = run_block(blocks[i], fp_in, call, config.batch_size, device, amp_dtype, caches.empty(fp_in.shape))
        if config.quantized_inputs and fp_in is not q_in:  # the original stream's inputs are done with: one cache less
            fp_in.discard()
        data = BlockData(q_in if config.quantized_inputs else fp_in, fp_out, call, device, amp_dtype, i, len(blocks), compiled, shard)
        distributed.sum_(tokens.values())  # every process routed its own rows
    smoothed = _smooth(blocks[i], tasks, data, config, original_dtype)
    _calibrate_input_scales(blocks[i], tasks, data, config)
    # a block whose every layer is kept 16-bit by overrides has nothing to tune: it is only run
    result = algorithm.quantize_block(blocks[i], tasks, data, config) if tasks else BlockResult({})
    if smoothed:
        log.info("block %d: smoothed %s", i, "; ".join(smoothed))
    routed = {f"{blocks_name}.{i}.{name}": counts.tolist() for name, counts in tokens.items()}
    tuned = {t.expert.module for t in tasks if t.expert} if result.steps else set()
    idle = [f"{blocks_name}.{i}.{name}.{e}" for name, counts in tokens.items() if name in tuned for e, c in enumerate(counts.tolist()) if c == 0]
    if idle:  # routed by the original model; tuning routes the quantized stream, which may differ a little
        result.notes.append(f"block {i}: {len(idle)} experts received no calibration tokens, so tuning left them at its starting point "
                            f"(round-to-nearest{' at the searched clipping' if config.clip_search else ''}): "
                            f"{', '.join(idle[:8])}{', ...' if len(idle) > 8 else ''}")
        warnings.warn(result.notes[-1])
    packed = {t.name: QuantLinear.from_quantized(result.weights[t.name], t.scheme, None if t.expert else getattr(t.module, "bias", None),
                                                 t.input_scale) for t in tasks}
    _install(model, f"{blocks_name}.{i}.", tasks, packed)
    for task in tasks:
        task.module.to("meta")  # the replaced float layer: the plan still refers to it, its memory can go
    loss_after = None
    if calibrates:
        q_out = run_block(blocks[i], q_in, data.call, config.batch_size, device, amp_dtype, caches.empty(q_in.shape))
        # on the rows loss_before was measured on
        loss_after = _loss(q_out, fp_out, config.batch_size, result.loss_rows, config.tame_outliers, data.rows(), device)
        for old in {id(fp_in): fp_in, id(q_in): q_in}.values():
            old.discard()
        fp_in, q_in = fp_out, q_out
    _restore_dtype(blocks[i], original_dtype)
    blocks[i].to("cpu")
    before = result.loss_before if result.loss_before is not None else loss_after
    return fp_in, q_in, (before, loss_after), result.notes, result.steps, routed
