import warnings

import pytest
import torch
from tiny_models import calib_ids, make

import signround
from signround import QuantConfig, RunConfig


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("scheme", ["W2A16G32", "W3A16G32", "W4A16G32"])
def test_signround_lowers_every_block_loss_below_rtn(arch, scheme):
    model = make(arch)
    config = QuantConfig(scheme=scheme, iters=60, nsamples=16, seqlen=32, batch_size=4)
    report = signround.quantize(model, config, calibration=calib_ids(16, 32))
    for rtn_loss, tuned_loss in report.block_losses:
        assert tuned_loss < rtn_loss, report.block_losses


def test_same_seed_gives_identical_packed_weights():
    states = []
    for _ in range(2):
        model = make("llama")
        signround.quantize(model, QuantConfig(scheme="W4A16G32", iters=10, nsamples=8, seqlen=16, batch_size=4), calibration=calib_ids(8, 16))
        states.append({k: v for k, v in model.state_dict().items() if k.endswith(("qweight", "qzeros", "scales"))})
    assert states[0].keys() == states[1].keys() and len(states[0]) == 3 * 14
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def output_errors(scheme: str, iters: int, check=None) -> dict[str, float]:
    """The mean squared logit error against the original tiny model, for RTN and for SignRound;
    `check(model)` runs on each quantized model first."""
    ids = calib_ids(16, 32)
    with torch.no_grad():
        target = make("llama")(ids).logits
    errors = {}
    for method in ("rtn", "signround"):
        model = make("llama")
        signround.quantize(model, QuantConfig(scheme=scheme, method=method, iters=iters, nsamples=16, seqlen=32, batch_size=4), calibration=ids)
        if check:
            check(model)
        with torch.no_grad():
            errors[method] = (model(ids).logits - target).pow(2).mean().item()
    return errors


def test_signround_beats_rtn_on_model_output():
    errors = output_errors("W3A16G32", iters=80)
    assert errors["signround"] < errors["rtn"] * 0.9, errors


def test_unknown_method_is_refused():
    with pytest.raises(signround.ConfigError, match="unknown method 'gptqq'"):
        signround.quantize(make("llama"), QuantConfig(method="gptqq"), calibration=calib_ids())


def _packed(method, **overrides):
    model = make("llama")
    config = QuantConfig(scheme="W4A16G32", method=method, nsamples=8, seqlen=16, batch_size=4, clip_search=False, **overrides)
    signround.quantize(model, config, calibration=calib_ids(8, 16))
    return {k: v for k, v in model.state_dict().items() if k.endswith(("qweight", "qzeros", "scales"))}


def test_keep_chooses_between_the_best_scored_and_the_final_parameters():
    """A step's loss scores the parameters it was computed with, before that step's update; so after one
    step "best" is still the starting point (round-to-nearest here) and "last" is the updated one."""
    rtn = _packed("rtn")
    best, last = (_packed("signround", iters=1, keep=keep) for keep in ("best", "last"))
    assert all(torch.equal(best[k], rtn[k]) for k in rtn)
    assert not all(torch.equal(last[k], rtn[k]) for k in rtn)


def test_tail_average_is_the_mean_of_the_last_half_of_the_steps():
    from signround.algorithms.signround import _TailAverage

    average = _TailAverage(iters=6)
    for step in range(6):
        average.add(step, [torch.full((2,), float(step))])
    assert torch.equal(average.mean()[0], torch.full((2,), 4.0))  # steps 3, 4, 5
    assert _TailAverage(iters=4).mean() is None


def test_keep_average_differs_from_both_other_choices():
    best, last, average = (_packed("signround", iters=6, keep=keep) for keep in ("best", "last", "average"))
    assert not all(torch.equal(average[k], last[k]) for k in last)
    assert not all(torch.equal(average[k], best[k]) for k in best)


@pytest.mark.parametrize("keep", ["best", "last", "average"])
def test_each_choice_lowers_block_losses(keep):
    model = make("llama")
    config = QuantConfig(scheme="W3A16G32", iters=40, nsamples=16, seqlen=32, batch_size=4, keep=keep)
    report = signround.quantize(model, config, calibration=calib_ids(16, 32))
    assert all(tuned < rtn for rtn, tuned in report.block_losses), report.block_losses


