import json

import pytest

from signround.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["quantize", "no-such-model", "-o", "{out}"], "unknown model 'no-such-model'"),
    (["quantize", "{model}", "-o", "{out}", "--bits", "9"], "bits=9 is not supported: choose an integer from 2 to 8"),
    (["quantize", "{model}", "-o", "{out}", "--scheme", "W5B9"], "unknown scheme 'W5B9'"),
    (["quantize", "{model}", "-o", "{out}", "--group-size", "0"], "group_size=0 is not valid"),
    (["quantize", "{model}", "-o", "{out}", "--scheme", "Q4_K_M", "--bits", "3"], "--scheme Q4_K_M sets every layer's K type: drop --bits"),
    (["quantize", "{model}", "-o", "{out}", "--nsamples", "0"], "nsamples=0 is out of range"),
    (["quantize", "{model}", "-o", "{out}", "--method", "magic"], "unknown method 'magic'"),
    (["quantize", "{model}", "-o", "{out}", "--layer", "down_proj"], "must look like REGEX=SPEC"),
    (["quantize", "{model}", "-o", "{out}", "--layer", "(=W4A16"], "not a valid regular expression"),
    (["quantize", "{model}", "-o", "{out}", "--eval-text", "missing.txt"], "perplexity text missing.txt not found"),
    (["quantize", "{model}", "-o", "{out}", "--dataset", "missing.txt", "--iters", "1"], "calibration data 'missing.txt' not found"),
    (["quantize", "{model}", "-o", "{full}"], "not empty: choose another -o or pass --overwrite"),
    (["quantize", "{model}", "-o", "{out}", "--target-bits", "1.5", "--method", "rtn"], "target_bits=1.5 is below what the options can reach"),
    (["quantize", "{model}", "-o", "{out}", "--target-bits", "3", "--options", "W3A16,W9A16"], "unknown scheme 'W9A16'"),
    (["quantize", "{model}", "-o", "{out}", "--target-bits", "3", "--scheme", "Q4_K_M"], "mixture Q4_K_M fixes them: give one of the two"),
    (["quantize", "{model}", "-o", "{out}", "--plan", "missing.json"], "cannot read a plan from missing.json"),
    (["quantize", "{model}", "-o", "{out}", "--plan", "{bad_task}"], "holds no bit-budget plan"),
    (["generate", "{out}"], "has no config.json"),
    (["generate", "{model}"], "is not a signround output folder"),
    (["eval", "{model}"], "nothing to evaluate"),
    (["eval", "{model}", "--ppl", "missing.txt"], "perplexity text missing.txt not found"),
    (["eval", "{model}", "--tasks", "missing.json"], "task path missing.json not found"),
    (["eval", "{model}", "--tasks", "{bad_task}"], "has no 'examples' list"),
    (["eval", "no-such-model", "--tasks", "{bad_task}"], "has no 'examples' list"),
    (["compare", "no-such-model", "-o", "{out}", "--ppl", "x.txt"], "unknown model 'no-such-model'"),
    (["compare", "{model}", "-o", "{out}", "--schemes", "W9A16", "--ppl", "x.txt"], "unknown scheme 'W9A16'"),
])
def test_bad_arguments_give_one_line_errors(capsys, tmp_path, tiny_model_dir, argv, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    bad_task = tmp_path / "bad.json"
    bad_task.write_text('{"name": "x"}')
    argv = [a.format(model=tiny_model_dir, out=tmp_path / "out", full=full, bad_task=bad_task) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    last = err.strip().splitlines()[-1]  # transformers' own loading bar may precede it
    assert last.startswith("signround: error: ") and message in last, err
    assert (full / "x").read_text() == "keep"


def test_quantize_then_generate(capsys, tmp_path, tiny_model_dir):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", tiny_model_dir, "-o", out, "--scheme", "W3A16G32", "--layer", "down_proj=W8A16G64",
                            "--iters", 3, "--nsamples", 4, "--seqlen", 32, "--batch-size", 2, "--dataset", text,
                            "--eval-text", text, "--eval-tokens", 256, "--eval-seqlen", 64, "-q")
    assert code == 0, err
    assert "perplexity: " in stdout and " before, " in stdout and "quantized: 14 weight tensors" in stdout
    assert "kept 16-bit: 0 weight tensors in the blocks (0.0%)" in stdout
    assert "calibration: 4 samples x 32 tokens" in stdout
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["sym"]) == ("signround", 3, 32, True)
    assert qcfg["tuning"]["iters"] == 3 and (out / "tokenizer.json").is_file()
    code, stdout, err = run(capsys, "generate", out, "The quick brown", "--max-new-tokens", 5)
    assert code == 0 and stdout.startswith("The quick brown") and len(stdout.strip()) > len("The quick brown")


