"""Greedy output must be token-identical to transformers generate() (fp32), however batched."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLMEngine, SamplingParams

NUM_PROMPTS = 32


def _workload(vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(1234)
    lengths = [1, 2, 15, 16, 17, 31, 32, 33, 300, 257] + [rng.randint(1, 300) for _ in range(22)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    max_tokens = [rng.choice([1, 2, 7, 16, 24, 40]) for _ in lengths]
    return prompts, max_tokens


@pytest.fixture(scope="module")
def reference(tiny_model):
    """transformers' greedy continuation of each prompt, computed one prompt at a time."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts, max_tokens = _workload(hf.config.vocab_size)
    expected = []
    with torch.no_grad():
        for prompt, n in zip(prompts, max_tokens):
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            expected.append(out[0, len(prompt):].tolist())
    return tiny_model, prompts, max_tokens, expected


def _run(reference, prompts_at_once: int, **engine_args) -> LLMEngine:
    path, prompts, max_tokens, expected = reference
    llm = LLMEngine(path, **engine_args)
    params = [SamplingParams(temperature=0, max_tokens=n) for n in max_tokens]
    got = []
    for i in range(0, len(prompts), prompts_at_once):
        outs = llm.generate(prompts[i:i + prompts_at_once], params[i:i + prompts_at_once],
                            use_tqdm=False)
        got += [o.token_ids for o in outs]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i} (len {len(prompts[i])}): engine {g} != transformers {e}"
    assert llm.allocator.num_free == llm.allocator.num_blocks
    return llm


def test_one_at_a_time(reference):
    _run(reference, 1, num_blocks=64)


def test_all_together(reference):
    llm = _run(reference, NUM_PROMPTS, num_blocks=1024, max_num_seqs=32,
               max_num_batched_tokens=4096)
    assert llm.stats().peak_running > 8


def test_preemption(reference):
    # 40 blocks of 16 hold 640 tokens: far less than 32 prompts of up to 340 tokens at once.
    llm = _run(reference, NUM_PROMPTS, num_blocks=40, max_num_seqs=32,
               max_num_batched_tokens=512)
    assert llm.stats().num_preemptions > 0


def test_chunked_prefill(reference):
    llm = _run(reference, NUM_PROMPTS, num_blocks=1024, max_num_seqs=16,
               max_num_batched_tokens=48)
    assert llm.stats().num_chunked_prefills > 0


def test_prefix_cache_hits_keep_outputs_identical(tiny_llama):
    """Prompts sharing a long prefix reuse cached blocks and still match transformers."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rng = random.Random(7)
    system = [rng.randrange(3, hf.config.vocab_size) for _ in range(70)]
    prompts = [system + [rng.randrange(3, hf.config.vocab_size) for _ in range(n)]
               for n in (0, 1, 5, 16, 30, 2)]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            expected.append(out[0, len(prompt):].tolist())
    params = SamplingParams(temperature=0, max_tokens=12)
    for num_blocks in (256, 12):          # 12 blocks: preemption and eviction as well
        llm = LLMEngine(tiny_llama, num_blocks=num_blocks, max_num_seqs=4,
                        max_num_batched_tokens=64)
        first = llm.generate(prompts[:1], params, use_tqdm=False)
        rest = llm.generate(prompts[1:], params, use_tqdm=False)
        assert [o.token_ids for o in first + rest] == expected
        stats = llm.stats()
        assert stats.prefix_cache_hit_tokens >= 64 * (len(prompts) - 1) // 2
        assert (stats.num_preemptions > 0) == (num_blocks == 12)
        assert llm.allocator.num_free == llm.allocator.num_blocks
