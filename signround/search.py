"""The bit-budget search (`QuantConfig.target_bits`): which option scheme each weight matrix gets.

Sensitivity is second order, from one pass over a few calibration rows: the diagonal Fisher F of the final
language-model loss (per token for a linear layer, per row for stacked experts) predicts the loss increase
of replacing a matrix W by its quantized Q(W) as 1/2 sum F (Q(W) - W)^2 (each row's attention sinks left out,
`token_fisher`), for every option at once
(HAWQ/SqueezeLLM-style, rather than one fake-quantized backward pass per option as auto-round's AutoScheme).
Because quantization errors compound far beyond that quadratic estimate at low bits, the same forward pass
also measures the loss with every layer at each option and scales that option's estimates to it. The pass
streams: the blocks run forward one at a time caching their inputs, then backward from the head one at a
time, each recomputing its forward; a lazily opened model is read block by block as in tuning. Then
`budget.choose` solves the knapsack over the fused groups.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import budget, experts
from .blocks import (
    UnsupportedModelError,
    autocast,
    block_output,
    capture_block_inputs,
    linear_weight,
    move_except_blocks,
    run_block,
    stores_transposed,
)
from .cache import CacheFactory
from .config import ConfigError, QuantConfig, WeightScheme, parse_scheme
from .hardware import release_freed_memory
from .weights import is_lazy, materialize

SEARCH_ROWS = 16  # calibration rows of the search (SmolLM2, 4 options: ~110 s on 2 CPU cores, an eighth of the fast recipe)
LOGIT_ROWS = 128  # head positions per chunk: the logits (and their gradient) of a 49k-262k vocabulary stay small
# 5 and 6 bits let a sensitive layer take one or two bits more instead of four (SmolLM2, RTN, 4.25 bits with W2/3/4/8 only:
# 24.61 against W4A16's 24.33 at 4.17)
DEFAULT_OPTIONS = ("W2A16G64", "W3A16", "W4A16", "W5A16", "W6A16", "W8A16")
GGUF_OPTIONS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def default_options(formats=()) -> tuple[str, ...]:
    """The integer presets, or llama.cpp's K types when the output includes GGUF (`export.held_options` then drops
    those an output format cannot store)."""
    return GGUF_OPTIONS if "gguf" in formats else DEFAULT_OPTIONS


@dataclass
class SearchResult:
    plan: dict[str, WeightScheme | None]  # every searched layer's scheme (None: 16-bit)
    target_bits: float
    bits_per_weight: float   # as chosen, over the searched and fixed layers, as stored
    predicted_loss: float    # the plan's summed Fisher estimate of the loss increase
    seconds: float
    table: str

    def summary(self) -> str:
        return (f"bit-budget plan: {self.bits_per_weight:.3f} bits per weight (target {self.target_bits:g}), "
                f"predicted loss increase {self.predicted_loss:.4g}, searched in {self.seconds:.1f} s\n{self.table}")


def read_plan(path) -> dict:
    """The plan (layer -> scheme fields, None: 16-bit) of an earlier run: its output folder or config.json
    (`quantization_config.plan`), or a work folder's plan.json."""
    import json
    from pathlib import Path

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read a plan from {path}: {e}; give a --target-bits run's output folder, its config.json or a plan.json") from None
    plan = data.get("quantization_config", {}).get("plan") if "quantization_config" in data else data.get("layers")
    if not isinstance(plan, dict) or not plan:
        raise ConfigError(f"{file} holds no bit-budget plan: give the output of a --target-bits run (its folder or config.json)")
    return plan


def option_schemes(config: QuantConfig) -> list[WeightScheme | None]:
    return [parse_scheme(o) for o in config.options or DEFAULT_OPTIONS]


def layer_bits(scheme: WeightScheme | None, in_features: int, pad_groups: bool) -> tuple[WeightScheme | None, float]:
    """(the scheme a layer of this width is stored in, its bits per weight): llama.cpp's fallback for a K type
    on rows of no whole super-block (at its legacy block's size), 16 for a kept layer, inf where the scheme
    cannot take the layer."""
    if scheme is None:
        return None, 16.0
    if not scheme.fits(in_features) and scheme.fallback() is not None:
        legacy = scheme.fallback()
        return legacy, legacy.legacy_bits_per_weight() if legacy.fits(in_features, pad_groups) else math.inf
    if not scheme.fits(in_features, pad_groups):
        return scheme, math.inf
    return scheme, scheme.bits_per_weight(in_features)


