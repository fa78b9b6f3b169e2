"""What an algorithm receives for one block and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..blocks import BlockCall, linear_weight
from ..cache import HiddenCache
from ..config import ConfigError, QuantConfig, WeightScheme
from ..distributed import Shard
from ..experts import ExpertMatrix, read
from ..quant.integer import QuantizedWeight


@dataclass
class LayerTask:
    """One weight matrix to quantize: its name inside the block, the module holding it and its scheme.
    A linear layer's weight, or with `expert` one expert's projection inside the stacked parameter of an
    experts module (`mlp.experts.3.gate_proj`); `weight()` gives either as a plain (out, in) matrix.
    `input_scale`: for an input format with a calibrated scale (NVFP4), the one the pipeline set from the
    calibration inputs before the block is quantized."""

    name: str
    module: nn.Module
    scheme: WeightScheme
    expert: ExpertMatrix | None = None
    input_scale: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        return read(self.module, self.expert) if self.expert else linear_weight(self.module)


@dataclass
class BlockData:
    """Calibration data for one block: `inputs` to tune on, `targets` the original block produced (caches
    of (samples, seqlen, hidden) read with `.rows(index)` in fp32, see cache.py), and how the block is
    called; `device` is where to compute; `blocks` how many blocks the model has (the run's length).
    `shard`: under torchrun, which of the calibration rows this process holds (distributed.py); the caches
    hold those alone."""

    inputs: HiddenCache
    targets: HiddenCache
    call: BlockCall
    device: torch.device
    amp_dtype: torch.dtype | None
    index: int
    blocks: int = 1
    compiled: bool = False  # run the tuning step through torch.compile (RunConfig.compiles decides)
    shard: Shard | None = None

    def rows(self) -> Shard:
        """This process's share of the calibration rows: all of them outside torchrun."""
        return self.shard or Shard(0, 1, self.inputs.shape[0])


@dataclass
class BlockResult:
    weights: dict[str, QuantizedWeight]
    loss_before: float | None = None   # block loss (`block_loss`) at the plain-RTN starting point
    loss_rows: int | None = None       # ... over the first this many calibration rows (None: all)
    notes: list[str] = field(default_factory=list)
    steps: int = 0                     # optimiser steps taken


def block_loss(output: torch.Tensor, target: torch.Tensor, tame_outliers: bool) -> torch.Tensor:
    """Mean squared error of the block output over tokens and channels, optionally with each token
    weighted by min(1, median token energy / its energy). A pre-norm model reads every token through a
    norm, so an error matters relative to the token's size; yet in SmolLM2's blocks 11-27 36-96% of
    the plain MSE is the first token's, whose hidden state (an attention sink) has 10^3-10^4 times a
    typical token's energy (benchmarks/token_errors.py). Typical tokens keep weight 1. Off by default:
    no gain shown yet (W4A16, SmolLM2: 21.43 against 21.48, on a since-reverted variant of the loop)."""
    err = (output - target).pow(2).mean(-1)
    if not tame_outliers:
        return err.mean()
    energy = target.pow(2).mean(-1)
    weight = (energy.median() / energy.clamp(min=torch.finfo(energy.dtype).tiny)).clamp(max=1)
    return (err * weight).mean()


class Algorithm(Protocol):
    name: str
    needs_calibration: bool

    def quantize_block(self, block: nn.Module, layers: list[LayerTask], data: BlockData | None, config: QuantConfig) -> BlockResult: ...


_REGISTRY: dict[str, type] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def needs_calibration(config: QuantConfig) -> bool:
    """Whether a run reads calibration data: for its algorithm, or for its layers' calibrated input scales."""
    return get_algorithm(config.method).needs_calibration or config.calibrates_inputs()


def get_algorithm(name: str) -> Algorithm:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(available())}")
    return _REGISTRY[name]()
