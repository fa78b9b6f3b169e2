"""Round to nearest: no calibration, the baseline every other method starts from."""

from __future__ import annotations

from .base import BlockResult, register


@register("rtn")
class RTN:
    needs_calibration = False

    def quantize_block(self, block, layers, data, config) -> BlockResult:
        return BlockResult({task.name: task.scheme.quantize(task.weight().detach()) for task in layers})