@pytest.mark.parametrize("scheme", ["Q2_K", "Q3_K", "Q4_K"])
def test_signround_lowers_block_losses_with_k_quant_scales(scheme):
    """Tuning goes through the quantized group scales (and float minimums) of llama.cpp's K types."""
    model = make("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    config = QuantConfig(scheme=scheme, iters=40, nsamples=16, seqlen=32, batch_size=4)
    report = signround.quantize(model, config, calibration=calib_ids(16, 32))
    assert not report.fallbacks and all(tuned < rtn for rtn, tuned in report.block_losses), report.block_losses


@pytest.mark.parametrize("scheme", ["MXFP4A16", "NVFP4A16", "MXFP8A16", "FP8A16"])
def test_signround_lowers_block_losses_on_floating_point_grids(scheme):
    """Offsets counted in grid steps tune E2M1 and E4M3 grids too, under their power-of-two (MX), E4M3 (NVFP4)
    or fp32 (FP8) scales, which keep the searched clipping."""
    model = make("llama")
    config = QuantConfig(scheme=scheme, iters=40, nsamples=16, seqlen=32, batch_size=4)
    report = signround.quantize(model, config, calibration=calib_ids(16, 32))
    assert all(tuned < rtn for rtn, tuned in report.block_losses), report.block_losses


@pytest.mark.parametrize("scheme", ["W8A8", "W4A8G32", "FP8", "MXFP4", "NVFP4"])
def test_signround_adapts_the_weights_to_quantized_inputs(scheme):
    """While a block is tuned its layers see their inputs quantized as at run time (and only then: the hooks
    are gone afterwards), so the tuned model's output is closer to the original's than round-to-nearest's."""

    def no_hooks_left(model):
        assert not any(m._forward_pre_hooks for m in model.modules())

    errors = output_errors(scheme, iters=40, check=no_hooks_left)
    assert errors["signround"] < errors["rtn"] * 0.9, errors


def test_a_clipping_scale_pushed_past_one_leaves_its_group_unclipped_for_good():
    """Unprojected signed descent (projection cost perplexity): a scale stepped above 1 quantizes like
    1, no clipping, and the forward's clamp passes it no gradient, so it stays."""
    from signround.algorithms.base import LayerTask
    from signround.algorithms.signround import _fake_weights, _Tunables
    from signround.config import WeightScheme
    from signround.quant.integer import fake_quant

    layer = torch.nn.Linear(64, 8, bias=False)
    scheme = WeightScheme(bits=4, group_size=32, sym=False)
    tunable = _Tunables(LayerTask("proj", layer, scheme), torch.device("cpu"), torch.float32)
    for p in tunable.params():
        p.grad = torch.full_like(p, -1.0)  # descent pushes the scales up, past 1
    tunable.step(0.1, 0.1)
    assert torch.allclose(tunable.max_scale, torch.full_like(tunable.max_scale, 1.1))
    assert torch.allclose(tunable.offset, torch.full_like(tunable.offset, 0.1))
    tunable.offset.data.zero_()
    assert torch.equal(_fake_weights([tunable.spec], [tunable.tensors()])["proj.weight"].detach(), fake_quant(layer.weight.detach(), 4, 32, False))
    _fake_weights([tunable.spec], [tunable.tensors()])["proj.weight"].pow(2).sum().backward()
    assert tunable.max_scale.grad.abs().sum() == 0 and tunable.min_scale.grad.abs().sum() == 0
    assert tunable.offset.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme, tuned", [("NVFP4A16", 1), ("MXFP4A16", 1), ("FP8A16", 2), ("W4A16G32", 3)])
def test_float_formats_tune_offsets_from_their_searched_clipping(scheme, tuned):
    """An MX or NVFP4 group scale moves in coarse steps (powers of two, E4M3), and tuning it beside the offsets
    undid the clipping search: those tune the offsets alone, from the searched clipping, which the result keeps.
    FP8's fp32 scales tune their maximum, integer grids their minimum and maximum clipping too."""
    from signround.algorithms.base import LayerTask
    from signround.algorithms.signround import _Tunables
    from signround.config import parse_scheme

    layer = torch.nn.Linear(64, 8, bias=False)
    s = parse_scheme(scheme)
    tunable = _Tunables(LayerTask("proj", layer, s), torch.device("cpu"), torch.float32)
    assert len(tunable.params()) == tuned
    tunable.search_clipping(torch.rand(64) + 0.1)
    searched = tunable.max_scale.detach().clone()
    assert (searched != 1).any()
    for p in tunable.params():
        p.grad = torch.full_like(p, -1.0)
    tunable.step(0.1, 0.1)
    assert torch.equal(tunable.max_scale, searched) == (tuned == 1)
    if tuned == 1:  # the packed result is the searched clipping's, with the tuned offsets
        offset = tunable.offset.detach().reshape(8, 64)
        assert torch.equal(s.dequantize(tunable.final()), s.dequantize(s.quantize(layer.weight.detach(), offset, None, tunable.max_scale.detach())))


def test_projected_clipping_scales_stay_in_range_and_keep_their_gradient():
    """project_clipping (auto-round's step): a scale pushed past 1 is put back at 1, where the forward
    still passes it a gradient, so a later step can clip the group again."""
    from signround.algorithms.base import LayerTask
    from signround.algorithms.signround import _fake_weights, _Tunables
    from signround.config import WeightScheme

    layer = torch.nn.Linear(64, 8, bias=False)
    tunable = _Tunables(LayerTask("proj", layer, WeightScheme(bits=2, group_size=32, sym=False)), torch.device("cpu"), torch.float32)
    for p in tunable.params():
        p.grad = torch.full_like(p, -1.0)
    tunable.step(0.1, 0.1, project=True)
    assert torch.equal(tunable.max_scale, torch.ones_like(tunable.max_scale))
    assert torch.equal(tunable.min_scale, torch.ones_like(tunable.min_scale))
    (_fake_weights([tunable.spec], [tunable.tensors()])["proj.weight"] - layer.weight.detach()).pow(2).sum().backward()
    assert tunable.max_scale.grad.abs().sum() > 0 and tunable.min_scale.grad.abs().sum() > 0


def test_project_clipping_is_a_recipe_setting_decided_per_layer():
    """The paper recipe projects as auto-round does; fast and full only at 2 bits, where clipping matters
    most (W2A16G64 125.5 against 144.4); at 3 and 4 bits freezing a scale at 1 is the better regulariser
    (W3A16 31.30 projected against 30.26, W4A16 21.51 against 21.06)."""
    from signround.config import WeightScheme

    paper, fast, full = (QuantConfig(recipe=r).resolved() for r in ("paper", "fast", "full"))
    assert paper.project_clipping is True and fast.project_clipping == "auto" == full.project_clipping
    fast = QuantConfig()
    assert fast.projects_clipping(WeightScheme(bits=2, group_size=64, sym=False))
    assert not fast.projects_clipping(WeightScheme(bits=3)) and not fast.projects_clipping(WeightScheme(bits=4))
    assert QuantConfig(project_clipping=False).projects_clipping(WeightScheme(bits=2)) is False
    assert QuantConfig(project_clipping=True).projects_clipping(WeightScheme(bits=8)) is True
    with pytest.raises(signround.ConfigError, match="project_clipping='yes' must be True, False or 'auto'"):
        QuantConfig(project_clipping="yes")


def test_block_loss_weighs_a_massive_token_down_to_a_typical_tokens_weight():
    from signround.algorithms import block_loss

    target = torch.ones(2, 8, 16)
    target[:, 0] *= 100.0  # an attention sink: 10^4 times a typical token's energy
    output = target * 1.1  # the same 10% relative error on every token
    plain, tamed = block_loss(output, target, False), block_loss(output, target, True)
    assert torch.isclose(plain, torch.nn.functional.mse_loss(output, target))
    typical_err = 0.01  # (0.1 * 1)^2 per channel
    assert plain > 100 * typical_err  # the sink's error dominates the plain loss
    assert torch.isclose(tamed, torch.tensor(typical_err))  # tamed, every token counts like a typical one
    uniform = torch.ones(2, 8, 16)
    assert torch.isclose(block_loss(uniform * 1.1, uniform, True), block_loss(uniform * 1.1, uniform, False))  # no outlier: plain MSE


@pytest.mark.parametrize("arch,scheme", [("llama", "W2A16G32"), ("gpt2", "W4A16G32")])
def test_compiled_tuning_step_matches_the_eager_one(arch, scheme):
    """compile=True traces the whole step (quantize-dequantize in its plain-op form, the block, the loss)
    through torch.compile; it must tune to the eager step's result: the same block losses and, but for a
    rare rounding decision flipped by a gradient's last bits, the same codes. gpt2: transposed Conv1D weights.
    The three blocks share one graph: a recompile per block would cost a compile each (and past dynamo's
    recompile limit of 8, silently eager steps). The compiled step also runs attention.py's causal attention."""
    from torch._dynamo.utils import counters

    from signround.hardware import can_compile

    if not can_compile(torch.device("cpu")):
        pytest.fail("no C++ compiler for torch.compile: install g++ (build-essential)")
    reports, codes = [], []
    for compile in (False, True):
        model = make(arch, num_hidden_layers=3)  # gpt2's config maps the name to n_layer
        config = QuantConfig(scheme=scheme, iters=6, nsamples=8, seqlen=32, batch_size=4)
        frames = counters["frames"]["total"]
        reports.append(signround.quantize(model, config, RunConfig(amp="off", compile=compile), calibration=calib_ids(8, 32)))
        assert model.config._attn_implementation == "sdpa"  # the compiled step's own attention was for the tuning only
        codes.append(torch.cat([v.flatten() for k, v in sorted(model.state_dict().items()) if k.endswith("qweight")]))
    from signround.algorithms.signround import _compiled_tuned_loss

    assert _compiled_tuned_loss.cache_info().currsize == 1  # the compiled step was the one taken
    assert len(reports[1].block_losses) == 3 and counters["frames"]["total"] - frames == 1  # traced once, for all three blocks
    eager, compiled = reports
    for (a_before, a_after), (b_before, b_after) in zip(eager.block_losses, compiled.block_losses):
        assert b_before == pytest.approx(a_before, rel=1e-5) and b_after == pytest.approx(a_after, rel=0.02)
    assert (codes[0] == codes[1]).float().mean() > 0.99


def test_a_compiled_step_that_disagrees_with_the_eager_one_is_dropped_for_the_block(monkeypatch):
    """A miscompiled graph (as inductor once gave for bf16 partial groups) must not tune the block: the
    first step checks the compiled loss against the eager one and falls back, saying so."""
    from signround.algorithms import signround as algorithm
    from signround.hardware import can_compile

    if not can_compile(torch.device("cpu")):
        pytest.fail("no C++ compiler for torch.compile: install g++ (build-essential)")
    monkeypatch.setattr(algorithm, "_compiled_tuned_loss", lambda: lambda *args: algorithm._tuned_loss(*args) * 3)
    config = QuantConfig(scheme="W4A16G32", iters=6, nsamples=8, seqlen=32, batch_size=4)
    expected = signround.quantize(make("llama"), config, RunConfig(amp="off", compile=False), calibration=calib_ids(8, 32))
    with pytest.warns(UserWarning, match="compiled step's loss disagrees"):
        report = signround.quantize(make("llama"), config, RunConfig(amp="off", compile=True), calibration=calib_ids(8, 32))
    assert report.block_losses == expected.block_losses


def test_a_compiled_step_that_fails_is_replaced_by_the_eager_one_for_the_block(monkeypatch):
    """A compile failure (inductor once raised 'expected scalar type float but found bfloat16' in the backward
    of Gemma-3's first global-attention block) must not reach the user: the block is tuned eagerly, said so."""
    from signround.algorithms import signround as algorithm
    from signround.hardware import can_compile

    if not can_compile(torch.device("cpu")):
        pytest.fail("no C++ compiler for torch.compile: install g++ (build-essential)")

    def broken(*args):
        raise RuntimeError("expected scalar type float but found bfloat16\n(a long inductor trace)")

    monkeypatch.setattr(algorithm, "_compiled_tuned_loss", lambda: broken)
    config = QuantConfig(scheme="W4A16G32", iters=6, nsamples=8, seqlen=32, batch_size=4)
    expected = signround.quantize(make("llama"), config, RunConfig(amp="off", compile=False), calibration=calib_ids(8, 32))
    with pytest.warns(UserWarning, match="the compiled step failed .RuntimeError: expected scalar type float but found bfloat16.; tuned eagerly"):
        report = signround.quantize(make("llama"), config, RunConfig(amp="off", compile=True), calibration=calib_ids(8, 32))
    assert report.block_losses == expected.block_losses
    assert sum("compiled step failed" in note for note in report.notes) == 2  # once per block
    assert "(RuntimeError: expected scalar type float but found bfloat16)" in report.notes[0]


def test_a_real_compile_failure_on_mixed_sliding_and_global_layers_falls_back_to_eager(monkeypatch):
    """Gemma-3's layout (sliding-window layers and a global one) under bf16 autocast, compiled: the global
    layer's attention once went to the CPU attention with v in bf16 and inductor failed in its backward,
    killing the run. With that bug put back, the block must be tuned eagerly, with plain sdpa, and the
    run must finish; without it, every block compiles."""
    import transformers as tf
    from tiny_models import COMMON

    from signround import attention
    from signround.hardware import can_compile

    if not can_compile(torch.device("cpu")):
        pytest.fail("no C++ compiler for torch.compile: install g++ (build-essential)")
    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=16,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    serves = attention._serves
    monkeypatch.setattr(attention, "_serves", lambda module, q, k, v, *rest: serves(module, q, k, k, *rest))  # v's dtype unchecked, as before
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.warns(UserWarning, match="block 1: the compiled step failed"):
        report = signround.quantize(model, QuantConfig(scheme="W4A16G32", iters=3, nsamples=4, seqlen=32, batch_size=2),
                                    RunConfig(amp="bf16", compile=True), calibration=calib_ids(4, 32))
    assert len(report.block_losses) == 3 and all(after is not None for _, after in report.block_losses)
    assert [n for n in report.notes if "compiled step failed" in n] == [report.notes[0]] and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("keep", ["last", "average"])
def test_a_compiled_step_fallback_still_keeps_the_tuned_parameters(monkeypatch, keep):
    """The fallback's note once doubled as the divergence flag: keep=last/average then returned the
    block's starting point (round-to-nearest) after a fallback. The result must be the eager run's."""
    from signround.algorithms import signround as algorithm
    from signround.hardware import can_compile

    if not can_compile(torch.device("cpu")):
        pytest.fail("no C++ compiler for torch.compile: install g++ (build-essential)")
    monkeypatch.setattr(algorithm, "_compiled_tuned_loss", lambda: lambda *args: algorithm._tuned_loss(*args) * 3)
    monkeypatch.setattr(algorithm, "_agrees_with_eager", lambda *args: False)
    config = QuantConfig(scheme="W4A16G32", iters=6, nsamples=8, seqlen=32, batch_size=4, keep=keep, clip_search=False)
    codes = []
    for compile in (False, True):
        model = make("llama")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signround.quantize(model, config, RunConfig(amp="off", compile=compile), calibration=calib_ids(8, 32))
        codes.append({k: v for k, v in model.state_dict().items() if k.endswith("qweight")})
    start = make("llama")
    signround.quantize(start, QuantConfig(scheme="W4A16G32", method="rtn"))
    rtn = {k: v for k, v in start.state_dict().items() if k.endswith("qweight")}
    assert all(torch.equal(codes[0][k], codes[1][k]) for k in codes[0])  # the eager run's result
    assert any(not torch.equal(codes[1][k], rtn[k]) for k in rtn)  # not the starting point


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["W4A16G64", "W2A16G64", "W3A16G-1"])
def test_compiled_fake_weights_match_the_eager_ones_with_a_partial_group(scheme, dtype):
    """The fake weights as the compiled step builds them, on rows of 96 (a padded last group of 32 at
    group size 64), in fp32 and in the bf16 autocast hands to the matmuls: inductor once gave wrong
    bf16 values when the cast came after dropping the padding."""
    from signround.algorithms.base import LayerTask
    from signround.algorithms.signround import _fake_weights, _Tunables
    from signround.config import WeightScheme

    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 16, bias=False)
    pair = [_Tunables(LayerTask("proj", layer, WeightScheme.preset(scheme)), torch.device("cpu"), dtype) for _ in range(2)]
    start = [p.detach().clone().uniform_(*bounds) for p, bounds in zip(pair[0].params(), [(-0.5, 0.5), (0.6, 1.0), (0.6, 1.0)])]
    upstream = torch.randn(16, 96)
    outputs = []
    for t, fake in zip(pair, (_fake_weights, torch.compile(_fake_weights))):
        with torch.no_grad():
            for p, value in zip(t.params(), start):
                p.copy_(value)
        outputs.append(fake([t.spec], [t.tensors()])["proj.weight"])
        outputs[-1].float().backward(upstream)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for a, b in zip(pair[1].params(), pair[0].params()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_compile_auto_waits_for_a_run_long_enough_to_repay_it():
    """~55 s of compile repays only long runs: SmolLM2's 30 blocks with the full recipe, not the fast one."""
    from signround.config import ConfigError
    from signround.hardware import can_compile

    cpu, auto = torch.device("cpu"), RunConfig()
    assert not auto.compiles(QuantConfig(iters=10), cpu, blocks=2)
    assert not auto.compiles(QuantConfig(recipe="fast"), cpu, blocks=30)
    assert auto.compiles(QuantConfig(recipe="full"), cpu, blocks=30) == can_compile(cpu)
    assert not RunConfig(compile=False).compiles(QuantConfig(recipe="full"), cpu, blocks=30)
    with pytest.raises(ConfigError, match="compile="):
        RunConfig(compile="yes")


def test_gradient_agreement_runs_from_noise_to_unanimity():
    """1 where every row's gradient is the same, 1/2 where rows cancel, between where they partly agree;
    the parameters' gradients are left cleared."""
    from signround.algorithms.signround import _gradient_agreement

    param = torch.zeros(4, requires_grad=True)
    per_row = {"same": [torch.tensor([1.0, -2, 3, -4])] * 4,
               "cancel": [torch.tensor([1.0, -2, 3, -4]), torch.tensor([-1.0, 2, -3, 4])] * 2,
               "partly": [torch.tensor([1.0, 1, 1, 1])] * 3 + [torch.tensor([-1.0, -1, -1, -1])]}
    agreement = {}
    for name, grads in per_row.items():
        def backward(row, grads=grads):
            (param * grads[int(row)]).sum().backward()
        agreement[name] = _gradient_agreement(backward, [param], torch.arange(4))
        assert param.grad is None
    assert agreement["same"] == pytest.approx(1.0) and agreement["cancel"] == pytest.approx(0.5)
    assert agreement["partly"] == pytest.approx(0.75)  # 3 of 4 rows with the mean's sign, all of one size


@pytest.mark.parametrize("threshold,steps_per_block", [(0.0, 24), (1.01, 6)])
def test_adapt_batch_spends_the_row_budget_on_single_row_steps_where_rows_agree(monkeypatch, threshold, steps_per_block):
    """iters x batch_size rows either way: 6 steps of 4 rows, or 24 steps of one row where the rows'
    gradients agree at least AGREEMENT_MIN (forced here to always and never)."""
    import signround.algorithms.signround as sr

    monkeypatch.setattr(sr, "AGREEMENT_MIN", threshold)
    model = make("llama")
    config = QuantConfig(scheme="W4A16G32", iters=6, nsamples=8, seqlen=16, batch_size=4)
    report = signround.quantize(model, config, calibration=calib_ids(8, 16))
    assert report.tuning_steps == steps_per_block * len(report.block_losses)
    assert all(tuned < rtn for rtn, tuned in report.block_losses), report.block_losses


def test_adapt_batch_is_the_fast_recipes_alone_and_can_be_turned_off(monkeypatch):
    import signround.algorithms.signround as sr

    assert QuantConfig().resolved().adapt_batch is True
    assert QuantConfig(recipe="full").resolved().adapt_batch is False is QuantConfig(recipe="paper").resolved().adapt_batch
    monkeypatch.setattr(sr, "AGREEMENT_MIN", 0.0)
    model = make("llama")
    report = signround.quantize(model, QuantConfig(scheme="W4A16G32", iters=6, nsamples=8, seqlen=16, batch_size=4, adapt_batch=False),
                                calibration=calib_ids(8, 16))
    assert report.tuning_steps == 6 * len(report.block_losses)
    with pytest.raises(signround.ConfigError, match="adapt_batch='yes' must be True or False"):
        QuantConfig(adapt_batch="yes")
