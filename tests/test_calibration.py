import json

import pytest
import torch

from signround.calibration import DataError, calibration_ids, documents_from, pack_documents


class CharTokenizer:
    """One token per character: packing arithmetic is then easy to check by hand."""

    eos_token_id = 0
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 100) for c in text]}


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
    (b"", "holds no text"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, message):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        pack_documents(CharTokenizer(), documents_from(f), 4, 8, 0)


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


def test_offline_default_falls_back_to_self_generated_text(monkeypatch):
    from tiny_models import make

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = make("llama")
    tok = CharTokenizer()
    with pytest.warns(UserWarning, match="sampling 3 x 12 tokens of calibration text from the model itself"):
        ids = calibration_ids(None, model, tok, nsamples=3, seqlen=12, seed=0)
    assert ids.shape == (3, 12)
    again = calibration_ids(None, model, tok, nsamples=3, seqlen=12, seed=0)
    assert torch.equal(ids, again)


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow comes with the data extra")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "second doc"], "id": [1, 2]}), tmp_path / "d.parquet")
    assert documents_from(tmp_path / "d.parquet") == ["first doc", "second doc"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="has no column 'text'"):
        documents_from(tmp_path / "e.parquet")
