"""Logprobs and prompt logprobs equal transformers' log_softmax of its logits (fp32, 1e-4),
for sampled tokens, top-N and prompt tokens, alone and inside a busy batch."""
import random

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from engine import LLMEngine, SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ``ids``: ``[len, vocab]``."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check_position(entry, want: torch.Tensor, token: int, top_n: int, tokenizer) -> None:
    assert entry.token.token_id == token
    assert abs(entry.token.logprob - want[token].item()) < TOL
    assert entry.token.rank == int((want > want[token]).sum()) + 1
    assert entry.token.text == tokenizer.decode([token], skip_special_tokens=False)
    values, ids = want.topk(top_n)
    assert [e.token_id for e in entry.top] == ids.tolist()
    assert [e.rank for e in entry.top] == list(range(1, top_n + 1))
    assert max(abs(e.logprob - v) for e, v in zip(entry.top, values.tolist())) < TOL if top_n \
        else entry.top == []


def _check(hf, llm, prompt: list[int], out, params: SamplingParams) -> None:
    want = _hf_logprobs(hf, prompt + out.token_ids)
    if params.logprobs is not None:
        assert len(out.logprobs) == len(out.token_ids)
        for i, (entry, token) in enumerate(zip(out.logprobs, out.token_ids)):
            _check_position(entry, want[len(prompt) - 1 + i], token, params.logprobs,
                            llm.tokenizer)
        total = sum(want[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids))
        assert abs(out.cumulative_logprob - total) < TOL * len(out.token_ids)
    if params.prompt_logprobs is not None:
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for j in range(1, len(prompt)):
            _check_position(out.prompt_logprobs[j], want[j - 1], prompt[j],
                            params.prompt_logprobs, llm.tokenizer)
    else:
        assert out.prompt_logprobs is None


def _prompts(vocab: int, lengths: list[int], seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def test_alone_sampled_and_prompt(hf, tiny_llama):
    llm = LLMEngine(tiny_llama, num_blocks=64)
    prompt = _prompts(hf.config.vocab_size, [37])[0]
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True,
                            logprobs=5, prompt_logprobs=3)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    _check(hf, llm, prompt, out, params)
    assert llm.allocator.num_free == llm.allocator.num_blocks


def test_busy_batch_chunked_prefill_and_preemption(hf, tiny_llama):
    """Mixed requests (greedy, sampled, penalized, with and without logprobs) share steps;
    long prompts are chunked and the small pool forces preemptions."""
    vocab = hf.config.vocab_size
    lengths = [1, 5, 16, 17, 40, 95, 130, 33, 64, 8, 71, 3]
    prompts = _prompts(vocab, lengths)
    params = []
    for i in range(len(prompts)):
        params.append(SamplingParams(
            temperature=[0, 0.8, 1.3][i % 3], seed=100 + i, max_tokens=[6, 20, 11][i % 3],
            ignore_eos=True, logprobs=[None, 0, 4, 20][i % 4],
            prompt_logprobs=[2, None, 0][i % 3],
            # penalties and temperature change sampling, never the reported distribution
            repetition_penalty=1.3 if i % 5 == 0 else 1.0, top_k=7 if i % 4 == 1 else 0))
    llm = LLMEngine(tiny_llama, num_blocks=20, max_num_seqs=8, max_num_batched_tokens=64)
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.stats()
    assert stats.num_preemptions > 0 and stats.num_chunked_prefills > 0 and stats.peak_running > 4
    for prompt, out, p in zip(prompts, outs, params):
        _check(hf, llm, prompt, out, p)
    assert llm.allocator.num_free == llm.allocator.num_blocks


def test_prompt_scoring_only(hf, tiny_llama):
    """max_tokens 0 prefills and reports the prompt's logprobs, generating nothing; the prompt
    logprobs skip the prefix cache (cached blocks have no logits), so a warm cache agrees."""
    llm = LLMEngine(tiny_llama, num_blocks=64)
    prompt = _prompts(hf.config.vocab_size, [50])[0]
    llm.generate([prompt + [7]], SamplingParams(max_tokens=1), use_tqdm=False)   # warm cache
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
    assert out.completion_tokens == 0 and out.prompt_tokens == len(prompt)
    _check(hf, llm, prompt, out, params)
    assert llm.allocator.num_free == llm.allocator.num_blocks


def test_deltas_carry_their_tokens_logprobs_and_prompt_logprobs_once(tiny_llama):
    llm = LLMEngine(tiny_llama, num_blocks=64)
    llm.add_request("r", list(range(3, 30)),
                    SamplingParams(max_tokens=5, ignore_eos=True, logprobs=1, prompt_logprobs=1))
    deltas = []
    while llm.has_unfinished():
        deltas += llm.step()
    assert [d.prompt_logprobs is not None for d in deltas] == [True] + [False] * 4
    assert all(len(d.logprobs) == len(d.token_ids) == 1 for d in deltas)
    assert deltas[-1].finished


@pytest.mark.parametrize("bad, field", [
    (dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(n=0), "n"), (dict(n=3, best_of=2), "best_of"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=0, prompt_logprobs=1, n=2), "max_tokens"),
])
def test_invalid_values_name_the_field(bad, field):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**bad)


def test_smollm2_choices_and_prompt_match_transformers(smollm2_dir):
    """The real checkpoint (30 layers, byte-level BPE with multi-byte tokens): sampled choices
    of an n=2 request and its prompt logprobs, beside other requests, within 1e-4."""
    llm = LLMEngine(smollm2_dir, num_blocks=64, max_num_seqs=8)
    questions = ["What is the capital of France?", "Write ñandú and 東京 in a sentence.",
                 "Count to five."]
    prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True))
        for q in questions]
    params = [SamplingParams(temperature=0.7, seed=3, max_tokens=10, n=2, logprobs=5,
                             prompt_logprobs=5),
              SamplingParams(temperature=0, max_tokens=10, logprobs=1),
              SamplingParams(temperature=1.0, seed=9, max_tokens=10, repetition_penalty=1.2)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [(o.request_id, o.index) for o in outs] == [("generate-0", 0), ("generate-0", 1),
                                                        ("generate-1", 0), ("generate-2", 0)]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for out, prompt, p in zip(outs, [prompts[0]] + prompts, [params[0]] + params):
        _check(hf, llm, prompt, out, p)
    assert llm.allocator.num_free == llm.allocator.num_blocks
