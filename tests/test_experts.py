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
