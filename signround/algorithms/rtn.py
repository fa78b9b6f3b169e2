"""Round to nearest: no calibration, the baseline every other method starts from."""

from __future__ import annotations

from ..blocks import linear_weight
from ..quant.integer import quantize_weight
from .base import BlockResult, register


@register("rtn")
class RTN:
    needs_calibration = False

    def quantize_block(self, block, layers, data, config) -> BlockResult:
        weights = {}
        for task in layers:
            s = task.scheme
            weights[task.name] = quantize_weight(linear_weight(task.module).detach(), s.bits, s.group_size, s.sym)
        return BlockResult(weights)
