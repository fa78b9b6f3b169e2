"""Hidden-state caches: rows read back as written, in memory or on disk, and disk files are valid safetensors."""

import pytest
import torch
from safetensors.torch import load_file

from signround.cache import CACHE_DTYPES, CacheFactory, DiskCache, MemoryCache


@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
@pytest.mark.parametrize("on_disk", [False, True])
def test_rows_read_back_as_written(tmp_path, dtype, on_disk):
    values = torch.randn(7, 5, 3)
    caches = CacheFactory(CACHE_DTYPES[dtype], "cpu", tmp_path if on_disk else None)
    cache = caches.empty(values.shape)
    cache.write(0, values[:4])
    cache.write(4, values[4:])
    expected = values.to(CACHE_DTYPES[dtype]).float()
    assert torch.equal(cache.rows(slice(2, 6)), expected[2:6])
    index = torch.tensor([6, 0, 3])
    assert torch.equal(cache.rows(index), expected[index])
    assert cache.rows(index).dtype == torch.float32
    saved = tmp_path / "saved.safetensors"
    cache.save(saved)
    assert torch.equal(load_file(saved)["hidden"].float(), expected)
    again = caches.load(saved)
    assert torch.equal(again.rows(slice(None)), expected)


def test_disk_cache_owns_only_its_own_files(tmp_path):
    cache = DiskCache.empty(tmp_path / "c.safetensors", (2, 3), torch.float32)
    cache.write(0, torch.ones(2, 3))
    cache.save(tmp_path / "kept.safetensors")
    reopened = DiskCache.open(tmp_path / "kept.safetensors")
    reopened.discard()
    assert (tmp_path / "kept.safetensors").is_file(), "a cache opened from the work state is never deleted"
    cache.discard()
    assert not (tmp_path / "c.safetensors").exists()
    assert torch.equal(reopened.rows(slice(None)), torch.ones(2, 3))


def test_memory_cache_keeps_its_dtype():
    cache = MemoryCache.empty((2, 4), torch.bfloat16, "cpu")
    cache.write(0, torch.full((2, 4), 1 / 3))
    assert cache.tensor.dtype == torch.bfloat16
    assert torch.equal(cache.rows(slice(None)), torch.full((2, 4), 1 / 3).to(torch.bfloat16).float())
