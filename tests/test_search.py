"""The bit-budget search (signround/search.py) and `QuantConfig.target_bits` end to end on tiny models."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import calib_ids, make, make_moe

import signround
from signround import budget, search
from signround.blocks import find_blocks
from signround.cache import CacheFactory
from signround.config import ConfigError, QuantConfig
from signround.pipeline import QuantizeReport, plan_layers
from signround.qlinear import QuantLinear

OPTIONS = ("W2A16G32", "W4A16G32", "W8A16")


def streamed_losses(model, config, ids):
    blocks_name, blocks = find_blocks(model)
    tasks = plan_layers(model, blocks_name, blocks, search._searchable(config), QuantizeReport())
    searched = {f"{blocks_name}.{i}.{t.name}": (i, k) for i, ts in enumerate(tasks) for k, t in enumerate(ts)}
    caches = CacheFactory(torch.float32, torch.device("cpu"), None)
    losses, _ = search._fisher_losses(model, blocks_name, blocks, tasks, searched, search.option_schemes(config), config, ids,
                                      torch.device("cpu"), None, caches, None)
    return losses, {name: tasks[i][k] for name, (i, k) in searched.items()}


def direct_losses(model, tasks, config, ids):
    """The same estimate from the whole model's own forward and backward, one row at a time: per token for a
    linear layer (its output gradient and input, by hooks), per row for stacked experts."""
    linears = {name: t for name, t in tasks.items() if t.expert is None}
    fisher = {name: torch.zeros(t.weight().shape) for name, t in linears.items()}

    def recorder(name):
        def hook(module, args, output):
            skip = search.SINK_POSITIONS  # each row's first positions are left out (attention sinks)
            x = args[0].detach().reshape(1, ids.shape[1], -1)[:, skip:].square().flatten(0, -2)  # OPT's MLP: flattened
            def accumulate(grad):
                fisher[name].add_(grad.reshape(1, ids.shape[1], -1)[:, skip:].square().flatten(0, -2).T @ x)

            output.register_hook(accumulate)
        return hook

    handles = [t.module.register_forward_hook(recorder(name)) for name, t in linears.items()]
    stacked = {name: search._weight_param(t) for name, t in tasks.items() if t.expert}
    squares = {id(p): torch.zeros_like(p) for p in stacked.values()}
    for row in ids:
        model.zero_grad()
        logits = model(input_ids=row.unsqueeze(0)).logits[0, :-1]
        F.cross_entropy(logits.float(), row[1:]).backward()
        for p in {id(p): p for p in stacked.values()}.values():
            squares[id(p)] += p.grad.square()
    for handle in handles:
        handle.remove()
    fisher.update({name: search._as_matrix(tasks[name], squares[id(p)]) for name, p in stacked.items()})
    return {name: search._option_losses(t, fisher[name], search.option_schemes(config), True) for name, t in tasks.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2", "gemma3", "gpt_neox", "phi3"])
def test_streamed_fisher_equals_the_whole_models_gradients(arch):
    model = make(arch).float()
    ids = calib_ids(3, 24)
    config = QuantConfig(target_bits=4, options=OPTIONS)
    streamed, tasks = streamed_losses(model, config, ids)
    direct = direct_losses(model, tasks, config, ids)
    for name in tasks:
        assert streamed[name] == pytest.approx(direct[name], rel=2e-3, abs=1e-12), name
    assert all(streamed[n][0] > streamed[n][1] > streamed[n][2] > 0 for n in tasks)  # fewer bits, larger predicted loss


def test_token_fisher_leaves_out_each_rows_first_positions():
    skip = search.SINK_POSITIONS
    grad, x = torch.randn(2, skip + 5, 3), torch.randn(2, skip + 5, 4)
    expected = sum(torch.outer(grad[r, t], x[r, t]).square() for r in range(2) for t in range(skip, skip + 5))
    assert torch.allclose(search.token_fisher(grad, x, skip + 5), expected, atol=1e-5)
    assert torch.allclose(search.token_fisher(grad.flatten(0, 1), x.flatten(0, 1), skip + 5), expected, atol=1e-5)  # flattened rows
    grad[:, :skip] *= 1000  # a sink's gradient changes nothing
    assert torch.allclose(search.token_fisher(grad, x, skip + 5), expected, atol=1e-5)
    everything = sum(torch.outer(g, v).square() for g, v in zip(grad.flatten(0, 1), x.flatten(0, 1)))
    assert torch.allclose(search.token_fisher(grad.flatten(0, 1), x.flatten(0, 1), None), everything, rtol=1e-5)  # routed tokens


@pytest.mark.parametrize("blocks", [1, 7, 10])
def test_checkpointed_segments_give_the_same_fisher(blocks):
    """Block inputs are kept only at segment starts (about sqrt(blocks) of them) and recomputed segment by segment."""
    model = make("llama", num_hidden_layers=blocks).float()
    ids = calib_ids(2, 16)
    config = QuantConfig(target_bits=4, options=OPTIONS)
    streamed, tasks = streamed_losses(model, config, ids)
    direct = direct_losses(model, tasks, config, ids)
    assert set(streamed) == set(tasks)
    for name in tasks:
        assert streamed[name] == pytest.approx(direct[name], rel=2e-3, abs=1e-12), name


def test_streamed_fisher_of_stacked_experts():
    model = make_moe("qwen3_moe").float()
    ids = calib_ids(3, 24)
    config = QuantConfig(target_bits=4, options=OPTIONS)
    streamed, tasks = streamed_losses(model, config, ids)
    direct = direct_losses(model, tasks, config, ids)
    assert any(".experts." in n for n in tasks)
    for name in tasks:
        assert streamed[name] == pytest.approx(direct[name], rel=2e-3, abs=1e-12), name


def quantized_tiny(target, **kw):
    kw.setdefault("options", ("W2A16G32", "W3A16G32", "W4A16G32", "W8A16G32"))
    model = make("llama", num_hidden_layers=3)
    config = QuantConfig(scheme="W4A16G32", target_bits=target, method="rtn", nsamples=8, seqlen=32, **kw)
    report = signround.quantize(model, config, calibration=calib_ids(8, 32))
    return model, report


@pytest.mark.parametrize("target", [2.6, 3.3, 4.5, 8.0])
def test_target_bits_holds_the_budget_and_fuses(target):
    model, report = quantized_tiny(target)
    total = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    stored = sum(m.in_features * m.out_features * m.scheme.bits_per_weight(m.in_features)
                 for m in model.modules() if isinstance(m, QuantLinear))
    assert stored / total <= target
    assert report.bits_per_weight == pytest.approx(stored / total)
    for group in budget.group_layers(report.quantized).values():
        assert len({report.quantized[n] for n in group}) == 1
    assert "bit-budget plan" in report.summary()
    plan = model.config.quantization_config["plan"]
    assert set(plan) == set(report.quantized)


def test_a_saved_plan_reproduces_the_schemes(tmp_path):
    model, report = quantized_tiny(3.3, options=("W2A16G32", "W3A16G32", "W4A16G32", "fp16"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": model.config.quantization_config}))
    again = make("llama", num_hidden_layers=3)
    replay = signround.quantize(again, QuantConfig(scheme="W4A16G32", method="rtn", plan=search.read_plan(tmp_path)))
    assert replay.quantized == report.quantized
    assert replay.skipped == report.skipped
    assert replay.search_seconds == 0 and report.search_seconds > 0


@pytest.mark.parametrize("fuse", [False, ("gate_up",), "experts"])
def test_the_split_option_lets_fused_layers_differ(fuse):
    _, split = quantized_tiny(3.0, fuse_groups=fuse)
    assert len(set(budget.group_layers(split.quantized))) < len(split.quantized)
    qkv = [g for key, g in budget.group_layers(split.quantized).items() if key.endswith("{qkv}")]
    assert any(len({split.quantized[n] for n in g}) > 1 for g in qkv)
    for group in budget.group_layers(split.quantized, fuse).values():  # the kinds still fused share one scheme
        assert len({split.quantized[n] for n in group}) == 1


def test_a_split_plan_is_refused_where_the_runtime_fuses_the_layers(tmp_path):
    from signround.export import FormatError, export

    model, split = quantized_tiny(3.0, fuse_groups=("experts",))
    assert any(len({split.quantized[n] for n in g}) > 1 for g in budget.group_layers(split.quantized).values())
    with pytest.raises(FormatError, match=r"format gptq cannot hold .*\{(qkv|gate_up)\} as .*runs them as one matrix"):
        export(model, None, tmp_path / "gptq", "gptq")
    fused, _ = quantized_tiny(3.0)
    export(fused, None, tmp_path / "fused", "gptq")


def test_unknown_fused_kinds_are_refused():
    with pytest.raises(ConfigError, match="fuse_groups names qkvo"):
        QuantConfig(target_bits=4, fuse_groups=("qkvo",))
    with pytest.raises(ConfigError, match="fuse_groups=None: use True, False or kinds of"):
        QuantConfig(target_bits=4, fuse_groups=None)


def test_a_k_type_override_that_falls_back_counts_at_its_gguf_block_size():
    """down_proj's 128-wide rows hold no 256-weight super-block: Q4_K falls back to Q5_0, 5.5 bits in the file."""
    model = make("llama", num_hidden_layers=3)
    config = QuantConfig(scheme="W4A16G32", target_bits=4.5, options=OPTIONS, layer_overrides={"down_proj": "Q4_K"})
    found = search.candidates(model, *find_blocks(model), config)
    assert found.fixed_numel == 3 * 64 * 128 and found.fixed_bits == pytest.approx(5.5 * found.fixed_numel)


