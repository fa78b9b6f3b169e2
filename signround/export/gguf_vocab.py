"""The tokenizer in a GGUF file, as llama.cpp's converter writes it: GPT-2 style byte-level BPE (SmolLM2,
Qwen) as `gpt2` with its merges, and SentencePiece-style BPE (Gemma, LLaMA 2: pieces spelled with `▁`, byte
fallback) as `llama`, whose tokenizer merges the adjacent pair with the highest score first. A
tokenizer.json holds no scores, so the ones written rank merged pieces in token-id order, as BPE training
appends them (Gemma-3's own GGUF has the same order); transformers' loader reads the merges beside them.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
ADDED_SCORE = -1000.0  # llama.cpp's converter's score of added and control tokens


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Vocabulary, scores or merges, special token ids and chat template of `tokenizer`."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if is_sentencepiece_bpe(saved):
            tokens, scores, types = sentencepiece_tokens(saved, vocab_size)
            writer.add_tokenizer_model("llama")
            writer.add_token_scores(scores)
            writer.add_add_space_prefix(_prepends_space(saved))
        else:
            _plain_byte_level_decoder(path, saved)
            tokens, types = _byte_level_tokens(Path(tmp), type(tokenizer).__name__, vocab_size)
            writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def is_sentencepiece_bpe(saved: dict) -> bool:
    """A BPE over `▁`-spelled pieces with byte fallback (no byte-level alphabet): SentencePiece's, as converted."""
    model = saved.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "ByteLevel" not in json.dumps(saved.get("pre_tokenizer"))


def sentencepiece_tokens(saved: dict, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and llama.cpp token types by id: added tokens CONTROL (special) or USER_DEFINED (spelled
    with real spaces, as the converter writes them), `<0xXX>` BYTE, the rest NORMAL scored -id."""
    from gguf import TokenType

    by_id = {i: t for t, i in saved["model"]["vocab"].items()}
    added = {t["id"]: t for t in saved.get("added_tokens", [])}
    unk = saved["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i in added:
            special = added[i]["special"]
            text = added[i]["content"] if special else added[i]["content"].replace("▁", " ")
            kind, score = (TokenType.CONTROL if special else TokenType.USER_DEFINED), ADDED_SCORE
        elif i in by_id:
            text = by_id[i]
            kind, score = ((TokenType.BYTE, 0.0) if _BYTE.fullmatch(text) else (TokenType.UNKNOWN, 0.0) if text == unk
                           else (TokenType.NORMAL, -float(i)))
        else:  # embedding rows beyond the tokenizer
            text, kind, score = f"[PAD{i}]", TokenType.UNUSED, -10000.0
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    return tokens, scores, types


def _prepends_space(saved: dict) -> bool:
    """Whether the tokenizer puts `▁` before the text (LLaMA 2's Prepend or Metaspace), which Gemma's does not."""
    normalizer, pre = json.dumps(saved.get("normalizer")), saved.get("pre_tokenizer") or {}
    return '"Prepend"' in normalizer or (pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never")


def _byte_level_tokens(folder: Path, kind: str, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    try:
        vocab = gguf.BpeVocab(folder)
    except FileNotFoundError:
        raise ValueError("the GGUF export carries over GPT-2 style byte-level BPE and SentencePiece-style BPE tokenizers "
                         f"(tokenizer.json); {kind} is neither") from None
    tokens, types = [], []
    for text, _score, token_type in vocab.all_tokens():
        tokens.append(text)
        types.append(token_type)
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer: padding tokens
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return tokens, types


def _plain_byte_level_decoder(path: Path, saved: dict) -> None:
    """transformers 5.17 saves a GGUF-converted GPT-2 style tokenizer with byte fallback on and a Sequence
    decoder ending in ByteLevel; gguf's reader accepts only plain byte-level BPE. With a ByteLevel
    pre-tokenizer every byte already has its token, so byte fallback never fires: the vocabulary and merges
    are the same, and the saved copy is rewritten plain."""
    decoder, model = saved.get("decoder") or {}, saved.get("model") or {}
    parts = decoder.get("decoders") or [] if decoder.get("type") == "Sequence" else []
    if (saved.get("pre_tokenizer") or {}).get("type") == "ByteLevel" and model.get("type") == "BPE" and parts and parts[-1].get("type") == "ByteLevel":
        saved["decoder"], model["byte_fallback"] = parts[-1], False
        path.write_text(json.dumps(saved), encoding="utf-8")
