"""KV cache dtypes (``kv_cache_dtype``) and 16-bit checkpoints on the compiled CPU path.

A 16-bit cache doubles the blocks a budget holds and keeps greedy output identical to the fp32
cache until a near tie, with prompt logprobs within a bound; prefix caching and copy on write
work with it. A bf16 model runs the compiled decoder (bf16 weights, fp32 activations) and
scores as the fp32 module path and transformers do on the same bf16-rounded weights. Settings
the engine does not serve are refused with a message.
"""
import random
import shutil
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

import kernels
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.model_runner import ModelRunner

NEAR_TIE = 0.05      # top-1 minus top-2 logprob below which a 16-bit cache may flip the choice


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(7, 1024) for _ in range(n)] for n in (3, 17, 40, 90)]


@pytest.fixture(scope="module")
def bf16_rounded(tiny_llama, tmp_path_factory) -> str:
    """The tiny model with every weight rounded to bf16, saved in fp32."""
    out = tmp_path_factory.mktemp("bf16-rounded") / "model"
    shutil.copytree(tiny_llama, out)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    for f in out.glob("*.safetensors"):
        f.unlink()
    hf.save_pretrained(out)
    return str(out)


def _score(llm: LLMEngine, prompt: list[int]) -> list[float]:
    """The engine's logprob of each prompt token after the first."""
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    assert llm.allocator.num_free == llm.allocator.num_blocks
    return [p.token.logprob for p in out.prompt_logprobs[1:]]


def _hf_score(path: str, prompt: list[int]) -> list[float]:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    return logprobs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()


def _greedy(llm: LLMEngine, prompts: list[list[int]], n: int = 1):
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=2, ignore_eos=True, n=n)
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("cache", ["bfloat16", "float16"])
def test_a_16_bit_cache_holds_twice_the_blocks(tiny_llama, cache: str) -> None:
    budget = 3 * 2**20
    fp32 = LLMEngine(tiny_llama, kv_cache_bytes=budget)
    half = LLMEngine(tiny_llama, kv_cache_bytes=budget, kv_cache_dtype=cache)
    assert half.runner.k_cache.dtype == getattr(torch, cache)
    assert half.runner.block_bytes * 2 == fp32.runner.block_bytes
    assert half.runner.num_blocks == budget // half.runner.block_bytes
    assert half.runner.num_blocks in (2 * fp32.runner.num_blocks, 2 * fp32.runner.num_blocks + 1)


@pytest.mark.parametrize("cache", ["bfloat16", "float16"])
def test_16_bit_cache_greedy_matches_fp32_until_a_near_tie(tiny_model, prompts, cache) -> None:
    fp32 = LLMEngine(tiny_model, num_blocks=64)
    half = LLMEngine(tiny_model, num_blocks=64, kv_cache_dtype=cache)
    assert half.runner.model.model.compiled is not None     # the compiled decoder takes it
    for a, b in zip(_greedy(fp32, prompts), _greedy(half, prompts)):
        same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                    len(a.token_ids))
        if same < len(a.token_ids):     # they may part only where fp32 nearly tied
            top = a.logprobs[same].top
            assert top[0].logprob - top[1].logprob < NEAR_TIE, (same, top)
    # Prompt logprobs: K/V rounded to 8 (bf16) or 11 (fp16) significant bits move them in
    # proportion to the unit roundoff (2^-9 vs 2^-12: measured fp16 differences are ~1/8 of
    # bf16's). Measured maxima over the tiny models (large weights, sharp logits): bf16
    # 4.6e-2, fp16 5.2e-3; the bounds are twice those.
    bound = 0.1 if cache == "bfloat16" else 1.2e-2
    for prompt in prompts[1:]:
        diff = max(abs(x - y) for x, y in zip(_score(fp32, prompt), _score(half, prompt)))
        assert diff < bound, diff