def test_overrides_are_fixed_and_counted():
    model, report = quantized_tiny(4.0, layer_overrides={"down_proj": "W8A16"})
    assert all(s.bits == 8 for n, s in report.quantized.items() if n.endswith("down_proj"))
    assert report.bits_per_weight <= 4.0


def test_resumed_run_keeps_its_plan(tmp_path):
    config = QuantConfig(scheme="W4A16G32", target_bits=3.3, method="signround", iters=2, nsamples=4, seqlen=16, batch_size=2, options=OPTIONS)
    ids = calib_ids(4, 16)

    class Stop(Exception):
        pass

    def stop_after_first(i, report):
        if i == 0:
            raise Stop

    with pytest.raises(Stop):
        signround.quantize(make("llama", num_hidden_layers=3), config, signround.RunConfig(work_dir=str(tmp_path)), calibration=ids,
                           on_block_done=stop_after_first)
    first = json.loads((tmp_path / "plan.json").read_text())
    resumed = signround.quantize(make("llama", num_hidden_layers=3), config, signround.RunConfig(work_dir=str(tmp_path)), calibration=ids)
    assert resumed.search_seconds == 0
    assert {n: s.to_dict() for n, s in resumed.quantized.items()} == {n: s for n, s in first["layers"].items() if s is not None}


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_bits=0.5), "between 1 and 16"),
    (dict(target_bits=3, scheme="Q4_K_M"), "give one of the two"),
    (dict(target_bits=3, options=("W3A16", "W9A16")), "unknown scheme 'W9A16'"),
    (dict(target_bits=3, options=()), "options is empty"),
])
def test_bad_budget_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kwargs)


