"""Registry of weight-rounding algorithms. Adding one means one new file with a `@register` class."""

from __future__ import annotations

from . import rtn, signround  # noqa: F401  (their @register calls fill the registry)
from .base import Algorithm, BlockData, BlockResult, LayerTask, available, block_loss, get_algorithm, needs_calibration, register

__all__ = ["Algorithm", "BlockData", "BlockResult", "LayerTask", "available", "block_loss", "get_algorithm", "needs_calibration", "register"]
