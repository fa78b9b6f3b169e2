"""Calibration data: text from files, folders, lists or hub datasets, packed into (nsamples, seqlen)
token rows; when the default hub dataset is unreachable, public-domain books shipped in signround/data."""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import DEFAULT_DATASET
from .hub import hub_reachable, looks_like_hub_id

log = logging.getLogger("signround")

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
SELF = "self"  # the calibration source that samples text from the model itself
DATA_DIR = Path(__file__).resolve().parent / "data"
SHIPPED_TEXTS = ("calibration.txt", "heldout.txt")
CHARS_PER_TOKEN_BOUND = 8  # a window of seqlen * 8 characters always holds seqlen tokens of real text


class DataError(ValueError):
    """Calibration data that cannot be used; the message names the file and the fix."""


def shipped_text(name: str) -> Path:
    """A public-domain text shipped with the package, so calibration and a held-out perplexity work offline."""
    if name not in SHIPPED_TEXTS:
        raise DataError(f"no shipped text {name!r}: choose one of {', '.join(SHIPPED_TEXTS)}")
    path = DATA_DIR / name
    if not path.is_file():
        raise DataError(f"shipped text {path} is missing: reinstall signround")
    return path


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8, else cp1252 (what most "Latin-1" text really is), else Latin-1, which decodes any bytes.
    A guessed encoding may garble a few characters, which calibration tolerates; it is said, not hidden."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text, encoding = raw.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        text, encoding = raw.decode("latin-1"), "latin-1"
    warnings.warn(f"calibration file {path} is not UTF-8; read as {encoding}")
    return text


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError(f"calibration file {path} looks binary: give UTF-8 text (.txt), .jsonl with a 'text' field, or .parquet")
    text = _decode(path, raw)
    if not text.strip():
        raise DataError(f"calibration file {path} is empty: give it text, or remove it")
    return text


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}): each line must be a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{lineno} has no string field {field!r}: each line must look like {{\"{field}\": \"...\"}}")
        docs.append(record[field])
    return docs


def _read_parquet(path: Path, field: str = "text") -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'signround[data]'") from None
    table = pq.read_table(path)
    if field not in table.column_names:
        raise DataError(f"{path} has no column {field!r} (columns: {', '.join(table.column_names)})")
    return [t for t in table.column(field).to_pylist() if isinstance(t, str)]


def read_documents(path: Path) -> list[str]:
    """Documents from one file, or from every supported file in a folder (sorted by name). Text that is not
    UTF-8 is read as cp1252 or Latin-1 with a warning: old books often are, and one should not refuse a folder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"calibration folder {path} holds no .txt, .jsonl or .parquet files")
        return [doc for f in files for doc in read_documents(f)]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    return [_read_text_file(path)]


def _hub_documents(name: str, nsamples: int, seed: int) -> list[str]:
    import datasets  # optional extra: signround[data]

    ds = datasets.load_dataset(name, split="train")
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    ds = ds.shuffle(seed=seed).select(range(min(len(ds), nsamples * 8)))
    return [t for t in ds[column] if isinstance(t, str)]


def is_hub_name(source: str) -> bool:
    path = Path(source)
    return source != SELF and not path.exists() and looks_like_hub_id(source) and path.suffix not in TEXT_SUFFIXES


def check_hub_dataset(name: str) -> None:
    """Before a model loads: a hub dataset needs the `datasets` extra and a reachable hub."""
    try:
        import datasets  # noqa: F401  (optional extra: signround[data])
    except ImportError:
        raise DataError(f"calibration dataset {name!r} is read with the datasets package: pip install 'signround[data]', "
                        f"or give local .txt/.jsonl/.parquet files") from None
    if not hub_reachable():
        raise DataError(f"calibration dataset {name!r} is on the Hugging Face hub, which is not reachable from here: "
                        f"give local files, or leave --dataset out to use the text shipped with signround")


def check_source(source) -> None:
    """Fail fast, before a model is loaded, on a calibration path that does not exist."""
    if isinstance(source, str) and source != SELF and not Path(source).exists() and not is_hub_name(source):
        raise DataError(f"calibration data {source!r} not found: give a .txt/.jsonl/.parquet file, a folder of them, or a hub dataset name")


def documents_from(source, nsamples: int = 128, seed: int = 0) -> list[str]:
    """Resolve a calibration source: a list of strings, a path (file or folder), or a hub dataset name
    (of which about 8 x nsamples records are drawn, shuffled by `seed`)."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise DataError("a calibration list must hold strings")
        return list(source)
    if isinstance(source, str) and source == SELF:
        raise DataError(f"{SELF!r} (text sampled from the model) holds no documents to mix with others: give it alone as the calibration source")
    check_source(str(source))
    if is_hub_name(str(source)):
        return _hub_documents(str(source), nsamples, seed)
    return read_documents(Path(source))


def pack_documents(tokenizer, docs: Sequence[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(n, seqlen) token rows. Long documents contribute windows at seeded random offsets, spread over
    documents; short ones are joined (separated by EOS) and cut into rows, never dropped. Where the
    tokenizer itself prepends BOS (Gemma), every row starts with it, as the model's inputs always do:
    Gemma-3 tuned on rows without it came out far worse (benchmarks/results/README.md)."""
    from .evaluate import use_bos

    lead = [tokenizer.bos_token_id] if use_bos(tokenizer, "auto") else []
    rows = _pack(tokenizer, docs, nsamples, seqlen - len(lead), seed)
    return torch.cat([torch.tensor(lead, dtype=rows.dtype).expand(rows.shape[0], -1), rows], dim=1) if lead else rows


def _pack(tokenizer, docs: Sequence[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError("the calibration data holds no text")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    window = seqlen * CHARS_PER_TOKEN_BOUND
    per_doc = max(1, math.ceil(nsamples / len(docs)))
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows: list[list[int]] = []
    buffer: list[int] = []

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for _ in range(4):  # a few passes, so a handful of long documents can still fill nsamples rows
        for i in order:
            doc = docs[i]
            if len(doc) > 2 * window:
                for _ in range(per_doc):
                    start = rng.randrange(0, len(doc) - window)
                    ids = encode(doc[start : start + window])
                    if len(ids) >= seqlen:
                        rows.append(ids[:seqlen])
                    if len(rows) >= nsamples:
                        return torch.tensor(rows[:nsamples])
            else:
                buffer += encode(doc) + sep
                while len(buffer) >= seqlen and len(rows) < nsamples:
                    rows.append(buffer[:seqlen])
                    buffer = buffer[seqlen:]
                if len(rows) >= nsamples:
                    return torch.tensor(rows)
        if all(len(docs[i]) <= 2 * window for i in order):
            break  # short documents are used once; repeating them adds nothing
    if not rows:
        if len(buffer) < 16:
            raise DataError(f"the calibration text is too short ({len(buffer)} tokens): give more text")
        warnings.warn(f"calibration text holds only {len(buffer)} tokens, fewer than seqlen={seqlen}: using one sample of {len(buffer)} tokens")
        return torch.tensor([buffer])
    if len(rows) < nsamples:
        warnings.warn(f"calibration text filled only {len(rows)} of {nsamples} samples of {seqlen} tokens: using {len(rows)}")
    return torch.tensor(rows)


@torch.no_grad()
def self_generated(model, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int = 32) -> torch.Tensor:
    """Rows of text the model samples itself (temperature 1), seeded: calibration that needs no data.
    Decoding is overhead-bound on CPUs, so wide batches cost little more per step than narrow ones."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for begin in range(0, nsamples, batch_size):
            n = min(batch_size, nsamples - begin)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=seqlen - 1,
                                 min_new_tokens=seqlen - 1, pad_token_id=tokenizer.eos_token_id)
            rows.append(out[:, :seqlen].cpu())
    return torch.cat(rows)


def default_calibration(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Rows from the default hub dataset; offline (or without the `datasets` extra), from the books shipped
    in signround/data, which need no network and, unlike text sampled from the model, no forward pass."""
    try:
        if not hub_reachable():
            raise ConnectionError("the Hugging Face hub is not reachable from here")
        docs = _hub_documents(DEFAULT_DATASET, nsamples, seed)
    except Exception as e:  # offline, or the optional `datasets` package missing: fall back, loudly
        reason = f"{type(e).__name__}: {str(e)[:120]}"
    else:
        return pack_documents(tokenizer, docs, nsamples, seqlen, seed)
    path = shipped_text("calibration.txt")
    ids = pack_documents(tokenizer, read_documents(path), nsamples, seqlen, seed)
    warnings.warn(f"default calibration dataset {DEFAULT_DATASET} unavailable ({reason}); using {ids.shape[0]} x {ids.shape[1]} tokens "
                  f"of the public-domain books shipped in {path.name} (seed {seed})")
    return ids


def calibration_ids(source, model, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The calibration token rows for `quantize`.

    `source` may be token ids already (a LongTensor (n, seqlen)), texts, a path, a hub dataset name, or
    "self" (text the model samples itself: needs a model with real weights, and minutes on a CPU);
    None means the default hub dataset, falling back to the shipped books when it is unreachable.
    """
    if isinstance(source, torch.Tensor):
        ids = source.long()
        if ids.dim() != 2:
            raise DataError(f"calibration token ids must be (nsamples, seqlen), got shape {tuple(ids.shape)}")
        ids = ids[:nsamples, :seqlen]
    elif source is None:
        ids = default_calibration(tokenizer, nsamples, seqlen, seed)
    elif isinstance(source, str) and source == SELF:
        ids = self_generated(model, tokenizer, nsamples, seqlen, seed)
    else:
        ids = pack_documents(tokenizer, documents_from(source, nsamples, seed), nsamples, seqlen, seed)
    log.info("calibration: %d samples of %d tokens", ids.shape[0], ids.shape[1])
    return ids
