"""intel/auto-round's own format (`quant_method: "auto-round"`), loaded by transformers when the
auto-round package is installed.

Symmetric models use its `auto_round:auto_gptq` packing: GPTQ's int32 layout with GPTQ v1 zero points
(stored minus one). Anything asymmetric uses its `auto_round` packing, the same layout with the zero
point stored as is. Layers with their own scheme go to `extra_config`, 16-bit layers as bits 16.
"""

from __future__ import annotations

from ..quant.packing import pack_qzeros
from . import GPTQLayout, default_scheme, quantized_layers, register_format, unquantized_block_linears, write_packed_folder


@register_format
class AutoRoundFormat(GPTQLayout):
    holds_experts = True  # written per expert (`experts.3.gate_proj.qweight`): auto-round's loader splits stacked experts into such layers
    name = "auto_round"

    def write(self, model, tokenizer, folder):
        from ..blocks import find_blocks

        layers = quantized_layers(model)
        default = default_scheme(model)
        gptq_zeros = all(layer.scheme.sym for layer in layers.values())

        def tensors(name, layer):
            zeros = layer.qzeros
            if gptq_zeros:  # GPTQ v1: the zero point minus one (sym zero points are 2**(bits-1), so never negative)
                zeros = pack_qzeros(layer.quantized_weight().zero.int() - 1, layer.scheme.bits)
            return {"qweight": layer.qweight, "qzeros": zeros, "scales": layer.scales}

        extra = {name: {"bits": layer.scheme.bits, "group_size": layer.scheme.group_size, "sym": layer.scheme.sym, "data_type": "int"}
                 for name, layer in layers.items() if layer.scheme != default}
        extra.update({name: {"bits": 16, "data_type": "float"} for name in unquantized_block_linears(model)})
        config = {
            "quant_method": "auto-round",
            "packing_format": "auto_round:auto_gptq" if gptq_zeros else "auto_round",
            "bits": default.bits,
            "group_size": default.group_size,
            "sym": default.sym,
            "data_type": "int",
            "block_name_to_quantize": find_blocks(model)[0],
            "provider": "signround",
        }
        if extra:
            config["extra_config"] = extra
        write_packed_folder(model, tokenizer, folder, tensors, config)
