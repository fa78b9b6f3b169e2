"""Mixed precision under a bit budget, the pure part: which layers must share a scheme, what each choice
costs on disk, and the choice of one option per group that minimises the predicted loss within the
budget (a multiple-choice knapsack, solved by dynamic programming). No models here: `search.py`
measures the losses and applies the result.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

# Layers a runtime executes as one matrix (vLLM's QKVParallelLinear and MergedColumnParallelLinear,
# llama.cpp's fused tensors of some architectures) and so must share a scheme: q/k/v of one attention,
# gate/up of one MLP, every expert of one experts module.
_FUSED = (
    (re.compile(r"^(.*\.experts)\.\d+\.[^.]+$"), "experts"),
    (re.compile(r"^(.*)\.(q_proj|k_proj|v_proj)$"), "qkv"),
    (re.compile(r"^(.*)\.(gate_proj|up_proj|w1|w3)$"), "gate_up"),
)
FUSED_KINDS = tuple(tag for _, tag in _FUSED)
KEEP = "fp16"  # the option that keeps a layer 16-bit


class BudgetError(ValueError):
    """No choice of the options fits the budget."""


def fuse_kinds(fuse: bool | tuple[str, ...]) -> tuple[str, ...]:
    """The kinds of fused matrices kept together: all (True), none (False) or those named."""
    return FUSED_KINDS if fuse is True else () if fuse is False else tuple(fuse)


def fused_key(name: str, fuse: bool | tuple[str, ...] = True) -> str:
    """The group a layer shares its scheme with: the name of the fused matrix it is part of (of the kinds
    `fuse` keeps together), or itself."""
    kinds = fuse_kinds(fuse)
    for pattern, tag in _FUSED:
        m = pattern.match(name)
        if m:
            return f"{m.group(1)}.{{{tag}}}" if tag in kinds else name
    return name


def group_layers(names, fuse: bool | tuple[str, ...] = True) -> dict[str, list[str]]:
    """Layers by the group that gets one scheme (`fuse`: which fused kinds stay together), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(fused_key(name, fuse), []).append(name)
    return groups


def solve(costs: list[list[float]], losses: list[list[float]], budget: float, resolution: int = 200_000) -> list[int]:
    """For each group g one option j, so that sum costs[g][j] <= budget and sum losses[g][j] is least.

    Dynamic programming over the budget cut into `resolution` steps, each cost rounded up to whole steps:
    the result never exceeds the budget, and it is the exact optimum whenever the costs are whole multiples
    of budget / resolution (the tests' integer cases); otherwise rounding up can leave at most one step per
    group unused (with 120 groups, 0.06% of the budget at the default resolution; at 20000 steps SmolLM2's
    plans left 0.3% unspent). Infinite costs mark options a group cannot take."""
    if len(costs) != len(losses) or any(len(c) != len(v) for c, v in zip(costs, losses)):
        raise ValueError("costs and losses must have one entry per group and option")
    least = sum(min(c) for c in costs)
    if least > budget:
        raise BudgetError(f"the cheapest choice needs {least:.6g}, more than the budget {budget:.6g}")
    unit = budget / resolution if budget > 0 else 1.0
    steps = resolution if budget > 0 else 0
    # best[r]: least loss of the groups so far with at most r steps spent
    best = torch.zeros(steps + 1, dtype=torch.float64)
    choices = []
    for cost, loss in zip(costs, losses):
        candidates = torch.full((len(cost), steps + 1), math.inf, dtype=torch.float64)
        for j, (c, value) in enumerate(zip(cost, loss)):
            if math.isinf(c):
                continue
            k = math.ceil(c / unit - 1e-9)
            if k <= steps:
                candidates[j, k:] = best[: steps + 1 - k] + value
        best, chosen = candidates.min(dim=0)
        choices.append(chosen.to(torch.int8))  # an option index per step (options are few): 200 kB a group
    if math.isinf(best[steps]):  # the cheapest choice fit, but not once its costs were rounded up
        raise BudgetError(f"the budget {budget:.6g} is too tight to split over {len(costs)} groups at resolution {resolution}")
    picked, r = [], steps
    for cost, chosen in zip(reversed(costs), reversed(choices)):
        j = int(chosen[r])
        picked.append(j)
        r -= math.ceil(cost[j] / unit - 1e-9)
    return picked[::-1]


@dataclass(frozen=True)
class Layer:
    """One weight matrix the search chooses for: its size, and per option its stored bits (inf where
    the option cannot take it) and its predicted loss increase."""

    name: str
    numel: int
    bits: tuple[float, ...]
    loss: tuple[float, ...]


def choose(layers: list[Layer], options: list[str], target_bits: float, fixed_bits: float = 0.0, fixed_numel: int = 0,
           fuse: bool | tuple[str, ...] = True) -> dict[str, str]:
    """The option (by name) of every layer so that the average stored bits per weight over the layers and
    the `fixed` ones (layers outside the search: their total bits and weights) is at most `target_bits`."""
    groups = group_layers([layer.name for layer in layers], fuse)
    by_name = {layer.name: layer for layer in layers}
    costs, losses = [], []
    for members in groups.values():
        costs.append([sum(by_name[n].numel * by_name[n].bits[j] for n in members) for j in range(len(options))])
        losses.append([sum(by_name[n].loss[j] for n in members) for j in range(len(options))])
    total = sum(layer.numel for layer in layers) + fixed_numel
    try:
        picked = solve(costs, losses, target_bits * total - fixed_bits)
    except BudgetError:
        least = (sum(min(c) for c in costs) + fixed_bits) / total
        raise BudgetError(f"target_bits={target_bits:g} is below what the options can reach here ({least:.3f} bits per weight "
                          f"with every layer at its smallest option): raise it, or add a smaller option") from None
    return {name: options[j] for members, j in zip(groups.values(), picked) for name in members}


def average_bits(choice: dict[str, str], layers: list[Layer], options: list[str], fixed_bits: float = 0.0, fixed_numel: int = 0) -> float:
    by_name = {layer.name: layer for layer in layers}
    spent = sum(by_name[n].numel * by_name[n].bits[options.index(o)] for n, o in choice.items()) + fixed_bits
    return spent / (sum(layer.numel for layer in layers) + fixed_numel)


def table(choice: dict[str, str], layers: list[Layer], options: list[str]) -> str:
    """A compact view of a plan: per scheme, how many layers, their share of the weights and their stored bits per weight."""
    by_name = {layer.name: layer for layer in layers}
    counts, weights, bits = Counter(), Counter(), Counter()
    for name, option in choice.items():
        layer = by_name[name]
        counts[option] += 1
        weights[option] += layer.numel
        bits[option] += layer.numel * layer.bits[options.index(option)]
    total = sum(weights.values())
    return "\n".join(f"  {option:<10} {counts[option]:>5} layers  {weights[option] / total:6.1%} of the weights  "
                     f"{bits[option] / weights[option]:.3f} bits/weight" for option in sorted(counts, key=lambda o: bits[o] / weights[o]))