def test_prefix_cache_and_copy_on_write_with_a_bf16_cache(tiny_llama, prompts) -> None:
    cold = LLMEngine(tiny_llama, num_blocks=64, kv_cache_dtype="bfloat16",
                     enable_prefix_caching=False)
    want = [o.token_ids for o in _greedy(cold, prompts)]
    warm = LLMEngine(tiny_llama, num_blocks=64, kv_cache_dtype="bfloat16")
    _greedy(warm, prompts)                              # fills the prefix cache
    again = _greedy(warm, prompts, n=2)                 # hits, then forks: copy on write
    assert warm.allocator.num_free == warm.allocator.num_blocks
    assert [o.token_ids for o in again] == [w for w in want for _ in range(2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_block_copies_in_every_cache_dtype(dtype: torch.dtype) -> None:
    caches = [torch.randn(2, 5, 4, 3, 8).to(dtype) for _ in range(2)]
    before = [c.clone() for c in caches]
    runner = types.SimpleNamespace(k_cache=caches[0], v_cache=caches[1],
                                   device=torch.device("cpu"))
    ModelRunner.copy_blocks(runner, [(1, 3), (4, 0)])
    for c, b in zip(caches, before):
        raw, old = c.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(raw[:, 3], old[:, 1]) and torch.equal(raw[:, 0], old[:, 4])
        assert torch.equal(raw[:, [1, 2, 4]], old[:, [1, 2, 4]])


def test_bf16_model_runs_the_compiled_path_in_fp32(tiny_llama, bf16_rounded, prompts) -> None:
    """bf16 weights, fp32 activations: as the fp32 module path on the same rounded weights
    (bf16 caches on both sides), and as transformers in fp32 with an fp32 cache."""
    try:        # attention_backend is process-wide: the other engines are built after
        module = LLMEngine(bf16_rounded, num_blocks=64, kv_cache_dtype="bfloat16",
                           attention_backend="reference")
        assert module.runner.model.model.compiled is None
        module_scores = [_score(module, prompt) for prompt in prompts[1:]]
    finally:
        kernels.set_backend("auto")
    bf16 = LLMEngine(tiny_llama, num_blocks=64, dtype="bfloat16")
    model = bf16.runner.model
    assert model.model.compiled is not None and bf16.runner.k_cache.dtype == torch.bfloat16
    assert model.lm_head.packed.values.dtype == torch.bfloat16
    bf16_fp32_cache = LLMEngine(tiny_llama, num_blocks=64, dtype="bfloat16",
                                kv_cache_dtype="float32")
    for prompt, want in zip(prompts[1:], module_scores):
        # same weights, same cache rounding, fp32 arithmetic in another order
        assert max(abs(x - y) for x, y in zip(_score(bf16, prompt), want)) < 1e-4
        exact = _score(bf16_fp32_cache, prompt)
        assert max(abs(x - y) for x, y in zip(exact, _hf_score(bf16_rounded, prompt))) < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(bf16_rounded, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, _greedy(bf16_fp32_cache, prompts)):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out.token_ids == want[0, len(prompt):].tolist()


@pytest.mark.parametrize("settings,message", [
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype must be one of"),
    (dict(kv_cache_dtype="fp8"), "served on CUDA only; on CPU use auto, float32, bfloat16"),
    (dict(kv_cache_dtype="fp8_e4m3"), "served on CUDA only"),
    (dict(device="cuda", kv_cache_dtype="bfloat16"), "on CUDA kv_cache_dtype must be auto"),
    (dict(device="cuda", kv_cache_dtype="fp8"), "fp8 with a float16/bfloat16 model"),
])
def test_unserved_cache_dtypes_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)


def test_cuda_cache_dtypes_accepted() -> None:
    for dtype in ("float16", "bfloat16"):
        assert EngineConfig(device="cuda", dtype=dtype, kv_cache_dtype="fp8").cache_dtype == "fp8"
        assert EngineConfig(device="cuda", dtype=dtype,
                            kv_cache_dtype="fp8_e4m3").cache_dtype == "fp8"
        assert EngineConfig(device="cuda", dtype=dtype).cache_dtype == dtype


def test_fp16_model_runs_the_compiled_path(tiny_llama, prompts) -> None:
    """fp16 weights packed as fp16 (fp16 cache by default); against fp32 weights and cache
    only the 11-bit roundings of weights and K/V separate them (measured max 0.013)."""
    fp16 = LLMEngine(tiny_llama, num_blocks=64, dtype="float16")
    assert fp16.runner.model.model.compiled is not None
    assert fp16.runner.k_cache.dtype == torch.float16
    assert fp16.runner.model.lm_head.packed.values.dtype == torch.float16
    fp32 = LLMEngine(tiny_llama, num_blocks=64)
    for prompt in prompts[1:]:
        assert max(abs(x - y) for x, y in zip(_score(fp16, prompt), _score(fp32, prompt))) < 0.03
