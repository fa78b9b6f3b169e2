"""Model plumbing: where the decoder blocks are, which layers in them are linear, what each block is
called with, and running a block on cached inputs. Nothing here knows about quantization."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model has no decoder-block list or no linear layers to quantize."""


SUPPORTED = "signround quantizes decoder-only causal LMs (LLaMA, Qwen, Mistral, Gemma, Phi-3, GPT-2, OPT, GPT-NeoX, ...)"


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer that stores its weight transposed)."""
    return isinstance(module, (nn.Linear, _conv1d_type()))


def stores_transposed(module: nn.Module) -> bool:
    """Whether the layer keeps its weight as (in_features, out_features) (GPT-2's Conv1D)."""
    return isinstance(module, _conv1d_type())


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer's own layout."""
    return module.weight.t() if stores_transposed(module) else module.weight


def as_param_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `linear_weight`: an (out, in) weight in the layout `module.weight` uses."""
    return weight.t() if stores_transposed(module) else weight


def num_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the shortest-named ModuleList with as many entries as the
    config has layers (or, without a config, the longest one) whose entries contain linear layers."""
    expected = num_layers(getattr(model, "config", None))
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not any(is_linear(m) or hasattr(m, "qweight") for m in module[0].modules()):  # qweight: already packed
            continue
        if expected is None or len(module) == expected:
            candidates.append((name.count("."), -len(module), name, module))
    if not candidates:
        kind = type(model).__name__
        raise UnsupportedModelError(f"{kind} has no list of decoder blocks with linear layers: {SUPPORTED}")
    _, _, name, module = min(candidates, key=lambda c: c[:3])
    return name, module


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if is_linear(m)}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@dataclass
class BlockCall:
    """What a block is called with, besides the hidden states: extra positional arguments and keyword
    arguments (attention mask, position ids, rotary embeddings...), captured for a batch of one, which
    the model's own code broadcasts over a larger batch."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device) -> BlockCall:
        return BlockCall(_to_device(self.args, device), _to_device(self.kwargs, device))


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the blocks needs to run during capture."""


class _Recorder(nn.Module):
    """Stands in for a block during capture: records how it is called and passes the hidden states
    through. Attribute reads fall back to the real block (models read e.g. `layer.attention_type`)."""

    def __init__(self, block: nn.Module, sink, last: bool):
        super().__init__()
        self.block = block
        self.sink, self.last = sink, last  # sink(hidden) receives each call's hidden states (block 0 only)
        self.call: BlockCall | None = None  # the first call; all rows share it

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if self.call is None:
            self.call = BlockCall(tuple(rest), dict(kwargs))
        if self.sink:
            self.sink(hidden.detach())
        if self.last:
            raise _StopForward
        return hidden


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, device, sink=None):
    """Run the model's embedding stage on every calibration row; return (hidden states entering block 0
    as an (N, S, H) tensor, [BlockCall for every block]). With `sink`, each row's hidden states go to
    `sink(hidden)`, in row order, instead and the first item is None.

    The blocks are replaced by recorders for the duration of the call only, so no block runs and later
    blocks need not even hold real weights; the model is unchanged afterwards.
    """
    originals = list(blocks)
    kept: list[torch.Tensor] = []
    recorders = [_Recorder(b, sink=(sink or kept.append) if i == 0 else None, last=i == len(originals) - 1) for i, b in enumerate(originals)]
    try:
        for i, r in enumerate(recorders):
            blocks[i] = r
        for ids in input_ids:
            try:
                model(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
    return (torch.cat(kept, dim=0) if sink is None else None), [r.call for r in recorders]


@torch.no_grad()
def check_causal(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Refuse encoders (BERT and kin, whose attention looks both ways): in a decoder block, changing the
    last position's input leaves every earlier position's output unchanged. Runs only the embeddings
    and block 0 on eight tokens."""
    embed = model.get_input_embeddings()
    ids = torch.arange(8, device=embed.weight.device).remainder(embed.weight.shape[0]).unsqueeze(0)
    hidden, calls = capture_block_inputs(model, blocks, ids, embed.weight.device)
    param = next(blocks[0].parameters())
    hidden = hidden.to(param.device, param.dtype)
    changed = hidden.clone()
    changed[:, -1] += hidden.float().std().to(hidden.dtype) + 1
    call = calls[0].to(param.device)
    before = block_output(blocks[0](hidden, *call.args, **call.kwargs))[:, :-1].float()
    after = block_output(blocks[0](changed, *call.args, **call.kwargs))[:, :-1].float()
    if (after - before).abs().max() > 1e-3 * (before.abs().max() + 1e-6):
        raise UnsupportedModelError(f"{type(model).__name__} is not a decoder (its blocks attend to later positions): {SUPPORTED}")


def block_output(out):
    """transformers 5 blocks return a tensor; older code returns a tuple with the hidden states first."""
    return out[0] if isinstance(out, (tuple, list)) else out


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def run_block(block: nn.Module, hidden, call: BlockCall, batch_size: int, device, amp_dtype, out):
    """Block outputs for every row of the cache `hidden`, computed in batches on `device` and written
    into the cache `out` (cache.py), which is returned."""
    for sl in iter_batches(hidden.shape[0], batch_size):
        x = hidden.rows(sl).to(device)
        with autocast(device, amp_dtype):
            out.write(sl.start, block_output(block(x, *call.args, **call.kwargs)))
    return out


def autocast(device, amp_dtype):
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None)


def move_except_blocks(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Move every parameter and buffer that is not inside a block to `device` (embeddings, final norm,
    rotary tables), leaving the blocks where they are so they can be streamed one at a time."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(device), recurse=False)
