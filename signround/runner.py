"""`run(model, output, config)`: the whole job in one call, as `signround quantize` does it.

Open the model (block by block where its files allow), check everything that can be checked before any
tuning (output folder, calibration files, formats, disk space), quantize with a resumable work folder
beside the output, save or export atomically, then drop the work folder. A crash or Ctrl-C leaves the
finished blocks in the work folder: the same call continues from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch

from . import checkpoint, distributed
from .algorithms import needs_calibration
from .calibration import DataError, check_hub_dataset, check_source, documents_from, is_hub_name
from .config import ConfigError, QuantConfig, RunConfig
from .evaluate import check_eval_text, perplexity, text_token_ids, use_bos
from .export import NATIVE, check_formats, export, fused_by, get_format, held_options
from .pipeline import QuantizeReport, calibration_seqlen, planned_layers, quantize
from .resume import default_work_dir, describe, finished_blocks
from .search import default_options
from .weights import StreamingUnsupported, materialize_blocks, open_lazy

log = logging.getLogger("signround")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during tuning; the message says what was kept and how to continue."""


def run(model, output: str | os.PathLike, config: QuantConfig | None = None, run_config: RunConfig | None = None, *,
        calibration=None, formats=(NATIVE,), tokenizer=None, eval_text: str | os.PathLike | None = None, eval_tokens: int = 32768,
        eval_seqlen: int = 2048, overwrite: bool = False, save_dtype: str = "auto", stream: bool = True,
        trust_remote_code: bool = False, allow_pickle: bool = False, on_block_done=None) -> QuantizeReport:
    """Quantize `model` and write it to `output`; returns the report (also listing what was written).

    `model`: a built-in name, a local Hugging Face folder, a .gguf file or a hub id (or a loaded model, with
    `tokenizer`). `calibration`: text files or folders (one path or a list), a hub dataset name, a list of
    texts, token ids, "self" (text the model samples) or None (the default hub dataset online, text the
    package ships offline). `formats`: one writes `output` in that format; several write `output/<format>/`
    each. `eval_text`: also score perplexity on this file before and after (loads the model whole).
    `stream`: read a local safetensors folder or LLaMA/Gemma-3 GGUF one block at a time, finished blocks going to
    the work folder, so memory holds about one block.
    """
    config = config or QuantConfig()
    run_config = run_config or RunConfig()
    formats = _check_formats_named(formats)
    checkpoint.check_output_dir(output, overwrite)
    calibration = _calibration_source(calibration)
    if eval_text is not None:
        check_eval_text(str(eval_text))
    calibrates = needs_calibration(config)
    lazy = stream and eval_text is None and not (calibrates and calibration == "self")  # sampling text needs the whole model
    model, tokenizer, weights = _open(model, tokenizer, lazy, trust_remote_code, allow_pickle)
    if config.target_bits is not None and config.options is None:  # llama.cpp's types for GGUF; what the formats asked for can store
        config = dataclasses.replace(config, options=held_options(formats, model, config, default_options(formats)))
    if config.target_bits is not None and config.fuse_groups is True:  # only what the outputs' runtimes run as one
        config = dataclasses.replace(config, fuse_groups=fused_by(formats))
    planned = planned_layers(model, config)
    check_formats(formats, model, config, planned)
    work = Path(run_config.work_dir) if run_config.work_dir else default_work_dir(output)
    seqlen = calibration_seqlen(model, config) if calibrates else 0
    checkpoint.check_disk_space(work.parent, *checkpoint.expected_sizes(model, planned, config.nsamples, seqlen))
    scored = text_token_ids(tokenizer, eval_text, eval_tokens) if eval_text is not None else None
    bos = tokenizer.bos_token_id if use_bos(tokenizer, "auto") else None  # as `signround eval` scores it
    before = perplexity(model, scored, seqlen=eval_seqlen, bos_token_id=bos) if scored is not None else None
    try:
        with _threads(run_config.threads):
            report = quantize(model, config, dataclasses.replace(run_config, work_dir=str(work)), tokenizer=tokenizer,
                              calibration=calibration, weights=weights, on_block_done=on_block_done)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {describe(work)}; run the same command again to resume") from None
    if scored is not None:
        report.perplexity = (before, perplexity(model, scored, seqlen=eval_seqlen, bos_token_id=bos))
    if distributed.is_writer():  # under torchrun rank 0 writes; the others wait until it has
        finished = finished_blocks(work, model) if weights is not None else None  # a streamed run's finished blocks are on disk
        if finished is not None and formats != [NATIVE]:  # exporters work on the packed model in memory
            materialize_blocks(model, finished)
        report.outputs = [str(p) for p in _write(model, tokenizer, output, formats, overwrite, save_dtype, finished, work)]
        shutil.rmtree(work)
    distributed.barrier()
    return report


