"""Stacked expert tensors as per-expert (out, in) matrices: names, shapes, an exact round trip, and the
meaning of each matrix checked against each family's expert computation written out here."""

import pytest
import torch
from tiny_models import MOE_CONFIGS, make_moe

from signround import experts
from signround.blocks import find_blocks


def _moe_blocks(model):
    return [b for b in find_blocks(model)[1] if experts.find_expert_modules(b)]


@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
def test_every_expert_projection_is_listed_with_its_shape(arch):
    model = make_moe(arch)
    blocks = _moe_blocks(model)
    assert blocks
    for block in blocks:
        found = experts.expert_matrices(block)
        (module_name, module), = experts.find_expert_modules(block).items()
        assert len(found) == 3 * module.down_proj.shape[0]
        assert f"{module_name}.0.gate_proj" in found and f"{module_name}.3.down_proj" in found
        for entry in found.values():
            shape = experts.read(module, entry).shape
            assert shape == ((64, 96) if entry.part == "down" else (96, 64)), (entry.name, shape)


@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
def test_matrices_reassemble_into_the_stacked_parameters_exactly(arch):
    block = _moe_blocks(make_moe(arch))[0]
    (_, module), = experts.find_expert_modules(block).items()
    found = experts.expert_matrices(block).values()
    for param in ("gate_up_proj", "down_proj"):
        matrices = {(e.expert, e.part): experts.read(module, e) for e in found if e.param == param}
        assert torch.equal(experts.assemble(module, param, matrices), getattr(module, param))


def _expected(arch, module, matrices, e, x):
    """One expert's output, from its matrices, as each family defines it."""
    gate, up, down = (matrices[(e, p)] for p in experts.PARTS)
    if arch != "gpt_oss":
        return torch.nn.functional.silu(x @ gate.t()) * (x @ up.t()) @ down.t()
    bias = module.gate_up_proj_bias[e]
    g = (x @ gate.t() + bias[0::2]).clamp(max=module.limit)
    u = (x @ up.t() + bias[1::2]).clamp(-module.limit, module.limit)
    return ((u + 1) * g * torch.sigmoid(g * module.alpha)) @ down.t() + module.down_proj_bias[e]


@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
def test_gate_up_and_down_mean_what_their_names_say(arch):
    block = _moe_blocks(make_moe(arch))[0]
    (_, module), = experts.find_expert_modules(block).items()
    matrices = {(e.expert, e.part): experts.read(module, e) for e in experts.expert_matrices(block).values()}
    x = torch.randn(5, 64)
    with torch.no_grad():
        for e in range(module.down_proj.shape[0]):
            routed = module(x, torch.full((5, 1), e), torch.ones(5, 1))  # every token to expert e, weight 1
            torch.testing.assert_close(routed, _expected(arch, module, matrices, e, x), rtol=1e-4, atol=1e-5)


def test_routers_stay_16bit_unless_asked():
    """Qwen2-MoE's shared-expert gate is an nn.Linear (hidden -> 1): kept 16-bit with its reason, quantized on request."""
    import signround

    for routers in (False, True):
        model = make_moe("qwen2_moe")
        report = signround.quantize(model, signround.QuantConfig(scheme="W4A16G32", method="rtn", quantize_routers=routers))
        name = "model.layers.0.mlp.shared_expert_gate"
        assert (name in report.quantized) == routers
        assert routers or report.skipped[name] == "a router: kept 16-bit (quantize_routers quantizes it)"


def _with_matrices(model, matrices_of):
    """A copy of `model` whose every expert projection is replaced by `matrices_of(module_name, entry)`."""
    import copy

    model = copy.deepcopy(model)
    for block_index, block in enumerate(find_blocks(model)[1]):
        for name, module in experts.find_expert_modules(block).items():
            for param in experts.stacked_params(module):
                matrices = {(e.expert, e.part): matrices_of(block_index, e) for e in experts.expert_matrices_of(module, name) if e.param == param}
                getattr(module, param).data.copy_(experts.assemble(module, param, matrices))
    return model


@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
def test_every_expert_is_quantized_and_runs_through_the_models_own_expert_code(arch):
    """Every expert projection is packed; the packed model computes what the original model computes
    with the dequantized matrices substituted into its stacked tensors."""
    import signround
    from signround.qlinear import QuantLinear

    model = make_moe(arch)
    import copy

    reference = copy.deepcopy(model)
    report = signround.quantize(model, signround.QuantConfig(scheme="W4A16G32", method="rtn"))
    blocks = find_blocks(model)[1]
    packed = {(i, n): m for i, b in enumerate(blocks) for n, m in b.named_modules() if isinstance(m, experts.QuantExperts)}
    assert packed
    for (i, name), module in packed.items():
        for e in range(module.experts):
            for part_name, layer in module.expert(e).named_children():
                assert isinstance(layer, QuantLinear)
                assert f"model.layers.{i}.{name}.{e}.{part_name}" in report.quantized
    assert not [n for n in report.kept_16bit if "experts" in n]  # only routers and embeddings stay 16-bit
    assert report.share("quantized") > 0.5

    def dequantized(block_index, entry):
        return packed[(block_index, entry.module)].get_submodule(f"{entry.expert}.{entry.part}_proj").dequantized_weight()

    reference = _with_matrices(reference, dequantized)
    for name, layer in model.named_modules():  # the attention's packed layers
        if isinstance(layer, QuantLinear) and ".experts." not in name:
            reference.get_submodule(name).weight.data.copy_(layer.dequantized_weight())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_signround_tunes_the_experts_and_the_folder_reloads(arch, tmp_path):
    import signround

    model = make_moe(arch)
    calibration = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    report = signround.quantize(model, signround.QuantConfig(scheme="W2A16G32", iters=20, nsamples=8, seqlen=16, batch_size=4),
                                calibration=calibration)
    assert all(after < before for before, after in report.block_losses)  # tuning the experts too lowers each block's error
    ids = calibration[:2]
    with torch.no_grad():
        fake = model(ids).logits
    reloaded = signround.load(signround.save(model, tmp_path / "out"))
    assert sum(isinstance(m, experts.QuantExperts) for m in reloaded.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, fake, atol=2e-3 * fake.abs().max().item(), rtol=1e-2)


