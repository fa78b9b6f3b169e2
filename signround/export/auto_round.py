"""intel/auto-round's own format (`quant_method: "auto-round"`), loaded by transformers when the
auto-round package is installed.

Integer models: symmetric ones use its `auto_round:auto_gptq` packing, GPTQ's int32 layout with GPTQ v1
zero points (stored minus one); anything asymmetric its `auto_round` packing, the same layout with the zero
point stored as is. Float models take its `auto_round:llm_compressor` packing, compressed-tensors' tensors
under auto-round's config: NVFP4 with NVFP4 inputs under each layer's calibrated `input_global_scale` (its
loader runs MXFP4/MXFP8 too, but quantizes their inputs by a rule of its own that costs far more: refused). Layers with their
own scheme go to `extra_config`, 16-bit layers as bits 16.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..quant.packing import pack_qzeros
from . import GPTQLayout, default_scheme, outside_blocks, partial_group, quantized_layers, register_format, unquantized_block_linears, write_packed_folder
from .compressed_tensors import fp_tensors, input_tensors

# auto-round's data types of each float scheme written: (weights, inputs). Its loader also runs MXFP4 and MXFP8,
# but scales their inputs by the OCP rule (the exponent floored), which saturates the groups compressed-tensors'
# rule (signround's) rounds up: SmolLM2 MXFP4 (RTN) 66.76 -> 103.6, MXFP8 21.69 -> 22.71 (benchmarks/exports.py)
_FLOAT_TYPES = {"NVFP4": ("nv_fp", "nv_fp4_with_static_gs")}


def _scheme_fields(scheme) -> dict:
    """A scheme in auto-round's config keys."""
    if not scheme.fp:
        return {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym, "data_type": "int"}
    weights, inputs = _FLOAT_TYPES[scheme.fp]
    t = scheme.fptype
    return {"bits": t.element.bits, "group_size": t.group_size, "sym": True, "data_type": weights, "act_bits": t.element.bits,
            "act_group_size": t.group_size, "act_sym": True, "act_data_type": inputs, "act_dynamic": True}


@register_format
class AutoRoundFormat(GPTQLayout):
    holds_experts = True  # written per expert (`experts.3.gate_proj.qweight`): auto-round's loader splits stacked experts into such layers
    name = "auto_round"
    fits = ("integer weight-only schemes of 2, 3, 4 or 8 bits whose group size divides every layer's width (or -1), "
            "and the float scheme NVFP4 (weights and inputs)")
    kinds = ("int", "fp")
    activations = tuple(_FLOAT_TYPES)

    def refusal(self, scheme, in_features):
        if scheme.fp:
            if scheme.fp not in _FLOAT_TYPES or scheme.act != scheme.fp:
                return (f"auto-round's loader runs float weights only as NVFP4 with NVFP4 inputs as signround tunes them (its MX "
                        f"inputs are rounded by another rule, which costs MXFP4 55% in perplexity); export {scheme.name()} as compressed-tensors")
            return partial_group(scheme, in_features)
        if scheme.act:
            return f"its config has no place for quantized inputs ({scheme.act}) on integer weights; export {scheme.name()} as compressed-tensors"
        return super().refusal(scheme, in_features)

    def expert_refusal(self, scheme):
        if scheme is not None and scheme.fp:
            return ("its loader's float experts are not checked against signround's; quantize the model with an integer scheme, "
                    "or save signround's own folder (format signround)")
        return super().expert_refusal(scheme)

    def schemes_refusal(self, schemes):
        if len({bool(s.fp) for s in schemes}) > 1:
            return "its config packs the whole model one way, integer (GPTQ layout) or float (compressed-tensors layout), not both"
        return None

    def write(self, model, tokenizer, folder):
        from ..blocks import find_blocks

        layers = quantized_layers(model)
        floats = any(layer.scheme.fp for layer in layers.values())  # never mixed with integer layers (schemes_refusal)
        default = default_scheme(model)
        if bool(default.fp) != floats:  # every layer overridden away from the base scheme: the commonest one heads the config
            default = Counter(layer.scheme for layer in layers.values()).most_common(1)[0][0]
        gptq_zeros = all(layer.scheme.sym for layer in layers.values())
        heads = outside_blocks(model, layers)

        def tensors(name, layer):
            if floats:
                return {**fp_tensors(layer), **input_tensors(layer)}
            zeros = layer.qzeros
            if gptq_zeros:  # GPTQ v1: the zero point minus one (sym zero points are 2**(bits-1), so never negative)
                zeros = pack_qzeros(layer.quantized_weight().zero.int() - 1, layer.scheme.bits)
            return {"qweight": layer.qweight, "qzeros": zeros, "scales": layer.scales}

        # auto-round's loader converts the blocks' layers and those named here: a quantized lm_head is always listed
        extra = {name: _scheme_fields(layer.scheme) for name, layer in layers.items()
                 if layer.scheme != default or name in heads}
        kept = {"bits": 16, "data_type": "float", **({"act_bits": 16} if floats else {})}
        extra.update({name: kept for name in unquantized_block_linears(model)})
        packing = "auto_round:llm_compressor" if floats else "auto_round:auto_gptq" if gptq_zeros else "auto_round"
        config = {"quant_method": "auto-round", "packing_format": packing, **_scheme_fields(default),
                  "block_name_to_quantize": find_blocks(model)[0], "provider": "signround"}
        if extra:
            config["extra_config"] = extra
        # float layers are dequantized to the model's dtype: bf16, as signround runs them on CPU
        write_packed_folder(model, tokenizer, folder, tensors, config, dtype=torch.bfloat16 if floats else None)
