import json
import math
from types import SimpleNamespace

import pytest
import torch
from tiny_models import CONFIGS, make

from signround import evaluate
from signround.evaluate import perplexity, split_head, token_losses
from signround.tasks import TaskFormatError, encode_pair, evaluate_task, load_task

ALPHABET = " abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    bos_token_id, eos_token_id = 1, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ALPHABET.index(c) for c in text]}


class BigramLM(torch.nn.Module):
    """logits[t] = table[token t]: every probability is known in closed form."""

    def __init__(self, seed=0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(2 + len(ALPHABET), 2 + len(ALPHABET), generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])

    def logp(self, prev, nxt):
        row = self.table[prev].tolist()
        return row[nxt] - math.log(sum(math.exp(v) for v in row))


def test_perplexity_matches_hand_computation():
    model = BigramLM()
    ids = torch.tensor(CharTokenizer()("the cat sat on the mat and the dog ran")["input_ids"])
    nll = count = 0
    for begin in range(0, len(ids), 8):  # windows of 8, each scoring its 7 (or fewer) inner transitions
        w = ids[begin : begin + 8].tolist()
        for a, b in zip(w, w[1:]):
            nll -= model.logp(a, b)
            count += 1
    assert perplexity(model, ids, seqlen=8) == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_perplexity_with_bos_scores_the_same_tokens_plus_the_first():
    model = BigramLM()
    ids = torch.tensor(CharTokenizer()("abcabc")["input_ids"])
    nll = -sum(model.logp(a, b) for a, b in zip(ids.tolist(), ids.tolist()[1:]))
    assert perplexity(model, ids, seqlen=6, bos_token_id=1) == pytest.approx(math.exp(nll / 5), rel=1e-6)


@pytest.mark.parametrize("arch", CONFIGS)
def test_logits_made_a_few_positions_at_a_time_score_as_the_whole(arch, monkeypatch):
    """The head runs on LOGIT_ROWS positions at a time (a 262k vocabulary's logits for a 2,048-token window
    are 2 GiB): the same losses as the model's own forward, softcapped Gemma-2 included."""
    model = make(arch)
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(0))
    split = split_head(model, ids[:16])
    assert split is not None
    monkeypatch.setattr(evaluate, "LOGIT_ROWS", 7)
    torch.testing.assert_close(token_losses(model, ids, split), token_losses(model, ids), rtol=1e-5, atol=1e-5)


def test_a_model_whose_logits_are_not_head_of_body_is_scored_whole():
    class ScaledLogits(type(make("llama"))):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    reference = make("llama")
    model = ScaledLogits(reference.config)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(0))
    assert split_head(model, ids[:16]) is None
    logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    assert perplexity(model, ids, seqlen=30) == pytest.approx(expected, rel=1e-5)


def _task_file(tmp_path, examples):
    f = tmp_path / "task.json"
    f.write_text(json.dumps({"name": "toy", "examples": examples}))
    return f


def test_a_model_that_finishes_loading_on_its_first_call_is_called_whole_first():
    """compressed-tensors decompresses int8/fp8 layers in the model's first forward: calling the body alone
    before that meets compressed weights. Scoring calls the model itself first."""
    model = make("llama")
    ready = []
    model.register_forward_pre_hook(lambda module, args: ready.append(True))

    def not_loaded_yet(module, args):
        if not ready:
            raise RuntimeError("expected m1 and m2 to have the same dtype")

    model.get_decoder().register_forward_pre_hook(not_loaded_yet)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(perplexity(model, ids))


def test_task_scorer_picks_the_choice_with_the_highest_summed_loglikelihood(tmp_path):
    model, tok = BigramLM(seed=3), CharTokenizer()
    examples = [{"input": "ab ", "target_scores": {"c": 1, "dd": 0, "e": 0}},
                {"input": "", "target_scores": {"x": 0, "yz": 1}},
                {"input": "q", "target_scores": {"ab": 1, "b": 0}}]
    task = load_task(_task_file(tmp_path, examples))
    result = evaluate_task(model, tok, task, batch_size=2)
    expected, expected_norm = [], []
    for ex in examples:
        context = ex["input"].strip()
        scores, normed = [], []
        for choice in ex["target_scores"]:
            ctx_ids = tok(context)["input_ids"] or [tok.bos_token_id]
            cont_ids = tok(" " + choice)["input_ids"]
            seq = ctx_ids + cont_ids
            ll = sum(model.logp(seq[i - 1], seq[i]) for i in range(len(ctx_ids), len(seq)))
            scores.append(ll)
            normed.append(ll / len(choice))
        best = list(ex["target_scores"])[scores.index(max(scores))]
        best_norm = list(ex["target_scores"])[normed.index(max(normed))]
        expected.append(ex["target_scores"][best] > 0)
        expected_norm.append(ex["target_scores"][best_norm] > 0)
    assert result.n == 3
    assert result.acc == pytest.approx(sum(expected) / 3)
    assert result.acc_norm == pytest.approx(sum(expected_norm) / 3)
    assert result.chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    p = result.acc
    assert result.acc_stderr == pytest.approx(math.sqrt(p * (1 - p) * 3 / 2 / 3) if 0 < p < 1 else 0.0)


def test_encode_pair_moves_trailing_space_like_lm_eval():
    tok = CharTokenizer()
    ctx, cont = encode_pair(tok, "ab ", "c")
    assert ctx == tok("ab")["input_ids"] and cont == tok(" c")["input_ids"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"examples": []}), "has no 'examples' list"),
    (json.dumps({"examples": [{"input": "x"}]}), r"examples\[0\] needs a string 'input' and a 'target_scores'"),
    (json.dumps({"examples": [{"input": "x", "target_scores": {"a": 0, "b": 0}}]}), "no choice with a positive target score"),
])
def test_malformed_task_files_are_named(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(TaskFormatError, match=message):
        load_task(f)


def test_missing_task_file():
    with pytest.raises(FileNotFoundError, match="task file nope.json not found"):
        load_task("nope.json")


def test_bos_auto_follows_the_tokenizer():
    from signround.evaluate import use_bos

    class Adds(CharTokenizer):
        def __call__(self, text, add_special_tokens=False):
            ids = super().__call__(text)["input_ids"]
            return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    assert use_bos(Adds(), "auto") and not use_bos(CharTokenizer(), "auto")
    assert use_bos(CharTokenizer(), "yes") and not use_bos(Adds(), "no")
