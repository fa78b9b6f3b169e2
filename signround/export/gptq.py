"""GPTQ checkpoints (`quant_method: "gptq"`, `checkpoint_format: "gptq"`), as AutoGPTQ and GPTQModel
write them: int32 `qweight` (in*bits/32, out), `qzeros` (groups, out*bits/32) holding each zero point
minus one (the v1 convention), fp16 `scales` (groups, out) and `g_idx` (input column -> group, so a
partial last group is fine). `desc_act` is false: groups follow the input order. Layers with their
own scheme, or kept in 16 bit, are listed in `dynamic` as GPTQModel reads it.
"""

from __future__ import annotations

import re

import torch

from ..config import ConfigError
from ..quant.integer import group_size_for
from ..quant.packing import pack_qzeros
from . import GPTQLayout, default_scheme, outside_blocks, quantized_layers, register_format, unquantized_block_linears, write_packed_folder


@register_format
class GPTQFormat(GPTQLayout):
    holds_experts = True  # written per expert (`experts.3.gate_proj.qweight`): auto-round's loader splits stacked experts into such layers
    name = "gptq"

    def write(self, model, tokenizer, folder):
        layers = quantized_layers(model)
        default = default_scheme(model)
        heads = outside_blocks(model, layers)  # a quantized lm_head: named, as its loader converts only the blocks otherwise

        def tensors(name, layer):
            qw = layer.quantized_weight()
            if (qw.zero == 0).any():
                raise ConfigError(f"{name} has a zero point of 0, which GPTQ's v1 convention (zero minus one) cannot hold: "
                                  f"export it with --format auto_round, or use a symmetric scheme")
            g_idx = torch.arange(layer.in_features, dtype=torch.int32) // group_size_for(layer.in_features, layer.scheme.group_size)
            return {"qweight": layer.qweight, "qzeros": pack_qzeros(qw.zero.int() - 1, layer.scheme.bits), "scales": layer.scales, "g_idx": g_idx}

        dynamic = {f"+:^{re.escape(name)}$": {"bits": layer.scheme.bits, "group_size": layer.scheme.group_size, "sym": layer.scheme.sym}
                   for name, layer in layers.items() if layer.scheme != default or name in heads}
        dynamic.update({f"-:^{re.escape(name)}$": {} for name in unquantized_block_linears(model)})
        config = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": default.bits,
            "group_size": default.group_size,
            "sym": default.sym,
            "desc_act": False,
            "static_groups": False,
            "true_sequential": True,
            "lm_head": bool(heads),
            "damp_percent": 0.01,
            "provider": "signround",
        }
        if dynamic:
            config["dynamic"] = dynamic
        write_packed_folder(model, tokenizer, folder, tensors, config)
