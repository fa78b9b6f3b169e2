"""Work state of a running quantization, so that a crash, `kill -9` or Ctrl-C costs at most one block.

A work folder (the CLI puts it beside the output) holds:

    state.json                what was run (its fingerprint), how many blocks are finished, their losses and notes
    calibration.safetensors   the calibration token ids, so a resumed run neither re-reads nor re-samples text
    block-00007.safetensors   block 7's packed layers (qweight, qzeros, scales, bias)
    inputs-00008.safetensors  what enters block 8: the original model's and the quantized model's hidden states

Every file is written under a temporary name and renamed into place, and state.json is replaced last,
so whenever the process dies the folder describes a consistent set of finished blocks. Blocks are
tuned with a generator seeded by (seed, block index), so a resumed run writes the same bytes as an
uninterrupted one. Under torchrun (distributed.py) rank 0 writes the state and the blocks, and each rank
its own share of the inputs (`inputs-00008-fp-rank1.safetensors`); the state counts a block only once
every share of the next inputs is on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__, distributed
from .checkpoint import disk_full_error
from .config import RESUME_MODES
from .weights import files_digest

log = logging.getLogger("signround")

STATE_FILE = "state.json"


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def model_digest(model) -> str:
    """Config plus every tensor's name, shape, dtype and a strided sample of its values: cheap even
    for large models, and different for a different or re-converted checkpoint."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    parts = [json.dumps(config, sort_keys=True, default=str).encode()]
    for name, tensor in model.state_dict().items():
        parts.append(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if tensor.device.type != "meta" and tensor.numel():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)]
            parts.append(sample.to(torch.float64 if sample.is_floating_point() else torch.int64).cpu().numpy().tobytes())
    return _sha(*parts)


def calibration_digest(calibration) -> str:
    """Identity of a calibration source: file names, sizes and modification times for paths; content for texts and ids."""
    if calibration is None:
        return "default"
    if isinstance(calibration, torch.Tensor):
        return _sha(str(tuple(calibration.shape)).encode(), calibration.cpu().numpy().tobytes())
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if not path.exists():
            return f"name:{calibration}"
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return files_digest(files)
    return _sha(*(str(doc).encode() + b"\x00" for doc in calibration))


def fingerprint(model, config, run, tokenizer, calibration, compute: str = "", weights: str | None = None) -> dict:
    """Everything that decides the result, down to the resolved device and autocast dtype (`compute`), the
    run's cache dtype and compilation, and the torch version; a saved state is only resumed when all of it matches."""
    numerics = {"cache_dtype": run.cache_dtype, "compile": run.compile} if run is not None else {}
    settings = json.loads(json.dumps({**config.resolved().to_dict(), **numerics}, default=str))
    lazy = {"weights": weights} if weights else {}  # a lazily opened model's blocks are only on disk: its files' identity
    return {
        **lazy,
        "signround": __version__,
        "torch": torch.__version__,
        "compute": compute,
        "model": model_digest(model),
        "tokenizer": _sha(json.dumps([type(tokenizer).__name__, len(tokenizer)] if tokenizer is not None else None).encode()),
        "calibration": calibration_digest(calibration),
        **{f"setting.{k}": v for k, v in settings.items()},
    }


# Settings moved out of the fingerprint's settings (the run's device and amp are in "compute"): not compared.
MOVED_SETTINGS = ("setting.device", "setting.amp")
# Settings added after the state format was fixed, with the value that runs of earlier versions used.
ADDED_SETTINGS = {"setting.cache_dtype": "float32", "setting.recipe": "full", "setting.clip_search": False, "setting.keep": "best", "setting.mixture": None,
                  "setting.tame_outliers": False, "setting.project_clipping": False,
                  "setting.compile": False, "setting.smooth": None,
                  "setting.target_bits": None, "setting.options": None, "setting.plan": None, "setting.fuse_groups": True}


