"""The hidden states cached between blocks: (samples, seqlen, hidden) per stream, read a batch of rows at
a time. They can be kept in a narrower dtype (bf16 halves them) and/or in a file on disk, so that with a
streamed model memory holds little more than one block and the batch being tuned.

A disk cache is a safetensors file holding one tensor `hidden`, written row range by row range and read
with positioned reads (no memory map, so nothing stays resident); the resumable work state keeps such
files as they are.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_TORCH_DTYPE = {v: k for k, v in _ST_DTYPE.items()}
KEY = "hidden"
CACHE_FILES = "cache-*.safetensors"


class MemoryCache:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @classmethod
    def empty(cls, shape, dtype, device) -> MemoryCache:
        return cls(torch.empty(shape, dtype=dtype, device=device))

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def rows(self, index) -> torch.Tensor:
        """Rows `index` (a slice or index tensor) in fp32, where the cache lives."""
        return self.tensor[index].float()

    def write(self, start: int, values: torch.Tensor) -> None:
        self.tensor[start:start + values.shape[0]] = values.to(self.tensor.device, self.tensor.dtype)

    def save(self, path: Path) -> None:
        save_file({KEY: self.tensor.cpu().contiguous()}, path)

    def discard(self) -> None:
        self.tensor = None


class DiskCache:
    def __init__(self, path: Path, shape, dtype: torch.dtype, data_start: int, owned: bool = True):
        self.path, self.shape, self.dtype, self.data_start = Path(path), torch.Size(shape), dtype, data_start
        self.owned = owned  # a file of the work state is read, never deleted
        self.row_bytes = self.shape[1:].numel() * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def empty(cls, path: Path, shape, dtype) -> DiskCache:
        """A safetensors file of the right size whose rows are filled in by `write`."""
        shape = tuple(int(s) for s in shape)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header = json.dumps({KEY: {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + nbytes)
        return cls(path, shape, dtype, 8 + len(header))

    @classmethod
    def open(cls, path: Path) -> DiskCache:
        """A cache file written earlier (by `empty` + `write`, or by `MemoryCache.save`)."""
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            entry = json.loads(f.read(length))[KEY]
        return cls(path, entry["shape"], _TORCH_DTYPE[entry["dtype"]], 8 + length + entry["data_offsets"][0], owned=False)

    def rows(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = range(*index.indices(self.shape[0]))
        out = torch.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        buffer = out.view(torch.uint8).reshape(len(index), self.row_bytes).numpy()
        with open(self.path, "rb", buffering=0) as f:
            for k, row in enumerate(index):
                f.seek(self.data_start + int(row) * self.row_bytes)
                f.readinto(memoryview(buffer[k]))
        return out.float()

    def write(self, start: int, values: torch.Tensor) -> None:
        data = values.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy().tobytes()
        with open(self.path, "r+b") as f:
            f.seek(self.data_start + start * self.row_bytes)
            f.write(data)

    def save(self, path: Path) -> None:
        """Keep this file under `path` too (a hard link where the filesystem allows)."""
        tmp = Path(path).with_name(f".{Path(path).name}.link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.path, tmp)
        except OSError:
            import shutil

            shutil.copyfile(self.path, tmp)
        os.replace(tmp, path)

    def discard(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)


HiddenCache = MemoryCache | DiskCache


class CacheFactory:
    """Makes the caches of one run: in memory on `device`, or files in `folder` when offloading."""

    def __init__(self, dtype: torch.dtype, device, folder: Path | None = None):
        self.dtype, self.device, self.folder = dtype, device, Path(folder) if folder else None
        self.count = 0

    def empty(self, shape):
        if self.folder is None:
            return MemoryCache.empty(shape, self.dtype, self.device)
        self.count += 1
        return DiskCache.empty(self.folder / f"cache-{os.getpid()}-{self.count:05d}.safetensors", shape, self.dtype)

    def from_tensor(self, tensor: torch.Tensor):
        cache = self.empty(tensor.shape)
        cache.write(0, tensor)
        return cache

    def load(self, path: Path):
        """A cache saved by `save` (kept by the work state); read in place when offloading."""
        if self.folder is not None:
            return DiskCache.open(path)
        return MemoryCache(load_file(path)[KEY].to(self.device, self.dtype))
