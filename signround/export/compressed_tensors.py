"""compressed-tensors `pack-quantized` (what llm-compressor writes and vLLM runs), loaded by
transformers when the compressed-tensors package is installed.

Per layer: `weight_packed` int32 (out, ceil(in*bits/32)), the codes as a dense little-endian bit stream
along the input dimension; `weight_scale` (out, groups); `weight_shape`; and for asymmetric schemes
`weight_zero_point` packed the same way along the output dimension. Its codes are signed (code minus
2**(bits-1)) but packed with that offset added back, so the stored bits are signround's unsigned
codes and zero points unchanged. Its group strategy needs the group size to divide the layer's width.
"""

from __future__ import annotations

import math
import re

import torch

from ..quant.packing import pack_rows
from . import Format, partial_group, quantized_layers, register_format, unquantized_block_linears, write_packed_folder


def _dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned codes -> (rows, ceil(cols*bits/32)) int32, packed along dim 1."""
    return pack_rows(values.t(), bits).t()[:, : math.ceil(values.shape[1] * bits / 32)]


def _weights_args(bits: int, sym: bool, group_size: int | None) -> dict:
    """`group_size` None: one group per output channel (also where the group is as wide as the layer)."""
    return {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "channel" if group_size is None else "group",
            "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"}


@register_format
class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    fits = "integer schemes of 2-8 bits whose group size divides every layer's width (or -1)"

    def refusal(self, scheme, in_features):
        return partial_group(scheme, in_features, wider_ok=True)

    def write(self, model, tokenizer, folder):
        layers = quantized_layers(model)

        def tensors(name, layer):
            qw = layer.quantized_weight()
            out = {"weight_packed": _dense(qw.codes, layer.scheme.bits), "weight_scale": qw.scale.to(torch.float16),
                   "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
            if not layer.scheme.sym:
                out["weight_zero_point"] = _dense(qw.zero.t(), layer.scheme.bits).t()
            return out

        groups: dict = {}
        for name, layer in layers.items():
            s = layer.scheme
            group = None if s.group_size == -1 or s.group_size >= layer.in_features else s.group_size
            groups.setdefault((s.bits, s.sym, group), []).append(f"re:^{re.escape(name)}$")
        config = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {f"group_{i}": {"targets": targets, "weights": _weights_args(*key), "input_activations": None,
                                             "output_activations": None, "format": "pack-quantized"}
                              for i, (key, targets) in enumerate(groups.items())},
            "ignore": sorted({"lm_head", *unquantized_block_linears(model)} - set(layers)),
            "kv_cache_scheme": None,
            "provider": "signround",
        }
        write_packed_folder(model, tokenizer, folder, tensors, config)
