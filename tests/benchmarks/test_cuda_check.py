"""benchmarks/cuda_check.py walks every stage but the GPU's own calls on the CPU: a tiny model quantized by
`signround.run`, killed with SIGKILL after a block and resumed to the same codes, reloaded and scored, and
generating through the packed int4 kernel (its CPU twin here). The table it writes says so, stage by stage."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_every_stage_runs_on_the_cpu_and_the_table_says_so(tmp_path, tiny_model_dir, shared_data):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "cuda_check.py"), "--device", "cpu", "--quick", "--model", str(tiny_model_dir),
                           "--stages", "quantize,reload,generate,resume", "--kill-after", "0", "--tokens", "512", "--new-tokens", "4",
                           "--work", str(tmp_path / "work"), "--out", str(out), "--table", "cuda_check-test.md"], capture_output=True, text=True)
    (BENCHMARKS / "results" / "cuda_check-test.md").unlink(missing_ok=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in (out / "cuda_check-test.md").read_text().splitlines() if line.startswith("| ")}
    assert all(rows[stage].split("|")[2].strip() == "yes" for stage in ("quantize", "reload", "generate", "resume")), rows
    assert "100.00% of packed values identical" in rows["resume"]
    assert "int4 kernel in" in rows["generate"] and " 0/" not in rows["generate"]


def test_a_failing_stage_is_a_row_and_a_non_zero_exit(tmp_path, tiny_model_dir, shared_data):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "cuda_check.py"), "--device", "cpu", "--quick", "--model", str(tiny_model_dir),
                           "--stages", "reload", "--work", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--table", "cuda_check-test.md"],
                          capture_output=True, text=True)
    (BENCHMARKS / "results" / "cuda_check-test.md").unlink(missing_ok=True)
    assert done.returncode != 0
    row = next(line for line in (tmp_path / "out" / "cuda_check-test.md").read_text().splitlines() if line.startswith("| reload"))
    assert "| NO |" in row and "config.json" in row
    assert "Traceback" in (tmp_path / "out" / "cuda_check.log").read_text()
