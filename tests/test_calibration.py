import json

import pytest
import torch

import signround.calibration as calibration
from signround.calibration import DataError, calibration_ids, check_source, documents_from, is_hub_name, pack_documents, shipped_text


class CharTokenizer:
    """One token per character: packing arithmetic is then easy to check by hand."""

    eos_token_id = 0
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 100) for c in text]}


class WordTokenizer(CharTokenizer):
    """One token per word: fewer tokens than any subword tokenizer gives, so a lower bound on what text yields."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + len(w) % 100 for w in text.split()]}


class NoForwardModel:
    """A model that must not run (as one opened lazily, on the meta device)."""

    def parameters(self):
        raise AssertionError("the calibration fallback must not touch the model")

    generate = parameters


def test_short_documents_are_packed_not_dropped():
    docs = ["abcde"] * 10  # 10 docs x (5 chars + EOS) = 60 tokens
    ids = pack_documents(CharTokenizer(), docs, nsamples=100, seqlen=12, seed=0)
    assert ids.shape == (5, 12)
    assert (ids == 0).sum() == 10  # every document's EOS separator is in there


def test_long_documents_give_windows_spread_over_documents():
    docs = ["x" * 5000, "y" * 5000]
    ids = pack_documents(CharTokenizer(), docs, nsamples=6, seqlen=100, seed=0)
    assert ids.shape == (6, 100)
    firsts = {row[0].item() for row in ids}
    assert firsts == {2 + ord("x") % 100, 2 + ord("y") % 100}


class BosTokenizer(CharTokenizer):
    """Prepends BOS itself, as Gemma's tokenizer does."""

    def __call__(self, text, add_special_tokens=False):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}


@pytest.mark.parametrize("docs", [["x" * 5000, "y" * 5000], ["abcde"] * 40], ids=["windows", "joined"])
def test_rows_start_with_bos_where_the_tokenizer_prepends_it(docs):
    ids = pack_documents(BosTokenizer(), docs, nsamples=4, seqlen=12, seed=0)
    plain = pack_documents(CharTokenizer(), docs, nsamples=4, seqlen=11, seed=0)
    assert ids.shape == (4, 12)
    assert (ids[:, 0] == BosTokenizer.bos_token_id).all()
    assert torch.equal(ids[:, 1:], plain)  # the same text, one token shorter


def test_packing_is_seeded():
    docs = [str(i) * 3000 for i in range(10)]
    a = pack_documents(CharTokenizer(), docs, 8, 50, seed=1)
    assert torch.equal(a, pack_documents(CharTokenizer(), docs, 8, 50, seed=1))
    assert not torch.equal(a, pack_documents(CharTokenizer(), docs, 8, 50, seed=2))


def test_too_little_text_gives_one_shorter_sample_with_a_warning():
    with pytest.warns(UserWarning, match="fewer than seqlen"):
        ids = pack_documents(CharTokenizer(), ["a" * 40], 4, 100, seed=0)
    assert ids.shape == (1, 41)


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert documents_from(tmp_path) == ["hello world", "one", "two"]
    assert documents_from(["x", "y"]) == ["x", "y"]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b" \n\t\n", "is empty"),
    (b"\x00\x01\x02binary", "looks binary"),
])
def test_bad_text_files(tmp_path, content, message):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=f"calib.txt {message}"):
        documents_from(f)
    (tmp_path / "good.txt").write_text("some text")
    with pytest.raises(DataError, match=f"calib.txt {message}"):  # in a folder too: the error names the file
        documents_from(tmp_path)


@pytest.mark.parametrize("content, encoding, text", [
    (b"caf\xe9 cr\xe8me", "cp1252", "caf\u00e9 cr\u00e8me"),
    (b"\x93quoted\x94 \x97 dash", "cp1252", "\u201cquoted\u201d \u2014 dash"),
    (b"caf\xe9 \x81\x8d", "latin-1", "caf\u00e9 \x81\x8d"),  # bytes cp1252 leaves undefined
])
def test_non_utf8_file_is_read_with_a_warning(tmp_path, content, encoding, text):
    f = tmp_path / "latin.txt"
    f.write_bytes(content)
    with pytest.warns(UserWarning, match=f"latin.txt is not UTF-8; read as {encoding}"):
        assert documents_from(f) == [text]


