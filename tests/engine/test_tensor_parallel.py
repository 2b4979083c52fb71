"""Tensor parallelism offline (gloo, spawned ranks): greedy answers and prompt logprobs equal
TP=1's (a sequence may part only after a near tie of TP=1's top two logits), on every family,
a model with one KV head (replicated) and tied embeddings, quantized weights (GGUF lanes,
int8 at load) and the module path; a lost rank ends every sequence with an error and the
engine raises; close leaves no process behind."""
import random

import pytest
from gguf_files import write_gguf

from engine import LLMEngine, SamplingParams

NEAR_TIE = 1e-3     # logprob gap of TP=1's top two tokens where TP=2 may choose the other


def _workload() -> list[list[int]]:
    rng = random.Random(21)
    return [[rng.randrange(3, 1024) for _ in range(n)] for n in (1, 7, 16, 33, 90, 150)]


def _generate(llm: LLMEngine, prompts: list[list[int]], max_tokens: int = 16):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            prompt_logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.allocator.num_free == llm.allocator.num_blocks
    return outs


def _assert_parity(path, engine_args: dict, prompts: list[list[int]] | None = None) -> None:
    prompts = prompts or _workload()
    one = LLMEngine(path, num_blocks=128, **engine_args)
    two = LLMEngine(path, num_blocks=128, tensor_parallel_size=2, **engine_args)
    try:
        expected, got = _generate(one, prompts), _generate(two, prompts)
        for prompt, e, g in zip(prompts, expected, got):
            for pe, pg in zip(e.prompt_logprobs[1:], g.prompt_logprobs[1:]):
                assert pg.token.logprob == pytest.approx(pe.token.logprob, abs=1e-3)
            same = next((i for i, (a, b) in enumerate(zip(e.token_ids, g.token_ids)) if a != b),
                        None)
            if same is not None:        # parted: only where TP=1 itself nearly tied
                ctx = prompt + e.token_ids[:same]
                top = one.generate([ctx], SamplingParams(temperature=0, max_tokens=1,
                                                         logprobs=2), use_tqdm=False)[0]
                gap = top.logprobs[0].top[0].logprob - top.logprobs[0].top[1].logprob
                assert gap < NEAR_TIE, (f"prompt of {len(prompt)}: TP=2 parted at token {same} "
                                        f"where TP=1's top two differ by {gap}")
    finally:
        two.close()


def test_greedy_equals_tp1(tiny_model) -> None:
    _assert_parity(tiny_model, {})


def test_single_kv_head_replicated_and_tied_embeddings(tmp_path_factory) -> None:
    from make_default_model import make_model       # scripts/, on the path (conftest)
    path = make_model(tmp_path_factory.getbasetemp() / "models" / "tiny-mqa", size="tiny-mqa")
    llm = LLMEngine(path, num_blocks=16, tensor_parallel_size=2)
    try:
        assert llm.runner.k_cache.shape[3] == 1       # its KV head, held by both ranks
        assert llm.runner.model.spec.tie_word_embeddings
    finally:
        llm.close()
    _assert_parity(path, {})


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_gguf_lanes_shard(tiny_llama, tmp_path, kind: str) -> None:
    _assert_parity(write_gguf(tmp_path / f"tiny-{kind}.gguf", tiny_llama, kind), {})


@pytest.mark.parametrize("args", [{"quantization": "int8"}, {"attention_backend": "reference"}],
                         ids=["int8-at-load", "module-path"])
def test_int8_at_load_and_module_path(tiny_llama, args: dict) -> None:
    _assert_parity(tiny_llama, args, _workload()[:3])


def test_lost_rank_ends_every_sequence_and_the_engine(tiny_llama) -> None:
    llm = LLMEngine(tiny_llama, num_blocks=64, tensor_parallel_size=2)
    try:
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        for i, prompt in enumerate(_workload()[:3]):
            llm.add_request(f"r{i}", prompt, params)
        llm.step()
        llm.ranks.processes[0].kill()
        outputs = []
        for _ in range(50):     # the first step after the kill fails; never hangs
            outputs += llm.step()
            if llm.failed:
                break
        assert llm.failed and "tensor parallel" in llm.failed
        ended = {o.request_id: o for o in outputs if o.finished}
        assert set(ended) == {"r0", "r1", "r2"}
        assert all(o.finish_reason == "error" and "tensor parallel" in o.error
                   for o in ended.values())
        assert not llm.has_unfinished()
        with pytest.raises(RuntimeError, match="tensor parallel"):
            llm.add_request("late", [5, 6], params)
    finally:
        llm.close()


def test_generate_raises_when_a_rank_is_lost(tiny_llama) -> None:
    llm = LLMEngine(tiny_llama, num_blocks=64, tensor_parallel_size=2)
    try:
        llm.ranks.processes[0].kill()
        llm.ranks.processes[0].join(timeout=10)
        with pytest.raises(RuntimeError, match="tensor parallel step failed"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
    finally:
        llm.close()


def test_close_stops_every_rank(tiny_llama) -> None:
    llm = LLMEngine(tiny_llama, num_blocks=16, tensor_parallel_size=2)
    processes = list(llm.ranks.processes)
    assert all(p.is_alive() for p in processes)
    llm.close()
    assert not any(p.is_alive() for p in processes)
    llm.close()     # idempotent


def test_tp_size_that_does_not_divide_the_heads_names_both(tiny_llama) -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 .* 4 attention heads"):
        LLMEngine(tiny_llama, num_blocks=16, tensor_parallel_size=3)


def test_one_tensor_parallel_engine_per_process(tiny_llama) -> None:
    llm = LLMEngine(tiny_llama, num_blocks=16, tensor_parallel_size=2)
    try:
        with pytest.raises(RuntimeError, match="one tensor-parallel engine per process"):
            LLMEngine(tiny_llama, num_blocks=16, tensor_parallel_size=2)
    finally:
        llm.close()
