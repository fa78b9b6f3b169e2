"""compressed-tensors `pack-quantized` (what llm-compressor writes and vLLM runs), loaded by
transformers when the compressed-tensors package is installed.

Per layer: `weight_packed` int32 (out, ceil(in*bits/32)), the codes as a dense little-endian bit stream
along the input dimension; `weight_scale` (out, groups); `weight_shape`; and for asymmetric schemes
`weight_zero_point` packed the same way along the output dimension. Its codes are signed (code minus
2**(bits-1)) but packed with that offset added back, so the stored bits are signround's unsigned
codes and zero points unchanged. Its group strategy needs the group size to divide the layer's width.

Stacked experts are written per expert, under the names transformers' checkpoint conversion merges back
into the stacked tensors (`experts.3.gate_proj`, Mixtral's `experts.3.w1`); transformers loads them through
that conversion, decompressed to 16 bit, which reads symmetric integer weights only.

Floating-point layers take compressed-tensors' own formats, whose layouts are signround's: `nvfp4-pack-quantized`
(`weight_packed` two E2M1 codes a byte, `weight_scale` float8_e4m3fn per 16, `weight_global_scale`, the same
divisor; NVFP4 inputs add the layer's calibrated `input_global_scale`), `mxfp4-pack-quantized` (E8M0 exponent
bytes per 32), `mxfp8-quantized` (`weight` as float8_e4m3fn, E8M0 bytes per 32) and `float-quantized` (FP8:
float8_e4m3fn `weight`, one fp32 scale per output channel; FP8_BLOCK: one per 128 x 128 block, its `block_structure`).
"""

from __future__ import annotations

import math
import re

import torch

from ..experts import stacked_matrix_names, transformers_part_names
from ..quant.formats import ACTIVATIONS
from ..quant.fp import block_scales
from ..quant.packing import pack_rows
from . import Format, has_experts, partial_group, quantized_layers, register_format, unquantized_block_linears, write_packed_folder


def _dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned codes -> (rows, ceil(cols*bits/32)) int32, packed along dim 1."""
    return pack_rows(values.t(), bits).t()[:, : math.ceil(values.shape[1] * bits / 32)]


def _weights_args(bits: int, sym: bool, group_size: int | None, fp: str | None = None) -> dict:
    """`group_size` None: one group per output channel (also where the group is as wide as the layer)."""
    args = {"num_bits": bits, "type": "float" if fp else "int", "symmetric": sym, "strategy": "channel" if group_size is None else "group",
            "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"}
    if fp == "NVFP4":
        args.update(strategy="tensor_group", scale_dtype="torch.float8_e4m3fn")
    elif fp in ("MXFP4", "MXFP8"):
        args.update(scale_dtype="torch.uint8")
    elif fp == "FP8_BLOCK":
        args.update(strategy="block", group_size=None, block_structure=[128, 128])
    return args


# compressed-tensors' format of each floating-point type (integer layers: pack-quantized; int-quantized for W8A8)
_FP_FORMATS = {"NVFP4": "nvfp4-pack-quantized", "MXFP4": "mxfp4-pack-quantized", "MXFP8": "mxfp8-quantized", "FP8": "float-quantized",
               "FP8_BLOCK": "float-quantized"}
# the dynamic input quantization of each activation format, as compressed-tensors (and vLLM) read it
_ACT_ARGS = {
    "INT8": {"num_bits": 8, "type": "int", "strategy": "token"},
    "FP8": {"num_bits": 8, "type": "float", "strategy": "token"},
    "FP8_BLOCK": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128},
    "MXFP8": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"},
    "MXFP4": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"},
    # group scales computed per call ("local"), under the layer's calibrated `input_global_scale`
    "NVFP4": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "dynamic": "local",
              "scale_dtype": "torch.float8_e4m3fn"},
}


def _act_args(act: str | None) -> dict | None:
    return None if act is None else {"symmetric": True, "dynamic": True, "group_size": None, **_ACT_ARGS[act]}


def _format_of(scheme) -> str:
    """int8 weights per channel with quantized inputs are vLLM's W8A8: `weight` as int8 (int-quantized), not bit-packed."""
    if scheme.fp:
        return _FP_FORMATS[scheme.fp]
    return "int-quantized" if scheme.act and scheme.bits == 8 and scheme.sym and scheme.group_size == -1 else "pack-quantized"


def fp_tensors(layer) -> dict[str, torch.Tensor]:
    """A float layer's tensors under compressed-tensors' names: signround stores them in its layout already."""
    t = layer.scheme.fptype
    out = {"weight_scale": layer.scales if t.scale != "fp32" else block_scales(layer.scales.float(), t)}
    if t.element.bits == 4:
        out["weight_packed"] = layer.qweight
    else:
        out["weight"] = layer.qweight.view(torch.float8_e4m3fn)
    if t.scale == "e4m3":
        out["weight_global_scale"] = layer.global_scale.float().reshape(1)
    return out


