"""Registry of weight-rounding algorithms. Adding one means one new file with a `@register` class."""

from __future__ import annotations

from .base import Algorithm, BlockData, BlockResult, LayerTask, available, get_algorithm, register
from . import rtn, signround  # noqa: F401  (their @register calls fill the registry)

__all__ = ["Algorithm", "BlockData", "BlockResult", "LayerTask", "available", "get_algorithm", "register"]
