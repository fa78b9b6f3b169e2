"""SmoothQuant (arXiv 2211.10438) for layers whose inputs are quantized (W8A8): a few input channels carry
activations 10-100x the others, which per-token int8 rounds coarsely for every channel of the token. Per input
channel j, divide the activation by s_j and multiply the weight's column j by s_j: the product is unchanged,
the activation outliers are tamed, and the weights (quantized per channel) absorb them. The division is folded
into the norm that feeds the layers, so the model runs as before, with no extra operation.

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)     (max over calibration tokens, and over every layer the norm feeds)

Which norm feeds which layers is found by running the block, not by names: a module whose input tensor *is*
a norm's latest output is fed by it. A norm is smoothed only when every module it feeds is one of the layers
being smoothed, and only if the block's output is unchanged afterwards (a norm output also used elsewhere,
say as the residual, would change it): otherwise it is put back. A norm scales by `weight` (LLaMA) or by
`1 + weight` (Gemma): told apart by running it with a zero weight and bias.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .blocks import block_output, linear_weight, stores_transposed


def _is_norm(module: nn.Module) -> bool:
    """A per-channel affine normalisation: one 1-D weight (and maybe a bias), no submodules."""
    weight = getattr(module, "weight", None)
    params = dict(module.named_parameters(recurse=False))
    return (isinstance(weight, nn.Parameter) and weight.dim() == 1 and set(params) <= {"weight", "bias"}
            and not list(module.children()) and not isinstance(module, (nn.Linear, nn.Embedding)))


@torch.no_grad()
def _scales_by_one_plus_weight(norm: nn.Module) -> bool:
    """Whether the norm multiplies by 1 + weight (Gemma) rather than by weight: with a zero weight (and bias)
    its output is not zero."""
    params = [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]
    kept = [p.detach().clone() for p in params]
    for p in params:
        p.zero_()
    try:
        x = torch.randn(2, norm.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(norm.weight)
        return bool(norm(x).abs().amax() > 0)
    finally:
        for p, k in zip(params, kept):
            p.copy_(k)


@torch.no_grad()
def feeding_norms(block: nn.Module, linears: dict[str, nn.Module], run, device=None) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """(norm name -> names of the `linears` it feeds, linear name -> its input's per-channel max |x| over the
    rows of every process), from `run()`, a forward of the block over some calibration rows. A norm that also
    feeds a module outside `linears` is left out."""
    latest: dict[str, torch.Tensor] = {}  # each norm's output in the current forward: identity, not id(), decides
    consumers: dict[str, set[str]] = {}
    amax = {name: torch.zeros(linear_weight(m).shape[1], device=device) for name, m in linears.items()}
    norms = {name: m for name, m in block.named_modules() if _is_norm(m)}

    def record_output(name):
        return lambda module, args, out: latest.__setitem__(name, out)

    def record_input(name):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            for norm, out in latest.items():
                if out is x:
                    consumers.setdefault(norm, set()).add(name)
            if name in amax:
                amax[name] = torch.maximum(amax[name], x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().to(amax[name].device))
        return hook

    handles = [m.register_forward_hook(record_output(n)) for n, m in norms.items()]
    # leaf modules only: a container (the MLP) receiving the norm's output hands it on to its layers
    handles += [m.register_forward_pre_hook(record_input(n)) for n, m in block.named_modules() if n not in norms and not list(m.children())]
    try:
        run()
    finally:
        latest.clear()
        for h in handles:
            h.remove()
    distributed.sum_(list(amax.values()), op="max")  # each process ran the rows it holds
    fed = {norm: sorted(names) for norm, names in consumers.items()
           if names <= set(linears) and all(norms[norm].weight.shape[0] == linear_weight(linears[n]).shape[1] for n in names)}
    return fed, amax


@torch.no_grad()
def smooth_block(block: nn.Module, linears: dict[str, nn.Module], run, alpha: float, stored_dtype: torch.dtype = torch.float32) -> list[str]:
    """Smooth every group of `linears` fed by one norm, in place (the norm's weight and bias, the layers' weight
    columns); returns the norms smoothed, as 'norm -> layers'. A norm's new weight is rounded to `stored_dtype`,
    the dtype the block is saved in, so that tuning sees the norm the saved model will have."""
    device = next(block.parameters()).device
    fed, amax = feeding_norms(block, linears, run, device)
    if not fed:
        return []
    kept = {id(p): p.detach().clone() for p in block.parameters()}
    before = run()
    done = []
    for norm_name, names in fed.items():
        norm = block.get_submodule(norm_name)
        weight_max = torch.stack([linear_weight(linears[n]).detach().abs().amax(0).float() for n in names]).amax(0)
        act_max = torch.stack([amax[n] for n in names]).amax(0)
        s = (act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        offset = _scales_by_one_plus_weight(norm)
        new = (1 + norm.weight.float()) / s - 1 if offset else norm.weight.float() / s
        norm.weight.copy_(new.to(stored_dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_((norm.bias.float() / s).to(stored_dtype))
        for n in names:
            w = linears[n].weight
            w.mul_((s[:, None] if stores_transposed(linears[n]) else s).to(w.dtype))
        done.append(f"{norm_name} -> {', '.join(names)}")
    after = run()
    changed = torch.tensor(float(not torch.allclose(after, before, rtol=2e-2, atol=2e-2 * before.abs().amax().item())), device=device)
    distributed.sum_([changed], op="max")  # every process keeps or reverts alike
    if changed.item():  # a norm output used elsewhere too (the residual, say): put everything back
        for p in block.parameters():
            p.copy_(kept[id(p)])
        return []
    return done


def block_runner(block, inputs, call, rows: torch.Tensor, batch: int, device):
    """A `run()` for `feeding_norms` and `smooth_block`: the block over the calibration inputs `rows` (those
    this process holds), `batch` at a time; returns the outputs of the first batch (for the equivalence check)."""
    def run():
        first = None
        for chunk in rows.split(batch):
            out = block_output(block(inputs.rows(chunk).to(device), *call.args, **call.kwargs))
            first = out if first is None else first
        return first if first is not None else torch.zeros((), device=device)
    return run