def input_tensors(layer) -> dict[str, torch.Tensor]:
    """The calibrated input scale of a layer whose input format has one (NVFP4), under compressed-tensors' name."""
    scale = getattr(layer, "input_global_scale", None)
    return {} if scale is None else {"input_global_scale": scale.float().reshape(1)}


def _weight_tensors(layer) -> dict[str, torch.Tensor]:
    if layer.scheme.fp:
        return fp_tensors(layer)
    qw = layer.quantized_weight()
    if _format_of(layer.scheme) == "int-quantized":  # signed codes: code - zero (128), the scale as it is
        return {"weight": (qw.codes.int() - qw.zero.int()).to(torch.int8), "weight_scale": qw.scale.to(torch.float16)}
    out = {"weight_packed": _dense(qw.codes, layer.scheme.bits), "weight_scale": qw.scale.to(torch.float16),
           "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if not layer.scheme.sym:
        out["weight_zero_point"] = _dense(qw.zero.t(), layer.scheme.bits).t()
    return out


def _expert_names(model):
    """A layer's name on disk: per-expert matrices under the names transformers' conversion merges (Mixtral's w1/w3/w2)."""
    stacked = stacked_matrix_names(model) if has_experts(model) else set()
    parts = transformers_part_names(model.config.model_type) if stacked else None

    def stored(name: str) -> str:
        if name not in stacked:
            return name
        head, part = name.rsplit(".", 1)
        return f"{head}.{parts[part.removesuffix('_proj')]}"
    return stored


@register_format
class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    fits = ("integer schemes of 2-8 bits (W8A8, W4A8 with int8 inputs), the float schemes (FP8A16, MXFP8A16, MXFP4A16, NVFP4A16; "
            "FP8, FP8_BLOCK, MXFP8, MXFP4, NVFP4 with quantized inputs), whose group size divides every layer's width (or -1)")
    kinds = ("int", "fp")
    activations = tuple(ACTIVATIONS)
    holds_experts = True

    def refusal(self, scheme, in_features):
        if scheme.fp == "FP8_BLOCK":  # its weight blocks pad a partial last one, as compressed-tensors' own quantizer does
            if scheme.act and in_features % 128:
                return f"its dynamic input groups of 128 need the layer's width to be a multiple of 128, not {in_features}; use FP8_BLOCKA16 or FP8"
            return None
        return partial_group(scheme, in_features, wider_ok=True)

    def model_refusal(self, model):
        if has_experts(model) and transformers_part_names(model.config.model_type) is None:
            return (f"transformers reads {model.config.model_type}'s experts only as stacked tensors, which compressed-tensors does not "
                    f"pack; export it as auto_round or gptq (or signround's own folder)")
        return None

    def expert_refusal(self, scheme):
        if scheme is None:
            return "its config has no place for 16-bit experts beside packed ones; quantize them, or export as signround"
        if scheme.kind != "int" or not scheme.sym or scheme.act:
            return ("transformers loads compressed-tensors experts through its stacked-tensor conversion, which reads symmetric integer "
                    "weights only; quantize the experts with one (e.g. --layer 'experts=W4A16'), or export as "
                    + ("signround's own folder (format signround)" if scheme.kind != "int" else "auto_round or gptq"))
        return None

    def write(self, model, tokenizer, folder):
        layers = quantized_layers(model)
        stored_name = _expert_names(model)

        def tensors(name, layer):
            return {**_weight_tensors(layer), **input_tensors(layer)}

        groups: dict = {}  # (weights args, inputs' format) -> (the compressed-tensors format, target regexes)
        for name, layer in layers.items():
            s = layer.scheme
            # an integer group as wide as the layer is written per channel; a float format's group is its own
            group = None if s.group_size == -1 or (s.group_size >= layer.in_features and not s.fp) else s.group_size
            groups.setdefault(((s.bits, s.sym, group, s.fp), s.act), (_format_of(s), []))[1].append(f"re:^{re.escape(stored_name(name))}$")
        formats = {fmt for fmt, _ in groups.values()}
        config = {
            "quant_method": "compressed-tensors",
            "format": next(iter(formats)) if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": {f"group_{i}": {"targets": targets, "weights": _weights_args(*weights), "input_activations": _act_args(act),
                                             "output_activations": None, "format": fmt}
                              for i, ((weights, act), (fmt, targets)) in enumerate(groups.items())},
            "ignore": sorted({"lm_head", *map(stored_name, unquantized_block_linears(model))} - {stored_name(n) for n in layers}),
            "kv_cache_scheme": None,
            "provider": "signround",
        }
        # compressed-tensors decompresses float layers to bf16 weights: the folder runs in bf16 so that they meet bf16 inputs
        floats = any(layer.scheme.fp for layer in layers.values())
        write_packed_folder(model, tokenizer, folder, tensors, config, dtype=torch.bfloat16 if floats else None,
                            rename=lambda key: ".".join([stored_name(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1]]))