def test_an_unreachable_target_fails_before_the_search():
    with pytest.raises(ConfigError, match="below what the options can reach"):
        quantized_tiny(2.0, options=("W3A16", "W4A16"))


def test_options_a_format_cannot_hold_are_refused_before_tuning(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="cannot hold"):
        signround.run(str(tiny_model_dir), tmp_path / "out", QuantConfig(target_bits=4, options=("W4A16", "Q4_K"), method="rtn"),
                      formats=["gptq"], calibration=calib_ids(4, 16))


def test_streamed_and_whole_runs_choose_the_same_plan(tmp_path, tiny_model_dir):
    config = QuantConfig(target_bits=3.3, options=("W2A16G32", "W4A16G32", "W8A16"), method="rtn", nsamples=4, seqlen=16)
    plans = []
    for stream in (True, False):
        out = tmp_path / f"out-{stream}"
        signround.run(str(tiny_model_dir), out, config, signround.RunConfig(progress=False), calibration=calib_ids(4, 16), stream=stream)
        plans.append(json.loads((out / "config.json").read_text())["quantization_config"]["plan"])
    assert plans[0] == plans[1]
    assert not math.isnan(len(plans[0]))


@pytest.mark.parametrize("formats, fused", [(["signround"], True), (["signround", "gguf"], ["experts"]), (["signround", "gptq"], True)])
def test_a_run_fuses_only_what_its_outputs_runtimes_fuse(tmp_path, tiny_model_dir, formats, fused):
    """llama.cpp runs q/k/v and gate/up as separate matrices (its K mixtures give v its own type); vLLM, which
    loads the other formats, fuses them; signround's own folder alone keeps them fused for a later export."""
    config = QuantConfig(target_bits=6, options=("W4A16G32", "W8A16G32"), method="rtn", nsamples=4, seqlen=16)
    out = tmp_path / "out"
    signround.run(str(tiny_model_dir), out, config, signround.RunConfig(progress=False), formats=formats, calibration=calib_ids(4, 16))
    folder = out / "signround" if len(formats) > 1 else out
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["tuning"]["fuse_groups"] == fused


