"""SmoothQuant (arXiv 2211.10438) for layers whose inputs are quantized (W8A8): a few input channels carry
activations 10-100x the others, which per-token int8 rounds coarsely for every channel of the token. Per input
channel j, divide the activation by s_j and multiply the weight's column j by s_j: the product is unchanged,
the activation outliers are tamed, and the weights (quantized per channel) absorb them. The division is folded
into the norm that feeds the layers, so the model runs as before, with no extra operation.

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)     (max over calibration tokens, and over every layer the norm feeds)

Which norm feeds which layers is found by running the block, not by names: a linear whose input tensor *is*
a norm's output is fed by it. A norm scales by `weight` (LLaMA) or by `1 + weight` (Gemma): told apart by
running it with a zero weight.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .blocks import block_output


def _is_norm(module: nn.Module) -> bool:
    """A per-channel affine normalisation: one 1-D weight (and maybe a bias), no submodules."""
    weight = getattr(module, "weight", None)
    params = dict(module.named_parameters(recurse=False))
    return (isinstance(weight, nn.Parameter) and weight.dim() == 1 and set(params) <= {"weight", "bias"}
            and not list(module.children()) and not isinstance(module, (nn.Linear, nn.Embedding)))


@torch.no_grad()
def _scales_by_one_plus_weight(norm: nn.Module) -> bool:
    """Whether the norm multiplies by 1 + weight (Gemma) rather than by weight: with a zero weight its output is not zero."""
    kept = norm.weight.detach().clone()
    norm.weight.zero_()
    try:
        out = norm(torch.randn(2, kept.shape[0], generator=torch.Generator().manual_seed(0), dtype=kept.dtype).to(kept.device))
    finally:
        norm.weight.copy_(kept)
    return bool(out.abs().amax() > 0)


@torch.no_grad()
def feeding_norms(block: nn.Module, linears: dict[str, nn.Linear], run) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """(norm name -> names of the `linears` it feeds, linear name -> its input's per-channel max |x|), from
    `run()`, a forward of the block over some calibration rows."""
    outputs: dict[int, str] = {}
    fed: dict[str, list[str]] = {}
    amax: dict[str, torch.Tensor] = {}
    norms = {name: m for name, m in block.named_modules() if _is_norm(m)}

    def record_output(name):
        return lambda module, args, out: outputs.__setitem__(id(out), name)

    def record_input(name):
        def hook(module, args):
            x = args[0]
            amax[name] = torch.maximum(amax.get(name, torch.zeros(())), x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu())
            norm = outputs.get(id(x))
            if norm is not None and name not in fed.setdefault(norm, []):
                fed[norm].append(name)
        return hook

    handles = [m.register_forward_hook(record_output(n)) for n, m in norms.items()]
    handles += [m.register_forward_pre_hook(record_input(n)) for n, m in linears.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    maxima = [amax[name] for name in sorted(amax)]
    distributed.sum_(maxima, op="max")  # each process ran the rows it holds
    return {norm: names for norm, names in fed.items() if names}, dict(zip(sorted(amax), maxima))


@torch.no_grad()
def smooth_block(block: nn.Module, linears: dict[str, nn.Linear], run, alpha: float) -> list[str]:
    """Smooth every group of `linears` fed by one norm (in place: the norm's weight and bias, the layers'
    weight columns); returns the norms smoothed, as 'norm -> layers'."""
    fed, amax = feeding_norms(block, linears, run)
    done = []
    for norm_name, names in fed.items():
        norm = block.get_submodule(norm_name)
        weight_max = torch.stack([linears[n].weight.detach().abs().amax(0).float().cpu() for n in names]).amax(0)
        act_max = torch.stack([amax[n] for n in names]).amax(0)
        s = (act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        s = s.to(norm.weight.device)
        offset = _scales_by_one_plus_weight(norm)
        norm.weight.copy_(((1 + norm.weight.float()) / s - 1 if offset else norm.weight.float() / s).to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))
        for n in names:
            w = linears[n].weight
            w.copy_((w.float() * s.to(w.device)).to(w.dtype))
        done.append(f"{norm_name} -> {', '.join(names)}")
    return done


def block_runner(block, inputs, call, rows: torch.Tensor, batch: int, device):
    """A `run()` for `feeding_norms`: the block over the calibration inputs `rows` (those this process holds), `batch` at a time."""
    def run():
        for chunk in rows.split(batch):
            block_output(block(inputs.rows(chunk).to(device), *call.args, **call.kwargs))
    return run