def test_folder_with_a_non_utf8_file_is_read_with_a_warning(tmp_path):
    (tmp_path / "a.txt").write_text("plain UTF-8 \u00e9t\u00e9")
    (tmp_path / "b.txt").write_bytes(b"old book, caf\xe9")
    with pytest.warns(UserWarning, match="b.txt is not UTF-8; read as cp1252"):
        docs = documents_from(tmp_path)
    assert docs == ["plain UTF-8 \u00e9t\u00e9", "old book, caf\u00e9"]


def test_jsonl_without_text_field(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:1 has no string field 'text'"):
        documents_from(f)


def test_missing_source():
    with pytest.raises(DataError, match="not found"):
        documents_from("no/such/file.txt")


def test_token_ids_pass_through_clipped_to_settings():
    ids = torch.arange(40).view(4, 10)
    assert torch.equal(calibration_ids(ids, None, None, nsamples=3, seqlen=8, seed=0), ids[:3, :8])


def test_hub_dataset_gets_nsamples_and_seed(monkeypatch):
    calls = []

    def fake_hub(name, nsamples, seed):
        calls.append((name, nsamples, seed))
        return ["hub text " * 100] * 4

    monkeypatch.setattr(calibration, "_hub_documents", fake_hub)
    ids = calibration_ids("org/dataset", None, CharTokenizer(), nsamples=5, seqlen=16, seed=7)
    assert ids.shape == (5, 16)
    documents_from("org/dataset", nsamples=3, seed=9)
    assert calls == [("org/dataset", 5, 7), ("org/dataset", 3, 9)]


def test_offline_default_falls_back_to_shipped_text_without_running_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = CharTokenizer()
    with pytest.warns(UserWarning, match=r"unavailable .*; using 3 x 12 tokens of the public-domain books shipped in calibration\.txt"):
        ids = calibration_ids(None, NoForwardModel(), tok, nsamples=3, seqlen=12, seed=0)
    assert ids.shape == (3, 12)
    with pytest.warns(UserWarning):
        assert torch.equal(ids, calibration_ids(None, NoForwardModel(), tok, nsamples=3, seqlen=12, seed=0))
        assert not torch.equal(ids, calibration_ids(None, NoForwardModel(), tok, nsamples=3, seqlen=12, seed=1))


def test_shipped_texts():
    calib, heldout = shipped_text("calibration.txt").read_text(), shipped_text("heldout.txt").read_text()
    assert 600_000 <= len(calib) <= 800_000 and 60_000 <= len(heldout) <= 90_000
    assert calib.isascii() and heldout.isascii() and "Gutenberg" not in calib + heldout
    assert heldout.split("\n\n")[5] not in calib  # held out: from a book calibration.txt does not use
    assert len(heldout.split()) >= 12_000  # words; a LLaMA tokenizer gives ~1.3 tokens a word
    ids = pack_documents(WordTokenizer(), [calib], nsamples=128, seqlen=512, seed=0)
    assert ids.shape == (128, 512)  # the default packing fills 128 x 512 even at one token a word
    with pytest.raises(DataError, match="no shipped text 'nope.txt'"):
        shipped_text("nope.txt")


def test_self_source_samples_from_the_model():
    from tiny_models import make

    model, tok = make("llama"), CharTokenizer()
    ids = calibration_ids("self", model, tok, nsamples=3, seqlen=12, seed=0)
    assert ids.shape == (3, 12) and (ids[:, 0] == tok.bos_token_id).all()
    assert torch.equal(ids, calibration_ids("self", model, tok, nsamples=3, seqlen=12, seed=0))


def test_self_is_neither_a_path_nor_a_hub_name(tmp_path):
    assert not is_hub_name("self")
    check_source("self")  # no "not found"
    with pytest.raises(DataError, match="give it alone"):
        documents_from("self")
    assert is_hub_name("org/dataset") and not is_hub_name(str(tmp_path)) and not is_hub_name("data/file.txt")
    with pytest.raises(DataError, match="not found"):
        check_source("missing.txt")


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow comes with the data extra")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "second doc"], "id": [1, 2]}), tmp_path / "d.parquet")
    assert documents_from(tmp_path / "d.parquet") == ["first doc", "second doc"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="has no column 'text'"):
        documents_from(tmp_path / "e.parquet")


def test_a_folder_path_with_a_trailing_slash_is_no_hub_name(tmp_path):
    from signround.calibration import is_hub_name

    assert not is_hub_name("books/") and not is_hub_name("a/b/c") and is_hub_name("NeelNanda/pile-10k")
    with pytest.raises(DataError, match="'books/' not found"):
        documents_from("books/")