def test_eval_prints_table_and_writes_json(capsys, tmp_path, tiny_model_dir):
    text = tmp_path / "t.txt"
    text.write_text("a b c d e f g " * 50)
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"name": "toy", "examples": [{"input": "x", "target_scores": {"a": 1, "b": 0}}] * 3}))
    code, out, err = run(capsys, "eval", tiny_model_dir, "--ppl", text, "--ppl-tokens", 100, "--ppl-seqlen", 50, "--tasks", task,
                         "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "perplexity" in out and "toy" in out
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["metrics"]["tasks"]["toy"]["n"] == 3 and record["metrics"]["perplexity"][str(text)]["tokens"] == 100
    assert record["versions"]["signround"] and record["wall_seconds"] > 0


def test_recipe_flags_reach_the_config():
    from signround.cli import build_parser, config_from_args, run_config_from_args

    def parsed(*argv):
        return build_parser().parse_args(["quantize", "m", "-o", "out", *argv])

    def config(*argv):
        return config_from_args(parsed(*argv)).resolved()

    assert config().tame_outliers is False and config("--tame-outliers").tame_outliers is True
    assert config("--recipe", "full", "--no-tame-outliers").tame_outliers is False and config("--recipe", "full").tame_outliers is False
    assert config().project_clipping == "auto" and config("--recipe", "paper").project_clipping is True
    from signround.config import RECIPES

    assert all(config("--recipe", name).recipe == name for name in RECIPES)
    assert config("--project-clipping", "on").project_clipping is True and config("--project-clipping", "off").project_clipping is False
    assert config("--no-clip-search").clip_search is False and config("--keep", "last").keep == "last"
    assert config().adapt_batch is True and config("--no-adapt-batch").adapt_batch is False
    assert config("--recipe", "full").adapt_batch is False and config("--recipe", "full", "--adapt-batch").adapt_batch is True
    assert config_from_args(parsed()).iters is None  # left for the recipe, not frozen at the fast recipe's value

    def run(*argv):
        return run_config_from_args(parsed(*argv))

    assert run().compile == "auto" and run("--compile", "on").compile is True and run("--compile", "off").compile is False
    assert run().cache_dtype == "bfloat16" and run("--cache-dtype", "float32").cache_dtype == "float32"
    assert (run("--restart").resume, run("--resume").resume, run().resume) == ("never", "force", "auto")
    from signround.config import RunConfig

    assert run("--offload", "--threads", "1", "-q", "--device", "cpu", "--amp", "off") == RunConfig(
        device="cpu", amp="off", offload=True, threads=1, progress=False)


def test_target_bits_then_the_same_plan_again(capsys, tmp_path, tiny_model_dir):
    first, second = tmp_path / "searched", tmp_path / "replayed"
    options = "W2A16G32,W4A16G32,W8A16G32,fp16"
    code, stdout, err = run(capsys, "quantize", tiny_model_dir, "-o", first, "--target-bits", 3.5, "--options", options, "--method", "rtn",
                            "--nsamples", 4, "--seqlen", 32, "-q")
    assert code == 0, err
    assert "bit-budget plan: " in stdout and "(target 3.5)" in stdout
    searched = json.loads((first / "config.json").read_text())["quantization_config"]
    code, stdout, err = run(capsys, "quantize", tiny_model_dir, "-o", second, "--plan", first, "--method", "rtn", "-q")
    assert code == 0, err
    replayed = json.loads((second / "config.json").read_text())["quantization_config"]
    assert replayed["extra_config"] == searched["extra_config"] and replayed["modules_not_quantized"] == searched["modules_not_quantized"]
    assert replayed["plan"] == searched["plan"] and "bit-budget plan" not in stdout