@dataclass
class Candidates:
    """What the search chooses for, known before any data is read: the planned tasks per block, the searched
    layers (name -> (block, index in its tasks)), the usable options, and the bits and weights of the layers
    it does not choose for (user overrides, 16-bit routers), which count against the budget."""

    tasks: list
    searched: dict[str, tuple[int, int]]
    options: list[WeightScheme | None]
    fixed_bits: float
    fixed_numel: int


def candidates(model, blocks_name: str, blocks, config: QuantConfig) -> Candidates:
    """The layers and options of a search; a budget the options cannot reach fails here, before any data is read."""
    from .pipeline import QuantizeReport, plan_layers

    report = QuantizeReport()
    tasks = plan_layers(model, blocks_name, blocks, _searchable(config), report)
    found = Candidates(tasks, {}, option_schemes(config), 0.0, 0)
    for i, block_tasks in enumerate(tasks):
        for k, task in enumerate(block_tasks):
            name = f"{blocks_name}.{i}.{task.name}"
            if config.overridden(name):  # fixed by the user: counted at its scheme
                out, inp = task.weight().shape
                found.fixed_bits += out * inp * report.stored_bits(name, task.scheme, inp)
                found.fixed_numel += out * inp
            else:
                found.searched[name] = (i, k)
    for name in report.skipped:  # kept 16-bit (routers, overrides): on disk at 16 bits
        numel = _numel(model, name)
        found.fixed_bits += 16 * numel
        found.fixed_numel += numel
    if not found.searched:
        raise ConfigError("target_bits has no layer to choose for: every layer is fixed by a --layer override")
    _check_reachable(found, config)
    return found


def search(model, blocks_name: str, blocks, config: QuantConfig, ids: torch.Tensor, device, amp_dtype, caches: CacheFactory,
           weights=None) -> SearchResult:
    """Measure every searchable layer's sensitivity to every option and choose the plan (see the module doc)."""
    start = time.perf_counter()
    found = candidates(model, blocks_name, blocks, config)
    tasks, options = found.tasks, found.options
    move_except_blocks(model, blocks, device)
    losses = _compounding(*_fisher_losses(model, blocks_name, blocks, tasks, found.searched, options, config, ids[:SEARCH_ROWS], device, amp_dtype,
                                          caches, weights))
    layers = []
    for name, (i, k) in found.searched.items():
        out, inp = tasks[i][k].weight().shape
        layers.append(budget.Layer(name, out * inp, tuple(layer_bits(o, inp, config.pad_groups)[1] for o in options), losses[name]))
    names = [budget.KEEP if o is None else o.name() for o in options]
    choice = budget.choose(layers, names, config.target_bits, found.fixed_bits, found.fixed_numel, config.fuse_groups)
    by_name = dict(zip(names, options))
    predicted = sum(layer.loss[names.index(choice[layer.name])] for layer in layers)
    return SearchResult({name: by_name[o] for name, o in choice.items()}, config.target_bits,
                        budget.average_bits(choice, layers, names, found.fixed_bits, found.fixed_numel), predicted,
                        time.perf_counter() - start, budget.table(choice, layers, names))


def _searchable(config: QuantConfig) -> QuantConfig:
    """The config under which every layer the search may choose for is planned: options are checked per layer,
    so the default scheme's fit must not drop a layer the options could take."""
    return dataclasses.replace(config, scheme=WeightScheme(8, -1), mixture=None, target_bits=None, plan=None, smooth=None)


def _numel(model, name: str) -> int:
    """Weights of a layer kept 16-bit, by its full name (a linear layer, or one expert's projection)."""
    try:
        return linear_weight(model.get_submodule(name)).numel()
    except AttributeError:  # one expert's projection: `...experts.3.gate_proj`
        parent = name.rsplit(".", 2)[0]
        module = model.get_submodule(parent)
        return next(experts.read(module, e).numel() for e in experts.expert_matrices_of(module) if f"{parent}.{e.suffix}" == name)


def _check_reachable(found: Candidates, config: QuantConfig) -> None:
    """Refuse a budget below every layer at its smallest option before the Fisher pass is spent on it."""
    least, total = found.fixed_bits, found.fixed_numel
    for i, k in found.searched.values():
        task = found.tasks[i][k]
        out, inp = task.weight().shape
        cheapest = min(layer_bits(o, inp, config.pad_groups)[1] for o in found.options)
        if math.isinf(cheapest):
            raise ConfigError(f"no option in {', '.join(config.options or DEFAULT_OPTIONS)} can store {task.name} (in_features={inp}): "
                              f"add one that can, e.g. W4A16G32")
        least += out * inp * cheapest
        total += out * inp
    if config.target_bits * total < least:
        raise ConfigError(f"target_bits={config.target_bits:g} is below what the options can reach ({least / total:.3f} bits per weight with every "
                          f"layer at its smallest option): raise it, or add a smaller option")


