"""SmolLM2-135M in every export format (GGUF: Q4_0, Q4_1, Q4_K_M, Q6_K, MXFP4; compressed-tensors' float and W8A8
formats too), loaded by each consumer: perplexity within 0.5% of ours and
size on disk within 3% of the format's theoretical bits per weight (benchmarks/exports.py checks both)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_export_of_smollm2_matches_our_perplexity_and_size(tmp_path, shared_data):
    out = tmp_path / "exports.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "exports.py"), "--tokens", "2048", "--json", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(r["scheme"], r["format"]) for r in rows} >= {("W4A16G64", f) for f in ("gptq", "auto_round", "compressed-tensors")}
    assert [r["scheme"] for r in rows if r["format"] == "gguf"] == ["bits=4,group_size=32,sym=true", "bits=4,group_size=32,sym=false", "Q4_K_M", "Q6_K",
                                                                    "MXFP4A16"]
    assert {("NVFP4A16", "compressed-tensors"), ("MXFP4", "compressed-tensors"), ("W8A8", "compressed-tensors")} <= {(r["scheme"], r["format"]) for r in rows}
    assert ("bits=4,group_size=64,sym=false", "awq") in {(r["scheme"], r["format"]) for r in rows}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from exports import ppl_bound

    assert ("NVFP4", "auto_round") in {(r["scheme"], r["format"]) for r in rows}
    for r in rows:
        assert abs(r["ppl_diff"]) <= ppl_bound(r) and abs(r["size_diff"]) <= 0.03, r
