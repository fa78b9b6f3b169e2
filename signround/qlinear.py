"""The runtime layer of the tool's own format: packed weights, dequantized on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import WeightScheme
from .hardware import cpu_has_fast_bf16
from .quant import fp
from .quant.formats import ACTIVATIONS, quantize_activations
from .quant.fp import FPQuantized
from .quant.integer import QuantizedWeight, group_size_for, token_scales
from .quant.kquant import SUPER_BLOCK, KQuantized
from .quant.packing import pack_qweight, pack_qzeros, packed_rows, unpack_qweight, unpack_qzeros

_FP_SCALE_DTYPES = {"fp32": torch.float32, "e8m0": torch.uint8, "e4m3": torch.float8_e4m3fn}


class QuantLinear(nn.Module):
    """A linear layer stored as GPTQ-style buffers: `qweight` (packed in, out) int32, `qzeros`
    (groups, packed out) int32, `scales` (groups, out) fp16, optional `bias`.

    The weight is rebuilt in the input's dtype at each call, so memory holds only the packed form (on a
    GPU a slice at a time; 4-bit layers decode through torch's int4 kernels instead). A K-quant scheme
    stores its scales as llama.cpp does instead of `qzeros` and `scales`: `super_scales` (in/256, out)
    fp16 and `scale_codes` (groups, out) int8, and for the asymmetric types `super_mins` fp16 and
    `min_codes` uint8 alike. A floating-point scheme stores rows as compressed-tensors does: `qweight`
    (out, in) uint8 codes (4-bit ones two a byte, the even one low), `scales` (out, groups) as the format
    stores them (fp32, E8M0 exponent bytes, float8_e4m3fn) and NVFP4's fp32 `global_scale`. Inputs in a
    format with a calibrated scale (NVFP4) keep it as the fp32 `input_global_scale`.
    """

    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme, bias: bool, dtype=torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        groups = scheme.groups(in_features)
        if scheme.act and ACTIVATIONS[scheme.act].calibrated:
            self.register_buffer("input_global_scale", torch.ones((), dtype=torch.float32, device=device))
        if scheme.fp:
            t = scheme.fptype
            self.register_buffer("qweight", torch.zeros(out_features, in_features * t.element.bits // 8, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=_FP_SCALE_DTYPES[t.scale], device=device))
            if t.scale == "e4m3":
                self.register_buffer("global_scale", torch.ones((), dtype=torch.float32, device=device))
            return self._bias(bias, out_features, dtype, device)
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
        self._bias(bias, out_features, dtype, device)

    def _load_from_state_dict(self, *args, **kwargs):
        """New buffers: the kernels' copies built from the old ones (int4 repacked, int8 transposed) go."""
        self.__dict__.pop("_int4_cache", None)
        self.__dict__.pop("_int8_cache", None)
        super()._load_from_state_dict(*args, **kwargs)

    def _bias(self, bias: bool, out_features: int, dtype, device) -> None:
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight | KQuantized, scheme: WeightScheme, bias: torch.Tensor | None,
                       input_global_scale: torch.Tensor | None = None) -> QuantLinear:
        """`input_global_scale`: the calibrated input scale, for input formats that have one."""
        out_features, in_features = qw.codes.shape
        layer = cls(in_features, out_features, scheme, bias is not None, device=qw.codes.device)
        if hasattr(layer, "input_global_scale"):
            if input_global_scale is None:
                raise ValueError(f"{scheme.name()} inputs need the layer's calibrated global scale")
            layer.input_global_scale.copy_(input_global_scale)
        if scheme.fp:
            layer.qweight.copy_(fp.pack_fp4(qw.codes) if scheme.bits == 4 else qw.codes)
            layer.scales.copy_(qw.scale)
            if qw.global_scale is not None:
                layer.global_scale.copy_(qw.global_scale)
        elif scheme.kquant:
            layer.qweight.copy_(pack_qweight(qw.codes, scheme.bits))
            layer.super_scales.copy_(qw.d.t())
            layer.scale_codes.copy_(qw.sc.t())
            if not scheme.sym:
                layer.super_mins.copy_(qw.dmin.t())
                layer.min_codes.copy_(qw.m.t())
        else:
            layer.qweight.copy_(pack_qweight(qw.codes, scheme.bits))
            layer.qzeros.copy_(pack_qzeros(qw.zero, scheme.bits))
            layer.scales.copy_(qw.scale.t())
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def quantized_weight(self, rows: slice = slice(None)) -> QuantizedWeight | KQuantized | FPQuantized:
        """The codes and scales, unpacked, in the format's stored form (`scheme.format`). `rows`: output
        features from a multiple of 32 on (where the packed zero points start a word), e.g. for one slice at a time."""
        start, stop, _ = rows.indices(self.out_features)
        bits, cols = self.scheme.bits, slice(start, stop)
        if self.scheme.fp:
            codes = self.qweight[cols]
            return FPQuantized(fp.unpack_fp4(codes) if bits == 4 else codes, self.scales[cols],
                               getattr(self, "global_scale", None), self.scheme.fptype)
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
        return self.scheme.dequantize(self.quantized_weight(rows), dtype)

    def exact_dtypes(self) -> dict[str, torch.dtype]:
        """Buffers that keep their stored dtype whatever dtype the model runs or is saved in (the scales)."""
        names = ("scales", "global_scale") if self.scheme.fp else ("super_scales", "super_mins") if self.scheme.kquant else ("scales",)
        names += ("input_global_scale",)
        return {n: getattr(self, n).dtype for n in names if getattr(self, n, None) is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._int8_fits(x):
            return self._int8_forward(x, bias)
        if self.scheme.act:  # the input quantized as the serving runtime does (simulated: the matmul stays in x's dtype)
            x = quantize_activations(x, self.scheme.act, getattr(self, "input_global_scale", None))
        if self._int4_fits(x):
            return self._int4_forward(x, bias)
        if x.device.type == "cuda":
            return self._sliced_forward(x, bias)
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not cpu_has_fast_bf16():
            # 16-bit matmuls are emulated on such CPUs (several times slower than fp32): compute in fp32
            return F.linear(x.float(), self.dequantized_weight(torch.float32), None if bias is None else bias.float()).to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _int8_fits(self, x: torch.Tensor) -> bool:
        """W8A8 (int8 weights per channel, int8 inputs per token) on the CPU: torch's int8 matmul, 1.6-2.4x an
        fp32 one on 2 EPYC cores (benchmarks/inference.py)."""
        s = self.scheme
        return (self.INT8_MATMUL and x.device.type == "cpu" and s.kind == "int" and s.act == "INT8" and s.bits == 8 and s.sym
                and s.group_size == -1 and hasattr(torch, "_int_mm") and not (torch.is_grad_enabled() and x.requires_grad))

    INT8_MATMUL = True  # False on a layer: the simulated W8A8 (dequantized weight, inputs rounded to x's dtype), for comparison

    def _int8_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The inputs quantized per token as `integer.fake_quant_tokens` does (|x|max / 127), multiplied as int8
        codes with int32 accumulation, then scaled: the simulated path's numbers without its rounding to x's dtype."""
        rows = x.reshape(-1, self.in_features).float()
        scale = token_scales(rows, 8)
        codes = torch.round(rows / scale).clamp(-128, 127).to(torch.int8)
        weight, weight_scale = self._int8_weights()
        y = (torch._int_mm(codes, weight).float() * scale * weight_scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _int8_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed int8 codes (in, out) and fp32 channel scales (out,), built on first use, not saved."""
        if "_int8_cache" not in self.__dict__:
            qw = self.quantized_weight()
            self.__dict__["_int8_cache"] = ((qw.codes.int() - qw.zero.int()).to(torch.int8).t().contiguous(), qw.scale.float().reshape(-1))
        return self.__dict__["_int8_cache"]

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
        if not (self.scheme.kind == "int" and self.scheme.bits == 4 and x.dtype == torch.bfloat16 and x.numel() // self.in_features <= self.INT4_MAX_ROWS
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
        kind = f"bits={s.bits}, group_size={s.group_size}, sym={s.sym}" + (f", act={s.act}" if s.act else "") if s.kind == "int" else s.name()
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"