def _check_formats_named(formats) -> list[str]:
    formats = [formats] if isinstance(formats, str) else list(formats)
    if not formats:
        raise ConfigError("no output format given: use signround (the default), auto_round, awq, gptq, compressed-tensors or gguf")
    if len(set(formats)) != len(formats):
        raise ConfigError(f"format listed twice in {', '.join(formats)}: give each once")
    for name in formats:
        if name != NATIVE:
            get_format(name)
    return formats


def _calibration_source(source):
    """Local files are read now, so that an unusable one fails before the model loads. A string is a path,
    a hub dataset name or "self"; a list holds paths (`Path`s, as the CLI gives) or texts (strings);
    token ids pass as they are."""
    if source is None or isinstance(source, torch.Tensor) or (isinstance(source, str) and source == "self"):
        return source
    if not isinstance(source, (str, os.PathLike, list, tuple)):
        raise DataError(f"calibration of type {type(source).__name__} is not understood: give a path, a hub dataset name, "
                        f"a list of paths or of texts, or token ids")
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not all(isinstance(s, (str, os.PathLike)) for s in items):
        raise DataError("a calibration list must hold paths or texts (strings)")
    if all(isinstance(s, str) for s in items) and not isinstance(source, str) and not all(_is_file(s) for s in items):
        return items  # texts
    paths = [str(s) for s in items]
    for p in paths:
        check_source(p)
    hub = [p for p in paths if is_hub_name(p)]
    if hub:
        if len(paths) > 1:
            raise DataError(f"give one hub dataset or local files, not both: {', '.join(paths)}")
        check_hub_dataset(hub[0])
        return hub[0]
    docs = [doc for p in paths for doc in documents_from(p)]
    if not any(doc.strip() for doc in docs):
        raise DataError(f"calibration data {', '.join(paths)} is empty: give files with text in them")
    return docs


def _is_file(text: str) -> bool:
    """Whether a string names an existing file or folder (a long text can be no file name at all)."""
    try:
        return Path(text).exists()
    except OSError:
        return False


def _open(spec, tokenizer, lazy: bool, trust_remote_code: bool, allow_pickle: bool):
    """(model, tokenizer, weights): opened lazily (blocks read from `weights` one at a time) where the
    checkpoint allows it and `lazy` is set, else loaded whole (weights None)."""
    from . import models

    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("a model passed as a module needs its tokenizer: run(model, output, tokenizer=tokenizer)")
        return spec, tokenizer, None
    spec, given = str(spec), tokenizer  # a tokenizer passed with a model name replaces the model's own
    if lazy:
        try:
            model, tokenizer, weights = open_lazy(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
            return model, given or tokenizer, weights
        except StreamingUnsupported as e:
            log.info("loading %s whole: %s", spec, e)
    model, tokenizer = models.load(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return model, given or tokenizer, None


def _write(model, tokenizer, output, formats: list[str], overwrite: bool, save_dtype: str, finished, work: Path) -> list[Path]:
    """Save or export; one format is the output folder itself, several each get output/<format>/."""
    try:
        if formats == [NATIVE]:
            return [checkpoint.save(model, output, tokenizer, overwrite=overwrite, save_dtype=save_dtype, weights=finished)]
        if len(formats) == 1:
            return [export(model, tokenizer, output, formats[0], overwrite=overwrite)]
        with checkpoint.atomic_folder(output, overwrite) as tmp:
            for name in formats:
                export(model, tokenizer, tmp / name, name)
        return [Path(output).resolve() / name for name in formats]
    except checkpoint.DiskFullError as e:
        kept = f"the finished quantization is kept in {work}: the same command saves it without tuning again"
        raise checkpoint.DiskFullError(e.errno, f"{e.strerror}; {kept}") from None


@contextlib.contextmanager
def _threads(count: int | None):
    """torch's intra-op thread count for the run, restored after it."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