def test_offloaded_search_caches_choose_the_same_plan(tmp_path):
    config = QuantConfig(scheme="W4A16G32", target_bits=3.3, method="rtn", nsamples=8, seqlen=32, options=OPTIONS)
    plans = []
    for offload in (False, True):
        model = make("llama", num_hidden_layers=3)
        signround.quantize(model, config, signround.RunConfig(offload=offload, progress=False), calibration=calib_ids(8, 32))
        plans.append(model.config.quantization_config["plan"])
    assert plans[0] == plans[1]


def test_default_options_are_narrowed_to_what_the_formats_store(tiny_model_dir):
    from signround.export import held_options
    from signround.models import load_any

    model, _ = load_any(str(tiny_model_dir))
    config = QuantConfig(target_bits=4)
    assert held_options(["signround"], model, config, search.DEFAULT_OPTIONS) == search.DEFAULT_OPTIONS
    # GPTQ: no 5- or 6-bit kernels, and its groups must divide every width (64 here): only W2A16G64 of the defaults
    assert held_options(["gptq"], model, config, search.DEFAULT_OPTIONS) == ("W2A16G64",)
    assert held_options(["gptq"], model, config, ("W3A16G32", "W5A16G32", "W8A16G64", "fp16")) == ("W3A16G32", "W8A16G64", "fp16")
    assert held_options(["gguf"], model, config, search.GGUF_OPTIONS) == search.GGUF_OPTIONS
    # experts: auto-round's and GPTQ's loaders rebuild every expert packed, compressed-tensors' reads symmetric ones only
    moe = make_moe("qwen3_moe")
    asym = "bits=4,group_size=32,sym=false"
    assert held_options(["gptq"], moe, config, ("W4A16G32", "fp16")) == ("W4A16G32",)
    assert held_options(["compressed-tensors"], moe, config, ("W4A16G32", asym)) == ("W4A16G32",)
    assert held_options(["signround"], moe, config, ("W4A16G32", asym, "fp16")) == ("W4A16G32", asym, "fp16")


def test_a_gguf_search_is_not_refused_for_its_placeholder_scheme():
    """`--target-bits` with `--format gguf`: the base scheme (W4A16, group 128) is no layer's once the search
    chooses among K types, so it must not be checked against GGUF's group-32 blocks."""
    from signround.export import check_formats

    model = make("llama", num_hidden_layers=2)
    check_formats(["gguf"], model, QuantConfig(scheme="W4A16", target_bits=4.5, options=search.GGUF_OPTIONS))
    with pytest.raises(signround.export.FormatError, match="groups of 128"):  # an override the search keeps is still checked
        check_formats(["gguf"], model, QuantConfig(scheme="W4A16", target_bits=4.5, options=search.GGUF_OPTIONS,
                                                   layer_overrides={"down_proj": "W4A16"}))
