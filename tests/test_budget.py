"""The bit-budget solver and its bookkeeping (signround/budget.py): exact on small cases, never over budget."""

import itertools
import math
import random

import pytest

from signround import budget


def brute_force(costs, losses, limit):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[j] for c, j in zip(costs, pick)) <= limit:
            loss = sum(v[j] for v, j in zip(losses, pick))
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_solver_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    groups, options = rng.randint(1, 6), rng.randint(1, 4)
    costs = [[rng.randint(1, 9) for _ in range(options)] for _ in range(groups)]
    losses = [[rng.random() for _ in range(options)] for _ in range(groups)]
    limit = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    pick = budget.solve(costs, losses, limit, resolution=limit)  # one step per cost unit: exact
    assert sum(c[j] for c, j in zip(costs, pick)) <= limit
    assert sum(v[j] for v, j in zip(losses, pick)) == pytest.approx(brute_force(costs, losses, limit))


def random_layers(rng, count, options):
    layers = []
    for i in range(count):
        out, inp = rng.choice([64, 96, 576, 1536]), rng.choice([64, 576, 1536, 100])
        bits = tuple(b + rng.random() * 0.5 if rng.random() > 0.1 else math.inf for b in options)
        bits = bits if not all(math.isinf(b) for b in bits) else (options[0],) + bits[1:]
        layers.append(budget.Layer(f"model.layers.{i // 7}.part{i}", out * inp, bits, tuple(rng.random() / b for b in options)))
    return layers


@pytest.mark.parametrize("seed", range(40))
def test_the_budget_is_never_exceeded(seed):
    rng = random.Random(seed)
    raw = sorted(rng.sample([2, 3, 4, 5, 6, 8, 16], rng.randint(2, 5)))
    names = [f"o{b}" for b in raw]
    layers = random_layers(rng, rng.randint(1, 40), raw)
    least = sum(layer.numel * min(layer.bits) for layer in layers) / sum(layer.numel for layer in layers)
    target = least + rng.random() * 4
    choice = budget.choose(layers, names, target)
    assert set(choice) == {layer.name for layer in layers}
    assert budget.average_bits(choice, layers, names) <= target + 1e-12
    assert all(not math.isinf(layer.bits[names.index(choice[layer.name])]) for layer in layers)


def test_more_budget_never_predicts_more_loss():
    rng = random.Random(0)
    layers = random_layers(rng, 30, [2, 3, 4, 8])
    names = ["a", "b", "c", "d"]
    predicted = []
    for target in (3.5, 4.5, 6, 9):
        choice = budget.choose(layers, names, target)
        predicted.append(sum(layer.loss[names.index(choice[layer.name])] for layer in layers))
    assert predicted == sorted(predicted, reverse=True)


def test_an_unreachable_budget_names_the_least_it_can_be():
    layers = [budget.Layer("a", 100, (2.5, 4.25), (1.0, 0.1))]
    with pytest.raises(budget.BudgetError, match="2.500 bits per weight"):
        budget.choose(layers, ["W2", "W4"], 2.0)


def test_fixed_layers_count_against_the_budget():
    layers = [budget.Layer("a", 100, (2.0, 4.0), (1.0, 0.0))]
    assert budget.choose(layers, ["W2", "W4"], 4.0) == {"a": "W4"}
    assert budget.choose(layers, ["W2", "W4"], 9.0, fixed_bits=16 * 100, fixed_numel=100) == {"a": "W2"}
    assert budget.choose(layers, ["W2", "W4"], 10.0, fixed_bits=16 * 100, fixed_numel=100) == {"a": "W4"}


def test_fused_layers_share_one_scheme():
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    names += [f"model.layers.1.mlp.experts.{e}.{p}_proj" for e in range(3) for p in ("gate", "up", "down")]
    rng = random.Random(1)
    layers = [budget.Layer(n, 1000, (2.0, 4.0, 8.0), (rng.random() * 10, rng.random(), 0.0)) for n in names]
    fused = budget.choose(layers, ["W2", "W4", "W8"], 3.7)
    for group in budget.group_layers(names).values():
        assert len({fused[n] for n in group}) == 1
    assert len(budget.group_layers(names)) == 5  # qkv, o, gate_up, down, the experts
    split = budget.choose(layers, ["W2", "W4", "W8"], 3.7, fuse=False)
    assert sum(layer.loss[["W2", "W4", "W8"].index(split[layer.name])] for layer in layers) <= \
        sum(layer.loss[["W2", "W4", "W8"].index(fused[layer.name])] for layer in layers)


def test_fused_keys():
    assert budget.fused_key("model.layers.3.self_attn.k_proj") == "model.layers.3.self_attn.{qkv}"
    assert budget.fused_key("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.{gate_up}"
    assert budget.fused_key("model.layers.3.mlp.experts.7.up_proj") == "model.layers.3.mlp.experts.{experts}"
    assert budget.fused_key("model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"
    assert budget.fused_key("model.layers.3.self_attn.o_proj") == "model.layers.3.self_attn.o_proj"
    # only the kinds a runtime fuses stay together: GGUF's experts are one tensor, its q/k/v three
    assert budget.fused_key("model.layers.3.self_attn.k_proj", ("experts",)) == "model.layers.3.self_attn.k_proj"
    assert budget.fused_key("model.layers.3.mlp.experts.7.up_proj", ("experts",)) == "model.layers.3.mlp.experts.{experts}"
    assert budget.fused_key("model.layers.3.mlp.experts.7.up_proj", False) == "model.layers.3.mlp.experts.7.up_proj"
