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

import contextlib
import copy
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
    def suffix(self) -> str:
        """The name inside the experts module: `3.gate_proj`."""
        return f"{self.expert}.{self.part}_proj"

    @property
    def name(self) -> str:
        return f"{self.module}.{self.suffix}"


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module with stacked 3D weights."""
    return hasattr(module, "is_transposed") and isinstance(getattr(module, "down_proj", None), nn.Parameter) and module.down_proj.dim() == 3


def routers_outside_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Routers that are modules of their own holding a weight (Qwen3-MoE's TopKRouter, gpt-oss's router), by name:
    kept 16-bit whatever `quantize_routers` says, since no packed layer can stand in for them. Consumers that
    split stacked experts into linear layers make them linear layers too, so exports list them as 16-bit."""
    from .blocks import is_linear
    from .config import ROUTER

    return {name: m for name, m in block.named_modules()
            if ROUTER.search(name) and not is_linear(m) and isinstance(getattr(m, "weight", None), torch.Tensor)}


def find_expert_modules(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if is_experts(m)}


def expert_matrices_of(module: nn.Module, name: str = "") -> list[ExpertMatrix]:
    """Every projection of one experts module, expert by expert."""
    params = stacked_params(module)
    return [ExpertMatrix(name, param, e, part) for e in range(module.down_proj.shape[0])
            for param in params for part in parts_of(param, module.has_gate)]


def expert_matrices(block: nn.Module) -> dict[str, ExpertMatrix]:
    """Every expert projection in the block, by its per-expert linear name."""
    return {entry.name: entry for name, module in find_expert_modules(block).items() for entry in expert_matrices_of(module, name)}


def _rows(module: nn.Module, part: str, width: int) -> slice:
    """Where gate or up sits along the fused (2 x intermediate) dimension of `gate_up_proj`."""
    if not module.has_gate or part == "down":
        return slice(None)
    if module.is_concatenated:
        half = width // 2
        return slice(0, half) if part == "gate" else slice(half, None)
    return slice(0, None, 2) if part == "gate" else slice(1, None, 2)