def _differences(old: dict, new: dict) -> list[str]:
    """Fields that differ, as "name (was -> now)"; a setting an older state lacks counts as what that version did."""
    changed = []
    for k in sorted((old.keys() | new.keys()) - set(MOVED_SETTINGS)):
        was, now = old.get(k, ADDED_SETTINGS.get(k)), new.get(k, ADDED_SETTINGS.get(k))
        if was != now:
            name = k.removeprefix("setting.")
            short = all(isinstance(v, (str, int, float, bool, type(None))) and len(str(v)) <= 24 for v in (was, now))
            changed.append(f"{name} ({was} -> {now})" if short else name)
    return changed


class ResumeMismatch(ValueError):
    """The work folder holds finished blocks of a different run: they are kept until the user decides."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(e, f"disk full while writing {path}: the blocks finished before it are kept in {path.parent}; "
                                  f"free some space and run the same command again to resume")
        if full:
            raise full from None
        raise


class WorkState:
    """Finished blocks of one quantization run, stored in `folder`."""

    def __init__(self, folder: Path, fingerprint: dict, finished: int = 0, block_losses=None, notes=None, tuning_seconds: float = 0.0):
        self.folder = folder
        self.fingerprint = fingerprint
        self.finished = finished
        self.block_losses: list = block_losses or []
        self.notes: list[str] = notes or []
        self.tuning_seconds = tuning_seconds
        self.writer, self.rank, self.world = distributed.is_writer(), distributed.rank(), distributed.world()

    @classmethod
    def open(cls, folder: str | os.PathLike, fingerprint: dict, resume: str = "auto") -> WorkState:
        """Continue the state in `folder` when it was made by the same run (`resume="auto"`), or
        whatever made it (`"force"`); otherwise start over in an emptied folder. Under torchrun rank 0
        decides and the other ranks then take the state it left."""
        if not distributed.is_writer():
            distributed.barrier()
            saved = json.loads((Path(folder) / STATE_FILE).read_text())
            return cls(Path(folder), fingerprint, saved["finished"], saved["block_losses"], saved["notes"], saved["tuning_seconds"])
        state = cls._open(folder, fingerprint, resume)
        distributed.barrier()
        return state

    @classmethod
    def _open(cls, folder: str | os.PathLike, fingerprint: dict, resume: str) -> WorkState:
        if resume not in RESUME_MODES:
            raise ValueError(f"resume={resume!r} is not one of {', '.join(RESUME_MODES)}")
        folder = Path(folder)
        saved = json.loads((folder / STATE_FILE).read_text()) if (folder / STATE_FILE).is_file() else None
        if saved and resume != "never":
            changed = _differences(saved["fingerprint"], fingerprint)
            if not changed or resume == "force":
                if changed:
                    log.warning("resuming %s although the run differs in: %s (forced)", folder, ", ".join(changed))
                state = cls(folder, fingerprint, saved["finished"], saved["block_losses"], saved["notes"], saved["tuning_seconds"])
                state._write_state()  # forced: from now on the state belongs to this run
                if state.finished:
                    log.warning("resuming from %s: %d blocks already finished", folder, state.finished)
                return state
            if saved["finished"]:  # finished work is never deleted unasked
                raise ResumeMismatch(f"{folder} holds {saved['finished']} finished blocks of a run that differs in {', '.join(changed)}, so they "
                                     f"cannot be reused as they are; they are kept: --resume (resume='force') continues with them anyway, "
                                     f"--restart (resume='never') discards them")
            log.warning("%s holds the state of a different run with no finished block (it differs in: %s): starting over", folder, ", ".join(changed))
        if folder.exists() and saved is None and any(folder.iterdir()):
            raise ResumeMismatch(f"work folder {folder} holds files but no {STATE_FILE}, so it is no signround work folder: "
                                 f"choose an empty or new work_dir (nothing there was touched)")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        state = cls(folder, fingerprint)
        state._write_state()
        return state

    def _write_state(self) -> None:
        if not self.writer:
            return
        record = {"fingerprint": self.fingerprint, "finished": self.finished, "block_losses": self.block_losses,
                  "notes": self.notes, "tuning_seconds": self.tuning_seconds}
        _atomic_write(self.folder / STATE_FILE, lambda p: p.write_text(json.dumps(record, indent=1)))

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if not self.writer:
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_write(self.folder / name, lambda p: save_file(tensors, p))

    def calibration(self) -> torch.Tensor | None:
        path = self.folder / "calibration.safetensors"
        return load_file(path)["input_ids"] if path.is_file() else None

    def save_calibration(self, ids: torch.Tensor) -> None:
        self._save("calibration.safetensors", {"input_ids": ids})

    def plan(self) -> dict | None:
        """The bit-budget plan an earlier run of this state searched (layer -> scheme fields, None: 16-bit)."""
        path = self.folder / "plan.json"
        return json.loads(path.read_text())["layers"] if path.is_file() else None

    def plan_summary(self) -> str:
        return json.loads((self.folder / "plan.json").read_text())["summary"]

    def save_plan(self, layers: dict, summary: str) -> None:
        if self.writer:
            _atomic_write(self.folder / "plan.json", lambda p: Path(p).write_text(json.dumps({"layers": layers, "summary": summary}, indent=1)))

    def save_block(self, index: int, tensors: dict[str, torch.Tensor], fp_next, q_next, losses: tuple, notes: list[str], seconds: float) -> None:
        """Record block `index` as finished: its tensors, the caches of the next block's inputs (cache.py), then the state."""
        self._save(f"block-{index:05d}.safetensors", tensors)
        if fp_next is not None:
            for stream, cache in (("fp", fp_next), ("q", q_next)):
                _atomic_write(self.folder / self._inputs_name(index + 1, stream), cache.save)
        distributed.barrier()  # every rank's share of the next inputs is on disk before the state counts the block
        self.finished = index + 1
        self.block_losses.append(list(losses))
        self.notes.extend(notes)
        self.tuning_seconds += seconds
        self._write_state()
        distributed.barrier()  # ... and the state counts it before any rank lets its share of this block's inputs go
        for name in [self._inputs_name(index, stream) for stream in ("fp", "q")] + [f"inputs-{index:05d}.safetensors"]:
            (self.folder / name).unlink(missing_ok=True)  # the last: one file of both streams, as earlier versions wrote

    def _inputs_name(self, index: int, stream: str) -> str:
        return f"inputs-{index:05d}-{stream}{f'-rank{self.rank}' if self.world > 1 else ''}.safetensors"

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(self.folder / f"block-{index:05d}.safetensors")

    def inputs(self, caches):
        """(original, quantized) caches of the hidden states entering the first unfinished block, made by `caches` (cache.CacheFactory)."""
        both = self.folder / f"inputs-{self.finished:05d}.safetensors"
        if both.is_file():
            saved = load_file(both)
            return caches.from_tensor(saved["fp"]), caches.from_tensor(saved["q"])
        return tuple(caches.load(self.folder / self._inputs_name(self.finished, stream)) for stream in ("fp", "q"))


def finished_blocks(folder: str | os.PathLike, model):
    """The finished blocks of `model`'s run in `folder` as one weight source, by full tensor name (for
    `save` and `weights.materialize_blocks` after a lazily opened model was quantized)."""
    from .blocks import find_blocks
    from .weights import MultiSource, SafetensorsSource

    folder = Path(folder)
    blocks_name = find_blocks(model)[0]
    finished = json.loads((folder / STATE_FILE).read_text())["finished"]
    return MultiSource([SafetensorsSource([folder / f"block-{i:05d}.safetensors"], prefix=f"{blocks_name}.{i}.") for i in range(finished)])


def describe(folder: str | os.PathLike) -> str:
    """One line on what an interrupted run left in `folder`."""
    path = Path(folder) / STATE_FILE
    finished = json.loads(path.read_text())["finished"] if path.is_file() else 0
    return f"{finished} finished block{'s' if finished != 1 else ''} kept in {folder}"


def default_work_dir(output: str | os.PathLike) -> Path:
    """Where the CLI keeps the state of a run writing to `output`: beside it, named after it."""
    out = Path(output).resolve()
    return out.parent / f"{out.name}.signround-work"
