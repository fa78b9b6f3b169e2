"""The runtime layer of the tool's own format: packed integer weights, dequantized on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import WeightScheme
from .hardware import cpu_has_fast_bf16
from .quant.integer import QuantizedWeight, dequantize_weight, group_size_for
from .quant.kquant import SUPER_BLOCK, KQuantized, dequantize_k
from .quant.packing import pack_qweight, pack_qzeros, packed_rows, unpack_qweight, unpack_qzeros


class QuantLinear(nn.Module):
    """A linear layer stored as GPTQ-style buffers: `qweight` (packed in, out) int32, `qzeros`
    (groups, packed out) int32, `scales` (groups, out) fp16, optional `bias`.

    The weight is rebuilt in the input's dtype at each call, so memory holds only the packed form (on a
    GPU a slice at a time; 4-bit layers decode through torch's int4 kernels instead). A K-quant scheme
    stores its scales as llama.cpp does instead of `qzeros` and `scales`: `super_scales` (in/256, out)
    fp16 and `scale_codes` (groups, out) int8, and for the asymmetric types `super_mins` fp16 and
    `min_codes` uint8 alike.
    """

    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme, bias: bool, dtype=torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        groups = scheme.groups(in_features)
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, scheme.bits), out_features, dtype=torch.int32, device=device))
        if scheme.kquant:
            supers = in_features // SUPER_BLOCK
            self.register_buffer("super_scales", torch.zeros(supers, out_features, dtype=torch.float16, device=device))
            self.register_buffer("scale_codes", torch.zeros(groups, out_features, dtype=torch.int8, device=device))
            if not scheme.sym:
                self.register_buffer("super_mins", torch.zeros(supers, out_features, dtype=torch.float16, device=device))
                self.register_buffer("min_codes", torch.zeros(groups, out_features, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("qzeros", torch.zeros(groups, packed_rows(out_features, scheme.bits), dtype=torch.int32, device=device))
            self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight | KQuantized, scheme: WeightScheme, bias: torch.Tensor | None) -> QuantLinear:
        out_features, in_features = qw.codes.shape
        layer = cls(in_features, out_features, scheme, bias is not None, device=qw.codes.device)
        layer.qweight.copy_(pack_qweight(qw.codes, scheme.bits))
        if scheme.kquant:
            layer.super_scales.copy_(qw.d.t())
            layer.scale_codes.copy_(qw.sc.t())
            if not scheme.sym:
                layer.super_mins.copy_(qw.dmin.t())
                layer.min_codes.copy_(qw.m.t())
        else:
            layer.qzeros.copy_(pack_qzeros(qw.zero, scheme.bits))
            layer.scales.copy_(qw.scale.t())
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def quantized_weight(self, rows: slice = slice(None)) -> QuantizedWeight | KQuantized:
        """The codes and scales, unpacked: a `KQuantized` for K-quant schemes. `rows`: output features
        from a multiple of 32 on (where the packed zero points start a word), e.g. for one slice at a time."""
        start, stop, _ = rows.indices(self.out_features)
        bits, cols = self.scheme.bits, slice(start, stop)
        codes = unpack_qweight(self.qweight[:, cols], bits, self.in_features)
        if self.scheme.kquant:
            asym = not self.scheme.sym
            return KQuantized(codes, self.super_scales[:, cols].t(), self.scale_codes[:, cols].t().to(torch.int16),
                              self.super_mins[:, cols].t() if asym else None, self.min_codes[:, cols].t().to(torch.int16) if asym else None,
                              self.scheme.ktype)
        if start % 32:
            raise ValueError(f"rows must start at a multiple of 32 output features, not {start}")
        zero_words = slice(start * bits // 32, packed_rows(stop, bits))
        return QuantizedWeight(
            codes=codes,
            scale=self.scales[:, cols].t(),
            zero=unpack_qzeros(self.qzeros[:, zero_words], bits, stop - start),
            bits=bits,
            group_size=group_size_for(self.in_features, self.scheme.group_size),
        )

    def dequantized_weight(self, dtype=torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        if self.scheme.kquant:
            return dequantize_k(self.quantized_weight(rows)).to(dtype)
        return dequantize_weight(self.quantized_weight(rows), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._int4_fits(x):
            return self._int4_forward(x, bias)
        if x.device.type == "cuda":
            return self._sliced_forward(x, bias)
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not cpu_has_fast_bf16():
            # 16-bit matmuls are emulated on such CPUs (several times slower than fp32): compute in fp32
            return F.linear(x.float(), self.dequantized_weight(torch.float32), None if bias is None else bias.float()).to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    # On a GPU the weight is dequantized a slice of output features at a time, so a call holds at most
    # SLICE_WEIGHTS dequantized weights beside the packed ones, however large the layer.
    SLICE_WEIGHTS = 2**22

    def _sliced_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        step = max(32, self.SLICE_WEIGHTS // self.in_features // 32 * 32)
        if step >= self.out_features:
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        y = torch.cat([F.linear(x, self.dequantized_weight(x.dtype, slice(a, a + step))) for a in range(0, self.out_features, step)], dim=-1)
        return y if bias is None else y + bias

    # 4-bit layers use torch's packed int4 weight-only matmul (bf16 activations): tinygemm on CUDA (compute
    # capability 8.0 and up), its CPU twin elsewhere. It wins for a few rows at a time (decoding); for long
    # prompts dequantizing and one dense matmul is faster.
    INT4_MAX_ROWS = 32

    def _int4_fits(self, x: torch.Tensor) -> bool:
        if not (self.scheme.bits == 4 and not self.scheme.kquant and x.dtype == torch.bfloat16 and x.numel() // self.in_features <= self.INT4_MAX_ROWS
                and group_size_for(self.in_features, self.scheme.group_size) in (32, 64, 128, 256)):
            return False
        if x.device.type == "cuda":
            return self.out_features % 8 == 0 and torch.cuda.get_device_capability(x.device) >= (8, 0)
        return x.device.type == "cpu" and self.out_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")

    def _int4_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        packed, scales_zeros, padded_in = self._int4_weights(x.device)
        rows = x.reshape(-1, self.in_features)
        if padded_in != self.in_features:  # a partial last group: zero inputs meet the padded codes
            rows = F.pad(rows, (0, padded_in - self.in_features))
        group = group_size_for(self.in_features, self.scheme.group_size)
        matmul = torch.ops.aten._weight_int4pack_mm if x.device.type == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = matmul(rows.contiguous(), packed, group, scales_zeros).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _int4_weights(self, device: torch.device):
        """Codes repacked for the kernel, with (groups, out, 2) bf16 scale and offset: it computes
        (q - 8) * scale + offset, so offset = (8 - zero) * scale. Built on first use per device, not saved."""
        cache = self.__dict__.setdefault("_int4_cache", {})
        if device not in cache:
            qw = self.quantized_weight()
            group = group_size_for(self.in_features, self.scheme.group_size)
            padded_in = -(-self.in_features // group) * group
            codes = torch.zeros(self.out_features, padded_in, dtype=torch.int32, device=device)
            codes[:, : self.in_features] = qw.codes.to(device, torch.int32)
            scale = qw.scale.to(device, torch.float32)
            offset = (8 - qw.zero.to(device, torch.float32)) * scale
            if device.type == "cuda":  # tinygemm takes two codes a byte, the even one high, and K in tiles of 16 x 2, 4 or 8
                inner_k_tiles = next(t for t in (8, 4, 2) if padded_in % (16 * t) == 0)
                packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), inner_k_tiles)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            cache[device] = (packed, torch.stack([scale.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous(), padded_in)
        return cache[device]

    def extra_repr(self) -> str:
        s = self.scheme
        kind = s.name() if s.kquant else f"bits={s.bits}, group_size={s.group_size}, sym={s.sym}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"
