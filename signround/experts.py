"""Mixture-of-experts storage layouts: the one place that knows how a block stacks its experts' weights.

transformers 5 keeps a block's experts in one module (classes decorated `@use_experts_implementation`)
holding 3D parameters: `gate_up_proj` (experts, 2 x intermediate, hidden) with gate rows before up rows,
and `down_proj` (experts, hidden, intermediate). gpt-oss stores both transposed, with gate and up
interleaved column by column, and biases beside them. The decorator records this on each module
(`is_transposed`, `is_concatenated`, `has_gate`, `has_bias`); this module reads those flags and turns the
stacks into plain (out, in) matrices, one per expert and projection, named as per-expert linear layers
are (`mlp.experts.3.gate_proj`), and back. Algorithms and formats see only the matrices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

PARTS = ("gate", "up", "down")


class ExpertMatrix(NamedTuple):
    """One expert's projection inside a stacked parameter: `module` is the experts module's name in the
    block, `param` the stacked parameter's name in that module, `part` gate, up or down."""

    module: str
    param: str
    expert: int
    part: str

    @property
    def name(self) -> str:
        return f"{self.module}.{self.expert}.{self.part}_proj"


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module with stacked 3D weights."""
    return hasattr(module, "is_transposed") and isinstance(getattr(module, "down_proj", None), nn.Parameter) and module.down_proj.dim() == 3


def find_expert_modules(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if is_experts(m)}


def expert_matrices(block: nn.Module) -> dict[str, ExpertMatrix]:
    """Every expert projection in the block, by its per-expert linear name."""
    found = {}
    for name, module in find_expert_modules(block).items():
        parts = [("gate_up_proj", "gate"), ("gate_up_proj", "up")] if module.has_gate else [("up_proj", "up")]
        for expert in range(module.down_proj.shape[0]):
            for param, part in [*parts, ("down_proj", "down")]:
                entry = ExpertMatrix(name, param, expert, part)
                found[entry.name] = entry
    return found


def _rows(module: nn.Module, part: str, width: int) -> slice:
    """Where gate or up sits along the fused (2 x intermediate) dimension of `gate_up_proj`."""
    if not module.has_gate or part == "down":
        return slice(None)
    if module.is_concatenated:
        half = width // 2
        return slice(0, half) if part == "gate" else slice(half, None)
    return slice(0, None, 2) if part == "gate" else slice(1, None, 2)


def read(module: nn.Module, entry: ExpertMatrix) -> torch.Tensor:
    """The (out, in) matrix of one expert projection (a view of the stacked parameter)."""
    stacked = getattr(module, entry.param)[entry.expert]
    if module.is_transposed:  # (in, out): the fused dimension is the last
        return stacked[:, _rows(module, entry.part, stacked.shape[1])].t()
    return stacked[_rows(module, entry.part, stacked.shape[0])]


def assemble(module: nn.Module, param: str, matrices: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
    """The stacked parameter `param` built from (out, in) matrices keyed by (expert, part), in the module's
    layout: the inverse of `read`, differentiable in the matrices (tuning substitutes it for the parameter)."""
    experts = getattr(module, param).shape[0]
    parts = ["down"] if param == "down_proj" else ["gate", "up"] if module.has_gate else ["up"]
    per_expert = []
    for e in range(experts):
        pieces = [matrices[(e, p)] for p in parts]
        if len(pieces) == 1:
            fused = pieces[0]
        elif module.is_concatenated:
            fused = torch.cat(pieces, dim=0)
        else:  # interleaved rows: gate0, up0, gate1, up1, ...
            fused = torch.stack(pieces, dim=1).flatten(0, 1)
        per_expert.append(fused.t() if module.is_transposed else fused)
    return torch.stack(per_expert)
