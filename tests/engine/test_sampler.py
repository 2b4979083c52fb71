"""Sampler: filters keep the right tokens, penalties follow their rules, seeds reproduce."""
import pytest
import torch
from pydantic import ValidationError

from engine import LLMEngine, SamplingParams
from engine.sampler import Sampler
from engine.sequence import Sequence


def _seq(params: SamplingParams, prompt=(1, 2), output=()) -> Sequence:
    seq = Sequence("r", list(prompt), params, 100, None)
    seq.token_ids += list(output)
    return seq


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 400) -> set[int]:
    sampler = Sampler([0])
    seqs = [_seq(params) for _ in range(n)]
    return set(sampler(logits.expand(n, -1).clone(), seqs))


LOGITS = torch.log(torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]]))


def test_greedy_is_argmax():
    assert _draws(LOGITS, SamplingParams(temperature=0), n=3) == {1}


def test_top_k_top_p_min_p_keep_only_allowed_tokens():
    assert _draws(LOGITS, SamplingParams(top_k=2)) == {1, 2}
    assert _draws(LOGITS, SamplingParams(top_p=0.75)) == {1, 2, 3}    # 0.4 + 0.3 < 0.75
    assert _draws(LOGITS, SamplingParams(top_p=0.7)) == {1, 2}
    assert _draws(LOGITS, SamplingParams(min_p=0.5)) == {1, 2}        # >= 0.2
    assert _draws(LOGITS, SamplingParams(top_k=3, top_p=0.5)) == {1, 2}  # 0.4/0.85 < 0.5
    assert _draws(LOGITS, SamplingParams()) == {0, 1, 2, 3, 4}


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[9.0, 0.0, 8.0, 1.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    assert Sampler([0])(logits.clone(), [_seq(params)]) == [3]
    assert Sampler([0])(logits.clone(), [_seq(params, output=[3, 3])]) == [0]


def test_penalties():
    logits = torch.tensor([[2.0, 1.9, -1.0, 1.95]])
    rep = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler([])(logits.clone(), [_seq(rep, prompt=[0])]) == [3]       # 2.0 -> 1.0
    freq = SamplingParams(temperature=0, frequency_penalty=0.06)
    assert Sampler([])(logits.clone(), [_seq(freq, output=[0])]) == [3]      # 2.0 -> 1.94
    pres = SamplingParams(temperature=0, presence_penalty=0.5)
    assert Sampler([])(logits.clone(), [_seq(pres, output=[0, 0, 3])]) == [1]
    # Repetition penalty makes negative logits more negative, per HF's rule.
    neg = torch.tensor([[-1.0, -1.5]])
    assert Sampler([])(neg.clone(), [_seq(rep, prompt=[0])]) == [1]


def test_seeded_request_is_reproducible_inside_a_busy_batch(tiny_llama):
    llm = LLMEngine(tiny_llama, num_blocks=256, max_num_seqs=16)
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=42, max_tokens=12)
    alone = llm.generate(["the seeded prompt"], seeded, use_tqdm=False)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=20, seed=s) for s in range(5)]
    others += [SamplingParams(temperature=1.2, max_tokens=15)] * 5
    prompts = [f"busy prompt number {i}" for i in range(10)] + ["the seeded prompt"]
    together = llm.generate(prompts, others + [seeded], use_tqdm=False)[-1].token_ids
    assert alone == together
    different = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=43, max_tokens=12)
    assert llm.generate(["the seeded prompt"], different, use_tqdm=False)[0].token_ids != alone


def test_logit_bias_shifts_and_bans_tokens(tiny_llama):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    assert Sampler([])(logits.clone(), [_seq(SamplingParams(temperature=0,
                                                            logit_bias={2: 1.6}))]) == [2]
    banned = SamplingParams(logit_bias={0: -100, 1: -100})
    assert _draws(logits, banned, n=300) <= {2, 3}
    mixed = [_seq(SamplingParams(temperature=0, logit_bias={3: 5})),
             _seq(SamplingParams(temperature=0))]
    assert Sampler([])(logits.expand(2, -1).clone(), mixed) == [3, 0]
    llm = LLMEngine(tiny_llama, num_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = llm.generate(["a prompt"], greedy, use_tqdm=False)[0].token_ids
    forced = llm.generate(["a prompt"], greedy.model_copy(update={"logit_bias": {7: 100.0}}),
                          use_tqdm=False)[0].token_ids
    assert forced == [7] * 6 != plain
    with pytest.raises(ValueError, match="logit_bias: token id 999999"):
        llm.add_request("r", "x", SamplingParams(logit_bias={999999: 1.0}))
    with pytest.raises(ValidationError, match="logit_bias"):
        SamplingParams(logit_bias={"3": 101})
    assert SamplingParams(logit_bias={"3": -2}).logit_bias == {3: -2.0}
