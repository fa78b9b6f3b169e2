"""Data-parallel tuning over torch.distributed (`torchrun --nproc-per-node N -m signround quantize ...`).

Every rank opens the same model and tunes the same blocks; the calibration rows are dealt out round-robin
(rank r holds global rows r, r + N, r + 2N, ...), so each rank caches and runs only its share. A step's batch
is drawn from the global rows exactly as in one process; each rank takes the rows of it that it holds, and the
gradients of the rounding and clipping parameters, the losses and the statistics the algorithm reads are
summed over the ranks before anyone uses them. Every rank therefore holds the same parameters after every
step, and the result is the one-process result up to the order of float sums. Rank 0 writes the output, the
work state and the exports; each rank keeps its own share of the cached hidden states in the work folder.
Backends: NCCL on GPUs (a rank per GPU, `LOCAL_RANK`), gloo on CPUs. Outside torchrun nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes files (the output, the work state): rank 0, or the only process."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (once per process) and return this rank's device:
    with CUDA, the GPU `LOCAL_RANK` names."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


@dataclass(frozen=True)
class Shard:
    """This rank's share of `total` calibration rows: global rows rank, rank + world, ..."""

    rank: int
    world: int
    total: int

    def __post_init__(self):
        if self.total < self.world:
            raise ConfigError(f"{self.total} calibration rows for {self.world} processes: every process needs one at least "
                              f"(raise nsamples or use fewer processes)")

    @property
    def count(self) -> int:
        return len(range(self.rank, self.total, self.world))

    def held(self, rows: torch.Tensor) -> torch.Tensor:
        """The local indices of those global `rows` this rank holds, in their order."""
        mine = rows[rows % self.world == self.rank]
        return torch.div(mine, self.world, rounding_mode="floor")

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids[self.rank :: self.world]


def shard(total: int) -> Shard:
    return Shard(rank(), world(), total)


def sum_(tensors, op: str = "sum") -> None:
    """Sum (or with op="max", take the maximum of) each tensor over the ranks, in place (a no-op in one process)."""
    if active():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)


def sum_float(value: float, device: torch.device) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def broadcast(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rank 0's tensor on every rank (its shape first): the calibration rows all ranks deal out."""
    if not active():
        return ids
    shape = torch.tensor(ids.shape if rank() == 0 else [0] * ids.dim(), dtype=torch.int64, device=device)
    dist.broadcast(shape, src=0)
    out = ids.to(device) if rank() == 0 else torch.empty(tuple(shape.tolist()), dtype=ids.dtype, device=device)
    dist.broadcast(out, src=0)
    return out.to(ids.device)


def share(obj, device: torch.device):
    """Rank 0's JSON-serialisable `obj` on every rank (what the other ranks pass is ignored)."""
    if not active():
        return obj
    import json

    data = torch.tensor(list(json.dumps(obj).encode()) if rank() == 0 else [0], dtype=torch.uint8)
    return json.loads(bytes(broadcast(data, device).tolist()).decode())


def barrier() -> None:
    if active():
        dist.barrier()
