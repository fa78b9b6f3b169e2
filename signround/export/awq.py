"""AutoAWQ's GEMM checkpoints (`quant_method: "awq"`, `version: "gemm"`), the layout vLLM, GPTQModel and
auto-round read as AWQ: per layer int32 `qweight` (in, out/8) and `qzeros` (groups, out/8) packed along
the *output* dimension with AWQ's interleaved order, fp16 `scales` (groups, out), zero points stored
as they are (weight = (code - zero) * scale).

AWQ has one scheme per model (4 bits, one group size) and no per-layer overrides except layers kept
in 16 bit (`modules_to_not_convert`).
"""

from __future__ import annotations

import re

import torch

from . import Format, partial_group, quantized_layers, register_format, unquantized_block_linears, write_packed_folder

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # which of 8 consecutive output columns goes in nibble i of a word


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) 4-bit codes -> (rows, cols/8) int32: word c holds columns 8c + AWQ_ORDER[i] in bits 4i..4i+3."""
    rows, cols = codes.shape
    grouped = codes.to(torch.int64).view(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (grouped << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_awq`: (rows, cols/8) int32 -> (rows, cols) uint8."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF
    codes = torch.empty_like(nibbles)
    codes[..., list(AWQ_ORDER)] = nibbles
    return codes.reshape(words.shape[0], -1).to(torch.uint8)


@register_format
class AWQFormat(Format):
    name = "awq"
    holds_lm_head = False
    fits = "4-bit schemes (asymmetric, or symmetric with its fixed zero point) whose group size divides every layer's width, one scheme for all layers"

    def refusal(self, scheme, in_features):
        if scheme.bits != 4:
            return f"AWQ's GEMM kernels take 4 bits only, not {scheme.bits}"
        if scheme.group_size == -1:
            return "AWQ's config has one group size for all layers, so per-channel (-1) cannot be written"
        return partial_group(scheme, in_features)

    def schemes_refusal(self, schemes):
        if len(schemes) > 1:
            return f"AWQ has one scheme for the whole model, but the layers use {', '.join(sorted(s.name() for s in schemes))}"
        return None

    def write(self, model, tokenizer, folder):
        def tensors(name, layer):
            qw = layer.quantized_weight()
            return {"qweight": pack_awq(qw.codes.t()), "qzeros": pack_awq(qw.zero.t()), "scales": layer.scales}

        scheme = next(iter(quantized_layers(model).values())).scheme  # the only one: schemes_refusal saw to it
        kept = unquantized_block_linears(model)
        config = {
            "quant_method": "awq",
            "version": "gemm",
            "bits": 4,
            "group_size": scheme.group_size,
            "zero_point": True,  # symmetric schemes store their fixed zero point 8 like any other
            "sym": scheme.sym,
            "modules_to_not_convert": [f"^{re.escape(name)}$" for name in kept] or None,
            "provider": "signround",
        }
        write_packed_folder(model, tokenizer, folder, tensors, config)
