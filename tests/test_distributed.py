"""Data-parallel tuning (signround/distributed.py) with gloo on this CPU: two processes under torchrun give the
one-process result, and a run whose rank is killed resumes from its last finished block.

Tolerance: in fp32 (amp off) every code is identical and the block losses agree to 1e-6 relative; what
differs is only the order of the float sums (a rank's partial gradient sum, then the all-reduce). Under bf16
autocast a kernel's rounding also depends on which rows share a batch, so a few gradient signs near zero flip
on a random tiny model, whose block losses (~1e-6) leave every sign near zero: there 90% of codes agree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import signround
from signround.config import ConfigError
from signround.distributed import Shard, shard
from signround.qlinear import QuantLinear

TESTS = Path(__file__).resolve().parent


def test_a_shard_holds_every_world_th_row_and_maps_global_rows_to_its_own():
    s = Shard(rank=1, world=3, total=10)
    assert s.count == 3 and s.local_ids(torch.arange(10)).tolist() == [1, 4, 7]
    assert s.held(torch.tensor([7, 0, 4, 5, 1])).tolist() == [2, 1, 0]  # global 7, 4, 1 are its local 2, 1, 0
    assert sum(Shard(r, 3, 10).count for r in range(3)) == 10


def test_one_process_is_a_shard_of_everything():
    assert shard(5) == Shard(0, 1, 5) and shard(5).held(torch.tensor([3, 1])).tolist() == [3, 1]


def _run(folder, out, procs: int, **env):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else [sys.executable]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([*launcher, str(TESTS / "dp_driver.py"), str(folder), str(out)], capture_output=True, text=True, env=environ, timeout=300)


def _codes(folder):
    model = signround.load(folder)
    return {n: m.quantized_weight().codes for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("single") / "out"
    done = _run(tiny_model_dir, out, 1)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("offload", ["0", "1"])
def test_two_processes_give_the_one_process_codes_and_losses(tmp_path, tiny_model_dir, single, offload):
    done = _run(tiny_model_dir, tmp_path / "out", 2, OFFLOAD=offload)  # caches in memory, or in files of each rank's own
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = _codes(tmp_path / "out"), _codes(single[0])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert report["steps"] == single[1]["steps"]
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(single[1]["losses"]), rtol=1e-6, atol=0)
    assert not (tmp_path / "out.signround-work").exists()  # rank 0 cleaned up after writing


def test_under_torchrun_rank_0_searches_the_bit_budget_and_every_rank_tunes_its_plan(tmp_path, tiny_model_dir):
    runs = {}
    for procs in (1, 2):
        done = _run(tiny_model_dir, tmp_path / f"out{procs}", procs, TARGET_BITS="3.3")
        assert done.returncode == 0, done.stderr[-3000:]
        runs[procs] = json.loads(done.stdout.strip().splitlines()[-1])
    plans = [json.loads((tmp_path / f"out{procs}" / "config.json").read_text())["quantization_config"]["plan"] for procs in (1, 2)]
    assert plans[0] == plans[1] and runs[2]["plan"].startswith("bit-budget plan")
    ours, theirs = _codes(tmp_path / "out2"), _codes(tmp_path / "out1")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_killed_rank_ends_the_run_and_the_same_command_resumes_after_the_last_finished_block(tmp_path, tiny_model_dir, single):
    killed = _run(tiny_model_dir, tmp_path / "out", 2, KILL_AFTER="0", KILL_RANK="1")
    assert killed.returncode != 0
    work = tmp_path / "out.signround-work"
    assert json.loads((work / "state.json").read_text())["finished"] == 1
    assert sorted(p.name for p in work.glob("inputs-*")) == [f"inputs-00001-{s}-rank{r}.safetensors" for s in ("fp", "q") for r in (0, 1)]
    resumed = _run(tiny_model_dir, tmp_path / "out", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    blocks = len(single[1]["losses"])
    assert report["steps"] == single[1]["steps"] * (blocks - 1) // blocks  # block 0 was not tuned again
    ours, theirs = _codes(tmp_path / "out"), _codes(single[0])
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_more_processes_than_calibration_rows_is_a_one_line_error():
    with pytest.raises(ConfigError, match="every process needs one"):
        Shard(rank=0, world=3, total=2)


def test_the_cli_under_torchrun_writes_one_output_and_speaks_once(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "signround", "quantize",
                           str(tiny_model_dir), "-o", str(out), "--scheme", "W4A16G32", "--iters", "2", "--nsamples", "4", "--seqlen", "32",
                           "--compile", "off"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved ") == 1  # rank 0 alone reports
    model = signround.load(out)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