def test_a_stacked_tensor_is_quantized_whole_or_not_at_all():
    import signround

    with pytest.raises(signround.ConfigError, match=r"experts\.1\.gate_proj would stay 16-bit .* quantized or kept whole"):
        signround.quantize(make_moe("qwen3_moe"), signround.QuantConfig(scheme="W4A16G32", method="rtn", layer_overrides={r"experts\.1\.gate": "fp16"}))
    model = make_moe("qwen3_moe")
    report = signround.quantize(model, signround.QuantConfig(scheme="W4A16G32", method="rtn", layer_overrides={r"experts\..*down": "fp16"}))
    assert "model.layers.0.mlp.experts.2.down_proj" in report.skipped and "model.layers.0.mlp.experts.2.up_proj" in report.quantized
    assert "model.layers.0.mlp.experts.2.down_proj.weight" in report.kept_16bit


def test_exports_of_experts_are_refused_before_tuning():
    import signround
    from signround.export import FormatError, check_formats

    with pytest.raises(FormatError, match="mixture-of-experts"):
        check_formats(["awq"], make_moe("mixtral"), signround.QuantConfig(scheme="W4A16G32"))


def test_an_interrupted_moe_run_resumes_to_identical_packed_experts(monkeypatch, tmp_path):
    import signround
    from signround.algorithms.signround import SignRound

    config = signround.QuantConfig(scheme="W4A16G32", iters=4, nsamples=8, seqlen=16, batch_size=4)
    calibration = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    reference = make_moe("mixtral")
    signround.quantize(reference, config, calibration=calibration)

    original = SignRound.quantize_block

    def stop_at_block_1(self, block, layers, data, config):
        if data.index == 1:
            raise KeyboardInterrupt
        return original(self, block, layers, data, config)

    work = tmp_path / "work"
    with monkeypatch.context() as patch:
        patch.setattr(SignRound, "quantize_block", stop_at_block_1)
        with pytest.raises(KeyboardInterrupt):
            signround.quantize(make_moe("mixtral"), config, calibration=calibration, run=signround.RunConfig(work_dir=work))
    resumed = make_moe("mixtral")
    signround.quantize(resumed, config, calibration=calibration, run=signround.RunConfig(work_dir=work))
    a, b = resumed.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and any(".experts.3.down_proj.qweight" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokens_per_expert_are_reported_and_an_expert_without_any_is_named():
    import signround

    model = make_moe("gpt_oss")
    with torch.no_grad():
        for block in find_blocks(model)[1]:
            block.mlp.router.bias[3] = -1e4  # the router never picks expert 3
    calibration = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"1 experts received no calibration tokens.*model\.layers\.0\.mlp\.experts\.3"):
        report = signround.quantize(model, signround.QuantConfig(scheme="W4A16G32", iters=2, nsamples=8, seqlen=16, batch_size=4),
                                    calibration=calibration)
    assert list(report.expert_tokens) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for counts in report.expert_tokens.values():
        assert counts[3] == 0 and min(counts[:3]) > 0 and sum(counts) == 8 * 16 * model.config.num_experts_per_tok
    assert "calibration tokens per expert: min 0" in report.summary()


def test_what_else_an_experts_module_holds_keeps_its_name_and_values():
    """Ergo's experts hold a post_expert_norm module: QuantExperts keeps such children (and buffers) as they were."""
    import signround

    model = make_moe("qwen3_moe")
    module = model.model.layers[0].mlp.experts
    module.add_module("post_expert_norm", torch.nn.LayerNorm(64))
    module.register_buffer("scale", torch.tensor([2.0]))
    with torch.no_grad():
        module.post_expert_norm.weight.normal_()
    kept = module.post_expert_norm.weight.clone()
    signround.quantize(model, signround.QuantConfig(scheme="W4A16G32", method="rtn"))
    state = model.state_dict()
    assert torch.equal(state["model.layers.0.mlp.experts.post_expert_norm.weight"], kept)
    assert torch.equal(state["model.layers.0.mlp.experts.scale"], torch.tensor([2.0]))
    packed = model.model.layers[0].mlp.experts
    assert isinstance(packed, experts.QuantExperts) and {"post_expert_norm.weight", "scale"} <= set(packed.weights(torch.float32))