def read(module: nn.Module, entry: ExpertMatrix, values: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) matrix of one expert projection (a view of the stacked parameter, or of `values`
    laid out like it, e.g. its gradient)."""
    stacked = (getattr(module, entry.param) if values is None else values)[entry.expert]
    if module.is_transposed:  # (in, out): the fused dimension is the last
        return stacked[:, _rows(module, entry.part, stacked.shape[1])].t()
    return stacked[_rows(module, entry.part, stacked.shape[0])]


@contextlib.contextmanager
def routed_tokens(block: nn.Module):
    """While the block runs inside, count the tokens its router sends to each expert: a dict from experts
    module name to a tensor of counts (every routed copy of a token counts, so they sum to tokens x top-k).
    An expert that receives none gets no gradient when its block is tuned."""
    counts: dict[str, torch.Tensor] = {}

    def counter(name: str, experts: int):
        def hook(module, args, kwargs):
            index = next((a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor) and not a.is_floating_point()), None)
            if index is not None:
                index = index.reshape(-1).cpu()
                index = index[(index >= 0) & (index < experts)]  # implementations may pad with -1 or `experts`
                counts[name] = counts.get(name, 0) + torch.bincount(index, minlength=experts)
        return hook

    handles = [m.register_forward_pre_hook(counter(n, m.down_proj.shape[0]), with_kwargs=True) for n, m in find_expert_modules(block).items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


class Layout(NamedTuple):
    """How an experts module stacks its matrices (the flags transformers' decorator records): hashable, so
    a traced tuning step can treat it as a constant."""

    transposed: bool
    concatenated: bool
    has_gate: bool


def layout(module: nn.Module) -> Layout:
    return Layout(bool(module.is_transposed), bool(getattr(module, "is_concatenated", True)), bool(module.has_gate))


def stacked_params(module: nn.Module) -> list[str]:
    """The stacked weight parameters of an experts module (biases aside)."""
    return ["gate_up_proj", "down_proj"] if module.has_gate else ["up_proj", "down_proj"]


def parts_of(param: str, has_gate: bool) -> list[str]:
    return ["down"] if param == "down_proj" else ["gate", "up"] if has_gate else ["up"]


def stack(lay: Layout, param: str, experts: int, matrices: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
    """The stacked parameter `param` built from (out, in) matrices keyed by (expert, part), in layout `lay`:
    the inverse of `read`, differentiable in the matrices (tuning substitutes it for the parameter)."""
    per_expert = []
    for e in range(experts):
        pieces = [matrices[(e, p)] for p in parts_of(param, lay.has_gate)]
        if len(pieces) == 1:
            fused = pieces[0]
        elif lay.concatenated:
            fused = torch.cat(pieces, dim=0)
        else:  # interleaved rows: gate0, up0, gate1, up1, ...
            fused = torch.stack(pieces, dim=1).flatten(0, 1)
        per_expert.append(fused.t() if lay.transposed else fused)
    return torch.stack(per_expert)


def assemble(module: nn.Module, param: str, matrices: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
    """`stack` in `module`'s own layout and number of experts."""
    return stack(layout(module), param, getattr(module, param).shape[0], matrices)


def float_linear(matrix: torch.Tensor) -> nn.Linear:
    """A bias-free linear layer holding a copy of an (out, in) matrix: a projection kept 16-bit inside QuantExperts."""
    layer = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(matrix.detach().clone(), requires_grad=False)
    return layer


class QuantExperts(nn.Module):
    """A stacked experts module after quantization. Child `e` holds expert e's `gate_proj`, `up_proj` and
    `down_proj` as packed QuantLinear layers (or nn.Linear where a projection stayed 16-bit), so the
    state dict names them as per-expert linear layers are named (`experts.3.gate_proj.qweight`). The
    forward dequantizes them into the original stacked layout and runs the original module's own
    forward through `functional_call`, whichever experts implementation transformers dispatches to.
    The original module is kept with its weights on the meta device, outside the module tree; what else
    it held (gpt-oss's stacked biases, Ergo's post_expert_norm) is copied here under its own name."""

    def __init__(self, original: nn.Module, layers: dict[tuple[int, str], nn.Module]):
        super().__init__()
        self.experts = original.down_proj.shape[0]
        for e in range(self.experts):
            entry = nn.Module()
            for part in PARTS if original.has_gate else ("up", "down"):
                entry.add_module(f"{part}_proj", layers[(e, part)])
            self.add_module(str(e), entry)
        self.layout, self.params = layout(original), stacked_params(original)
        for name, tensor in list(original.named_parameters(recurse=False)):
            if name not in self.params:
                self.register_parameter(name, nn.Parameter(tensor.detach().clone(), requires_grad=False))
        for name, tensor in original.named_buffers(recurse=False):
            self.register_buffer(name, tensor.clone())
        self.held = [name for name, _ in original.named_children()]
        for name in self.held:
            self.add_module(name, copy.deepcopy(getattr(original, name)))
        self._original = [original.to("meta")]  # a list: not a submodule, so its meta weights are not saved

    def expert(self, e: int) -> nn.Module:
        return getattr(self, str(e))

    @classmethod
    def shell(cls, original: nn.Module, schemes, dtype: torch.dtype, device=None) -> QuantExperts:
        """Empty layers to load a saved state into: `schemes(part_name)` gives the QuantLinear scheme of
        `"3.gate_proj"`, or None for a 16-bit projection."""
        from .qlinear import QuantLinear

        layers = {}
        for entry in expert_matrices_of(original):
            out_features, in_features = read(original, entry).shape
            scheme = schemes(entry.suffix)
            layers[(entry.expert, entry.part)] = (QuantLinear(in_features, out_features, scheme, False, dtype=dtype, device=device) if scheme
                                                  else nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device))
        return cls(original, layers)

    def weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The stacked parameters the original module holds, dequantized."""
        matrices = {}
        for e in range(self.experts):
            for name, layer in self.expert(e).named_children():
                matrices[(e, name.removesuffix("_proj"))] = layer.weight.to(dtype) if isinstance(layer, nn.Linear) else layer.dequantized_weight(dtype)
        stacked = {param: stack(self.layout, param, self.experts, matrices) for param in self.params}
        own = {name: t.to(dtype) if t.is_floating_point() else t for name, t in [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]}
        held = {f"{child}.{key}": t for child in self.held for key, t in getattr(self, child).state_dict(keep_vars=True).items()}
        return stacked | own | held

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self._original[0], self.weights(hidden_states.dtype), (hidden_states, *args), kwargs)


def stacked_matrix_names(model: nn.Module) -> set[str]:
    """The per-expert names (`...experts.3.gate_proj`) of every matrix held in stacked experts, before or after quantization."""
    names = set()
    for name, m in model.named_modules():
        if is_experts(m):
            names |= {f"{name}.{entry.suffix}" for entry in expert_matrices_of(m)}
        elif isinstance(m, QuantExperts):
            names |= {f"{name}.{e}.{child}" for e in range(m.experts) for child, _ in m.expert(e).named_children()}
    return names


def split_refusal(model: nn.Module) -> str | None:
    """Why runtimes that split stacked experts into per-expert linear layers (gate, up, down) would not compute
    what this model's experts compute, or None: gpt-oss interleaves gate and up, transposed, with biases."""
    for m in model.modules():
        lay = m.layout if isinstance(m, QuantExperts) else layout(m) if is_experts(m) else None
        if lay is not None and (lay.transposed or not lay.concatenated or any(n.endswith("bias") for n, _ in m.named_parameters(recurse=False))):
            return ("its experts are stacked transposed, gate and up interleaved, with biases (gpt-oss): the per-expert layers its "
                    "consumers build do not compute them the same way; save signround's own folder (format signround), which signround.load runs")
    return None


def transformers_part_names(model_type: str) -> dict[str, str] | None:
    """The per-expert names transformers' checkpoint conversion merges into the stacked tensors, by part
    (Mixtral: {"gate": "w1", "up": "w3", "down": "w2"}), or None where it merges none (it then reads only stacked tensors)."""
    import re

    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    parts = {}
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        targets = [t for t in rule.target_patterns if t.endswith(("experts.gate_up_proj", "experts.down_proj"))]
        sources = [re.search(r"experts\.\*\.(\w+)\.weight$", pattern) for pattern in rule.source_patterns]
        if targets and all(sources):
            names = ["down"] if targets[0].endswith("down_proj") else ["gate", "up"]
            parts.update({part: m.group(1) for part, m in zip(names, sources)})
    return parts if set(parts) == set(PARTS) else None
