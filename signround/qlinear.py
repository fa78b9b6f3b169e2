"""The runtime layer of the tool's own format: packed integer weights, dequantized on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import WeightScheme
from .quant.integer import QuantizedWeight, dequantize_weight, group_size_for
from .quant.packing import pack_qweight, pack_qzeros, packed_rows, unpack_qweight, unpack_qzeros


class QuantLinear(nn.Module):
    """A linear layer stored as GPTQ-style buffers: `qweight` (packed in, out) int32, `qzeros`
    (groups, packed out) int32, `scales` (groups, out) fp16, optional `bias`.

    The weight is rebuilt in the input's dtype at each call (CPU and CUDA alike), so memory holds
    only the packed form.
    """

    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme, bias: bool, dtype=torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        groups = scheme.groups(in_features)
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, scheme.bits), out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, packed_rows(out_features, scheme.bits), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, scheme: WeightScheme, bias: torch.Tensor | None) -> QuantLinear:
        out_features, in_features = qw.shape
        layer = cls(in_features, out_features, scheme, bias is not None, device=qw.codes.device)
        layer.qweight.copy_(pack_qweight(qw.codes, scheme.bits))
        layer.qzeros.copy_(pack_qzeros(qw.zero, scheme.bits))
        layer.scales.copy_(qw.scale.t())
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        bits = self.scheme.bits
        return QuantizedWeight(
            codes=unpack_qweight(self.qweight, bits, self.in_features),
            scale=self.scales.t(),
            zero=unpack_qzeros(self.qzeros, bits, self.out_features),
            bits=bits,
            group_size=group_size_for(self.in_features, self.scheme.group_size),
        )

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_weight(self.quantized_weight(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        s = self.scheme
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, group_size={s.group_size}, sym={s.sym}"