def _final_stage(model, blocks):
    """hidden states after the last block -> logits: the decoder's final norm, the head and Gemma's softcap."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder and head to search a bit budget through: use --plan or uniform schemes")
    norms = [m for n, m in body.named_children() if m is not blocks and not isinstance(m, torch.nn.Embedding)
             and any(True for _ in m.parameters()) and ("norm" in type(m).__name__.lower() or n in ("ln_f",))]
    if len(norms) > 1:
        raise UnsupportedModelError(f"{type(model).__name__} has more than one final norm: the bit-budget search cannot tell its last stage")
    norm = norms[0] if norms else torch.nn.Identity()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def stage(hidden):
        logits = head(norm(hidden))
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    return stage


def _head_gradients(stage, last: torch.Tensor, ids: torch.Tensor, device, amp_dtype) -> torch.Tensor:
    """d(mean next-token loss of each row) / d(hidden states leaving the last block), row by row."""
    grads = torch.empty(last.shape, dtype=torch.float32)
    count = ids.shape[1] - 1
    for r in range(last.shape[0]):
        hidden = last[r : r + 1].to(device).requires_grad_(True)
        for s in range(0, count, LOGIT_ROWS):
            with autocast(device, amp_dtype):
                logits = stage(hidden[:, s : s + LOGIT_ROWS][:, : count - s])
            loss = F.cross_entropy(logits[0].float(), ids[r, 1 + s : 1 + s + logits.shape[1]].to(device), reduction="sum") / count
            loss.backward()
        grads[r] = hidden.grad[0].cpu()
    return grads


def _fisher_losses(model, blocks_name, blocks, tasks, searched, options, config, ids, device, amp_dtype, caches, weights):
    """(per searched layer, per option its predicted loss increase 1/2 sum F (Q(W) - W)^2, F the diagonal Fisher
    of the final loss (`_block_fisher`); per option the loss increase measured with every searched layer at it)."""
    head_params = [p for p in model.parameters() if p.requires_grad]
    for p in head_params:
        p.requires_grad_(False)  # only the searched weights and the hidden states take gradients
    by_block = [{name: tasks[i][k] for name, (b, k) in searched.items() if b == i} for i in range(len(blocks))]
    try:
        inputs, calls, uniform = _forward(model, blocks_name, blocks, by_block, options, config, ids, device, amp_dtype, caches, weights)
        stage = _final_stage(model, blocks)
        last = inputs.pop(len(blocks)).rows(slice(None))
        actual = [_mean_loss(stage, s.rows(slice(None)), ids, device, amp_dtype) - _mean_loss(stage, last, ids, device, amp_dtype)
                  if s is not None else 0.0 for s in uniform]
        grads = _head_gradients(stage, last, ids, device, amp_dtype)
        losses: dict[str, tuple[float, ...]] = {}
        for start in sorted(inputs, reverse=True):  # segment by segment from the last, its inputs recomputed from its checkpoint
            end = min(start + _segment(len(blocks)), len(blocks))
            for i in range(start, end - 1):
                with _block_on(blocks, blocks_name, i, device, weights) as block:
                    inputs[i + 1] = run_block(block, inputs[i], calls[i].to(device), 1, device, amp_dtype, caches.empty(inputs[i].shape))
            for i in reversed(range(start, end)):
                with _block_on(blocks, blocks_name, i, device, weights) as block:
                    fisher, grads = _block_fisher(block, list(by_block[i].values()), inputs[i], grads, calls[i].to(device), device, amp_dtype)
                    for name, task in by_block[i].items():
                        losses[name] = _option_losses(task, fisher[task.name], options, config.pad_groups)
                inputs.pop(i).discard()
        return losses, actual
    finally:
        for p in head_params:
            p.requires_grad_(True)


def _compounding(losses: dict[str, tuple[float, ...]], actual: list[float]) -> dict[str, tuple[float, ...]]:
    """Scale each option's predictions so that, summed over the layers, they give the loss increase measured
    with every layer at that option. The quadratic estimate holds for small errors; at 2 bits the errors of
    successive layers compound far beyond it (SmolLM2: a W3/W2 mix at W3's size scored worse than W3 alone)."""
    predicted = [sum(values[j] for values in losses.values()) for j in range(len(actual))]
    factors = [a / p if p > 0 and a > 0 else 1.0 for a, p in zip(actual, predicted)]
    return {name: tuple(v * f for v, f in zip(values, factors)) for name, values in losses.items()}


def _segment(blocks: int) -> int:
    """Blocks per checkpointed segment: about sqrt(blocks) checkpoints and as many recomputed inputs are held
    at once, instead of every block's inputs (a 30-block model: 12 caches of 16 rows, not 31)."""
    return max(1, math.isqrt(blocks - 1) + 1) if blocks > 1 else 1


def _forward(model, blocks_name, blocks, by_block, options, config, ids, device, amp_dtype, caches, weights):
    """(caches of the hidden states entering every segment's first block (`_segment`) and leaving the last block,
    by block index; each block's call; the hidden states after the last block with every searched layer at each
    option, None for a 16-bit option)."""
    hidden, calls = capture_block_inputs(model, blocks, ids, device)
    step = _segment(len(blocks))
    inputs = {0: caches.from_tensor(hidden)}
    current = inputs[0]
    uniform = [None if o is None else caches.from_tensor(hidden.clone()) for o in options]
    for i in range(len(blocks)):
        call = calls[i].to(device)
        with _block_on(blocks, blocks_name, i, device, weights) as block:
            previous, current = current, run_block(block, current, call, 1, device, amp_dtype, caches.empty(current.shape))
            if i not in inputs:  # an input inside a segment: recomputed when its segment's turn comes
                previous.discard()
            if (i + 1) % step == 0 or i + 1 == len(blocks):
                inputs[i + 1] = current
            for j, option in enumerate(options):
                if uniform[j] is not None:
                    with _quantized(by_block[i].values(), option, config.pad_groups):
                        done = run_block(block, uniform[j], call, 1, device, amp_dtype, caches.empty(current.shape))
                    uniform[j].discard()
                    uniform[j] = done
    return inputs, calls, uniform


class _quantized:
    """The tasks' weights replaced by their round-to-nearest at `option` for the duration."""

    def __init__(self, tasks, option, pad_groups):
        self.tasks, self.option, self.pad_groups, self.saved = list(tasks), option, pad_groups, []

    def __enter__(self):
        for task in self.tasks:
            w = task.weight()
            scheme, bits = layer_bits(self.option, w.shape[1], self.pad_groups)
            if not math.isinf(bits):
                self.saved.append((w, w.detach().clone()))
                with torch.no_grad():
                    w.copy_(scheme.dequantize(scheme.quantize(w.detach().float())))

    def __exit__(self, *exc):
        with torch.no_grad():
            for w, original in self.saved:
                w.copy_(original)


@torch.no_grad()
def _mean_loss(stage, hidden: torch.Tensor, ids: torch.Tensor, device, amp_dtype) -> float:
    """Mean next-token loss over the rows from the hidden states leaving the last block."""
    count = ids.shape[1] - 1
    total = 0.0
    for r in range(hidden.shape[0]):
        for s in range(0, count, LOGIT_ROWS):
            with autocast(device, amp_dtype):
                logits = stage(hidden[r : r + 1, s : min(s + LOGIT_ROWS, count)].to(device))
            total += float(F.cross_entropy(logits[0].float(), ids[r, 1 + s : 1 + s + logits.shape[1]].to(device), reduction="sum"))
    return total / (count * hidden.shape[0])


class _block_on:
    """Block i on the compute device in fp32 for the duration (read from the checkpoint when lazy, and let go again)."""

    def __init__(self, blocks, blocks_name, i, device, weights):
        self.blocks, self.i, self.device, self.weights = blocks, i, device, weights
        self.lazy = weights is not None and is_lazy(blocks[i])
        if self.lazy:
            materialize(blocks[i], f"{blocks_name}.{i}.", weights)
        self.dtype = next(blocks[i].parameters()).dtype

    def __enter__(self):
        return self.blocks[self.i].to(device=self.device, dtype=torch.float32)

    def __exit__(self, *exc):
        block = self.blocks[self.i]
        block.to("meta" if self.lazy else "cpu")
        if not self.lazy:
            block.to(self.dtype)
        release_freed_memory()  # each block's activations and gradients: handed back, or resident size creeps block by block


def _weight_param(task) -> torch.nn.Parameter:
    return getattr(task.module, task.expert.param) if task.expert else task.module.weight


SINK_POSITIONS = 4  # positions at each row's start that the per-token Fisher leaves out (`token_fisher`)
ROWS_PER_PASS = 4  # rows per recomputed forward and backward where no experts need per-row gradients


def _block_fisher(block, tasks, inputs, grads_out, call, device, amp_dtype):
    """(the diagonal Fisher of each task's weight, as an (out, in) matrix, summed over the rows; gradients of the
    loss w.r.t. the block's inputs), from a recomputed forward and backward of the block.

    A linear layer's is per token, sum_t (d_t x_t)^2 = (d^2)^T (x^2), from its input x and output gradient d
    (hooks; no weight gradient is formed), each row's attention sinks left out (`token_fisher`). A stacked
    experts tensor, whose tokens are routed inside one opaque forward, has the squared gradient of each row
    (one pass per row): where the tokens' gradients are independent its expectation is the same sum over tokens."""
    linears = [t for t in tasks if t.expert is None]
    params = list({id(p): p for p in (_weight_param(t) for t in tasks if t.expert)}.values())
    wanted = {id(p) for p in params}
    for p in block.parameters():
        p.requires_grad_(id(p) in wanted)
    fisher = {t.name: torch.zeros(t.weight().shape, dtype=torch.float32, device=device) for t in linears}
    squares = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    positions, chunk_tokens = inputs.shape[1], [0]

    def recorder(name):
        def hook(module, args, output):
            x = args[0].detach()
            whole_rows = x.shape[:-1].numel() == chunk_tokens[0]  # not a subset routed to an expert
            def accumulate(grad):  # returns None: the gradient flows on unchanged
                fisher[name].add_(token_fisher(grad, x, positions if whole_rows else None))

            output.register_hook(accumulate)
        return hook

    handles = [t.module.register_forward_hook(recorder(t.name)) for t in linears]
    grads_in = torch.empty(inputs.shape, dtype=torch.float32)
    step = 1 if params else ROWS_PER_PASS
    try:
        for start in range(0, inputs.shape[0], step):
            rows = slice(start, min(start + step, inputs.shape[0]))
            chunk_tokens[0] = (rows.stop - rows.start) * positions
            x = inputs.rows(rows).to(device).requires_grad_(True)
            with autocast(device, amp_dtype):
                out = block_output(block(x, *call.args, **call.kwargs))
            found = torch.autograd.grad(out, [x, *params], grad_outputs=grads_out[rows].to(device, out.dtype), allow_unused=True)
            grads_in[rows] = found[0].float().cpu()
            for p, g in zip(params, found[1:]):
                if g is not None:
                    squares[id(p)] += g.float().square()
    finally:
        for handle in handles:
            handle.remove()
        for p in block.parameters():
            p.requires_grad_(False)
    fisher.update({t.name: _as_matrix(t, squares[id(_weight_param(t))]) for t in tasks if t.expert})
    return fisher, grads_in


def token_fisher(grad: torch.Tensor, x: torch.Tensor, positions: int | None) -> torch.Tensor:
    """sum_t (d_t x_t)^2 = (d^2)^T (x^2), (out, in), over a linear layer's tokens, rows of `positions` tokens
    (flattened or not: OPT's MLP sees them flattened; None: tokens routed to an expert, all counted), leaving out
    each row's first `SINK_POSITIONS` positions. Those carry little context and become attention sinks: every
    later token's loss reaches them, so their squared output gradient is the square of a sum of hundreds of
    losses' gradients, not a sum of squares. Counted, they put a few layers (SmolLM2: blocks 0-1, the down_proj
    writing the sink's massive activation) 10-300x above the loss increase measured with that layer alone quantized."""
    if positions is not None and positions > SINK_POSITIONS:
        grad, x = (t.reshape(-1, positions, t.shape[-1])[:, SINK_POSITIONS:] for t in (grad, x))
    return grad.float().square().flatten(0, -2).T @ x.float().square().flatten(0, -2)


def _as_matrix(task, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, shaped like the task's parameter, as the (out, in) matrix `task.weight()` reads."""
    if task.expert:
        return experts.read(task.module, task.expert, tensor)
    return tensor.t() if stores_transposed(task.module) else tensor


def _option_losses(task, fisher: torch.Tensor, options, pad_groups: bool) -> tuple[float, ...]:
    w = task.weight().detach().float()
    losses = []
    for option in options:
        scheme, bits = layer_bits(option, w.shape[1], pad_groups)
        if scheme is None or math.isinf(bits):
            losses.append(0.0)
            continue
        error = scheme.dequantize(scheme.quantize(w)) - w
        losses.append(0.5 * float((fisher * error.square()).sum()))
    return tuple(losses)
