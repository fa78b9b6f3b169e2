"""The table logic of benchmarks/vs_autoround.py on stored rows (no tuning runs): the repeated pairs'
ratios and median, the memory cells of CPU and GPU rows, and the per-block output errors."""

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def vs_autoround():
    try:
        spec = importlib.util.spec_from_file_location("vs_autoround", BENCHMARKS / "vs_autoround.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:  # the script put its own folder there, for its sibling `protocol` (not yet if its imports failed)
        if str(BENCHMARKS) in sys.path:
            sys.path.remove(str(BENCHMARKS))


def _row(seconds: float, **extra) -> dict:
    return {"tuning_s": seconds, "iters": 200, "peak_rss_mib": 1000.0, **extra}


def test_repeated_pairs_tables_each_pair_and_the_median(vs_autoround):
    ours, theirs = [400.0, 330.0, 290.0, 310.0], [500.0, 300.0, 300.0, 320.0]
    results = {"signround|same|W4A16": {**_row(ours[0]), "repeats": [_row(s) for s in ours[1:]]},
               "auto-round|same|W4A16": {**_row(theirs[0]), "repeats": [_row(s) for s in theirs[1:]]}}
    lines = vs_autoround.repeated_pairs(results, ["W4A16"], layers=2)
    pair_rows = [line for line in lines if line.startswith("| W4A16 | signround | ") and "| all |" not in line]
    ratios = [a / b for a, b in zip(ours, theirs)]
    assert [float(line.split("|")[-2]) for line in pair_rows] == pytest.approx(ratios, abs=1e-3)
    assert [line.split("|")[4].strip() for line in pair_rows] == ["signround", "auto-round"] * 2  # who went first alternates
    assert float(pair_rows[1].split("|")[5]) == pytest.approx(330.0 / 400, abs=1e-3)  # s/iter over iters x blocks
    summary = next(line for line in lines if "| all |" in line)
    assert f"median {statistics.median(ratios):.3f}" in summary
    assert f"total time {sum(ours) / sum(theirs):.3f}" in summary


def test_repeated_pairs_need_repeats_of_both_tools(vs_autoround):
    results = {"signround|same|W4A16": {**_row(300.0), "repeats": [_row(310.0)]}, "auto-round|same|W4A16": _row(320.0)}
    assert vs_autoround.repeated_pairs(results, ["W4A16"], layers=2) == []


def test_memory_cell_adds_the_gpu_peak_only_for_gpu_rows(vs_autoround):
    assert vs_autoround.memory_mib(_row(1.0)) == "1000"
    assert vs_autoround.memory_mib(_row(1.0, peak_gpu_mib=None)) == "1000"
    assert vs_autoround.memory_mib(_row(1.0, peak_gpu_mib=2345.4)) == "1000 (GPU 2345)"


def test_block_errors_are_zero_for_the_same_model_and_grow_with_quantization(vs_autoround):
    """protocol.block_errors: each block's relative output error against the unquantized model."""
    import copy

    import torch
    from tiny_models import calib_ids, make

    import signround

    reference = make("llama")
    quantized = copy.deepcopy(reference)
    signround.quantize(quantized, signround.QuantConfig(scheme="W2A16G32", method="rtn"))
    ids = calib_ids(2, 16)
    assert vs_autoround.protocol.block_errors(reference, copy.deepcopy(reference), ids) == [0.0] * reference.config.num_hidden_layers
    errors = vs_autoround.protocol.block_errors(reference, quantized, ids)
    assert len(errors) == reference.config.num_hidden_layers and all(0 < e for e in errors)
    lines = vs_autoround.block_error_lines({"signround|default|W2A16G32": {"block_errors": errors}, "auto-round|default|W2A16G32": {}}, ["W2A16G32"])
    assert lines[-1].startswith("| signround default W2A16G32 | ") and lines[-1].count("|") == len(errors) + 2
    assert torch.isfinite(torch.tensor(errors)).all()


def test_variant_settings_key_their_rows_and_reach_the_child(vs_autoround):
    import argparse

    args = argparse.Namespace(project_clipping=None, clip_search=False, tame_outliers=True, adapt_batch=False, cache_dtype="float32", seed=43)
    assert vs_autoround.signround_key("default", "W4A16", args) == "signround|default|W4A16|RTN start|tamed outliers|fixed batch|float32 caches|seed 43"
    assert vs_autoround.variant_argv(args) == ["--no-clip-search", "--tame-outliers", "--no-adapt-batch", "--cache-dtype", "float32", "--seed", "43"]
    plain = argparse.Namespace(**dict.fromkeys(vars(args)))
    assert vs_autoround.signround_key("default", "W4A16", plain) == "signround|default|W4A16" and not vs_autoround.variant_argv(plain)
