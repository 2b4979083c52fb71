"""n and best_of: one prefill, choices forked over shared copy-on-write blocks.

Isolation is proven by outputs: each greedy choice equals the single greedy answer, and
seeded sampled choice i equals a separate request with seed ``seed + i`` (a lost or missing
block copy makes choices read one another's K/V and diverge).
"""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLMEngine, SamplingParams

BLOCK = 16


def _prompt(length: int, seed: int = 5) -> list[int]:
    rng = random.Random(seed + length)
    return [rng.randrange(3, 1000) for _ in range(length)]


def _run(llm: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Step every request to its end; returns the deltas and the peak of blocks in use."""
    for rid, (prompt, params) in requests.items():
        llm.add_request(rid, prompt, params)
    deltas, peak = [], 0
    while llm.has_unfinished():
        deltas += llm.step()
        peak = max(peak, llm.allocator.num_used)
    return deltas, peak


def _choices(deltas, request_id: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in deltas:
        if d.request_id == request_id:
            out.setdefault(d.index, []).extend(d.token_ids)
    return out


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLMEngine:
    return LLMEngine(tiny_llama, num_blocks=64, max_num_seqs=8)


def _no_blocks_held(llm: LLMEngine) -> None:
    a = llm.allocator
    assert a.num_free == a.num_blocks and not any(a.ref_counts) and not a.tables
    assert not a.copies and a.tokens_stored == 0


@pytest.mark.parametrize("length", [BLOCK * 2, BLOCK * 2 + 5])     # partial last block or not
def test_greedy_choices_equal_the_single_answer(llm, length):
    prompt = _prompt(length)
    single = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20,
                                                   ignore_eos=True), use_tqdm=False)[0]
    outs = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                 n=4), use_tqdm=False)
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert all(o.token_ids == single.token_ids and o.text == single.text for o in outs)
    _no_blocks_held(llm)


@pytest.mark.parametrize("num_blocks", [256, 14])                   # 14: choices get preempted
def test_seeded_choices_equal_separate_requests_in_a_busy_batch(tiny_llama, num_blocks):
    llm = LLMEngine(tiny_llama, num_blocks=num_blocks, max_num_seqs=8,
                    max_num_batched_tokens=64)
    sampled = dict(temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True)
    others = {f"other{i}": (_prompt(n, seed=i), SamplingParams(temperature=0, max_tokens=30,
                                                               ignore_eos=True))
              for i, n in enumerate([9, 40, 70])}
    requests = {"partial": (_prompt(37), SamplingParams(seed=7, n=4, prompt_logprobs=1,
                                                        **sampled)),
                "full": (_prompt(32), SamplingParams(seed=70, n=3, **sampled)), **others}
    deltas, _ = _run(llm, requests)
    preempted = llm.stats().num_preemptions
    assert (preempted > 0) == (num_blocks == 14)
    for rid, (prompt, params) in requests.items():
        choices = _choices(deltas, rid)
        assert sorted(choices) == list(range(params.n))
        for i, tokens in choices.items():
            alone = params.model_copy(update={"n": 1, "seed": None if params.seed is None
                                              else params.seed + i})
            want = llm.generate([prompt], alone, use_tqdm=False)[0].token_ids
            assert tokens == want, f"{rid} choice {i} differs from a request seeded {alone.seed}"
    assert len({tuple(t) for t in _choices(deltas, "partial").values()}) == 4, "choices differ"
    scored = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
    assert len(scored) == 1 and len(scored[0]) == 37, "prompt logprobs come once per request"
    _no_blocks_held(llm)


def test_n4_holds_fewer_blocks_than_four_requests(tiny_llama):
    prompt, params = _prompt(BLOCK * 4 + 3), SamplingParams(seed=1, max_tokens=8,
                                                            ignore_eos=True)
    peaks = {}
    for name, requests in {
        "n=4": {"r": (prompt, params.model_copy(update={"n": 4}))},
        "4 requests": {f"r{i}": (prompt, params.model_copy(update={"seed": 1 + i}))
                       for i in range(4)},
    }.items():
        llm = LLMEngine(tiny_llama, num_blocks=128, max_num_seqs=8)
        _, peaks[name] = _run(llm, requests)
        _no_blocks_held(llm)
    # n=4: 4 shared prompt blocks + per choice (its copy of the partial block, 0 new) = 8;
    # four requests admitted together: 4 x 5 = 20 (prefix blocks are registered only after
    # their step, so none is shared).
    assert peaks["n=4"] < peaks["4 requests"]
    assert peaks == {"n=4": 8, "4 requests": 20}


def test_abort_frees_every_choice(llm):
    llm.add_request("r", _prompt(21), SamplingParams(n=3, max_tokens=100, ignore_eos=True))
    deltas = []
    for _ in range(4):
        deltas += llm.step()
    assert {d.index for d in deltas} == {0, 1, 2} and not any(d.finish_reason for d in deltas)
    assert len(llm.scheduler.running) == 3
    llm.abort("r")
    last = llm.step()
    assert sorted((d.index, d.finish_reason) for d in last) == [(0, "abort"), (1, "abort"),
                                                                 (2, "abort")]
    assert [d.finished for d in last] == [False, False, True]
    assert not llm.has_unfinished()
    _no_blocks_held(llm)


def test_abort_before_the_fork(tiny_llama):
    llm = LLMEngine(tiny_llama, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=16)
    llm.add_request("r", _prompt(60), SamplingParams(n=3, max_tokens=5))
    llm.step()                                  # first chunk of the prompt only
    llm.abort("r")
    out = llm.step()
    assert [(d.index, d.finish_reason, d.finished) for d in out] == [(0, "abort", True)]
    _no_blocks_held(llm)


def test_choices_finish_separately(llm):
    """Choices end on their own; the request ends with its last choice."""
    prompt = _prompt(20)
    sampled = SamplingParams(seed=3, max_tokens=30, ignore_eos=True, n=3)
    tokens = _choices(_run(llm, {"probe": (prompt, sampled)})[0], "probe")
    # stop choice 1 early on a token only it produces, early in its output
    stop = next(t for t in tokens[1][:25] if t not in tokens[0] + tokens[2])
    params = sampled.model_copy(update={"stop_token_ids": [stop]})
    deltas, _ = _run(llm, {"r": (prompt, params)})
    ends = [(d.index, d.finish_reason, d.choices_running) for d in deltas if d.finish_reason]
    assert ends[0] == (1, "stop", 2) and [e[2] for e in ends] == [2, 1, 0]
    assert [d.finished for d in deltas].count(True) == 1 and deltas[-1].finished
    assert _choices(deltas, "r")[1][-1] == stop
    _no_blocks_held(llm)


def test_best_of_keeps_the_n_most_likely(tiny_llama):
    llm = LLMEngine(tiny_llama, num_blocks=128, max_num_seqs=8)
    prompt = _prompt(29)
    params = SamplingParams(seed=40, temperature=1.2, max_tokens=10, ignore_eos=True, n=2,
                            best_of=5, logprobs=0)
    deltas, _ = _run(llm, {"r": (prompt, params)})
    assert [(d.index, d.finished) for d in deltas] == [(0, False), (1, True)], \
        "nothing is reported before every candidate has finished"
    separate = [llm.generate([prompt], params.model_copy(update={"n": 1, "best_of": None,
                                                                 "seed": 40 + i}),
                             use_tqdm=False)[0] for i in range(5)]
    ranked = sorted(separate, key=lambda o: -o.cumulative_logprob)[:2]
    assert [d.token_ids for d in deltas] == [o.token_ids for o in ranked]
    assert [d.text for d in deltas] == [o.text for o in ranked]
    assert [d.cumulative_logprob for d in deltas] == pytest.approx(
        [o.cumulative_logprob for o in ranked], abs=1e-4)
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    _no_blocks_held(llm)


def test_generate_returns_every_choice_and_prompt_logprobs(llm):
    outs = llm.generate([_prompt(10), _prompt(12)],
                        [SamplingParams(n=2, max_tokens=4, prompt_logprobs=0, seed=1),
                         SamplingParams(max_tokens=4)], use_tqdm=False)
    assert [(o.request_id, o.index) for o in outs] == [("generate-0", 0), ("generate-0", 1),
                                                        ("generate-1", 0)]
    assert outs[0].prompt_logprobs is outs[1].prompt_logprobs and len(outs[0].prompt_logprobs) == 10
    assert outs[2].prompt_logprobs is None


def test_more_choices_than_max_num_seqs_is_refused(tiny_llama):
    llm = LLMEngine(tiny_llama, num_blocks=64, max_num_seqs=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.add_request("r", "hi", SamplingParams(n=2, best_of=5))
    assert not llm.has_unfinished()


def test_a_waiting_request_counts_all_its_choices(tiny_llama):
    """max_num_seqs is never exceeded once a request forks into its choices."""
    llm = LLMEngine(tiny_llama, num_blocks=128, max_num_seqs=4)
    llm.add_request("a", _prompt(8), SamplingParams(max_tokens=6, ignore_eos=True))
    llm.add_request("b", _prompt(9), SamplingParams(n=4, max_tokens=6, ignore_eos=True))
    while llm.has_unfinished():
        llm.step()
        assert len(llm.scheduler.running) <= 4
    _no_blocks_held(llm)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 3), st.integers(1, 8),
                          st.integers(0, 6)), min_size=1, max_size=6))
def test_random_requests_with_choices_preemption_and_aborts(small_pool, ops):
    """Random greedy requests with 1-3 choices on a pool small enough to preempt, some aborted
    after a few steps: reference counts always match the tables, the batch never exceeds
    max_num_seqs, every finished greedy choice equals its request's single answer, and the
    pool ends empty."""
    llm, single = small_pool
    abort_at = {}
    for i, (length, n, max_tokens, abort_step) in enumerate(ops):
        llm.add_request(f"q{i}", _prompt(length), SamplingParams(
            temperature=0, n=n, max_tokens=max_tokens, ignore_eos=True))
        if abort_step:
            abort_at[f"q{i}"] = abort_step
    deltas, step = [], 0
    while llm.has_unfinished():
        step += 1
        for rid, at in abort_at.items():
            if at == step:
                llm.abort(rid)
        deltas += llm.step()
        a = llm.allocator
        held = [b for t in a.tables.values() for b in t]
        assert all(a.ref_counts[b] == held.count(b) for b in range(a.num_blocks))
        assert len(llm.scheduler.running) <= llm.config.max_num_seqs
    for i, (length, n, max_tokens, _) in enumerate(ops):
        choices = _choices(deltas, f"q{i}")
        ends = {d.index: d.finish_reason for d in deltas if d.request_id == f"q{i}"
                and d.finish_reason}
        assert len([d for d in deltas if d.request_id == f"q{i}" and d.finished]) == 1
        want = single(length, max_tokens)
        for index, reason in ends.items():
            got = choices.get(index, [])
            assert got == (want if reason == "length" else want[:len(got)])
    _no_blocks_held(llm)


@pytest.fixture(scope="module")
def small_pool(tiny_llama):
    """An engine with an 80-token pool (preemptions are common), and memoized single answers."""
    llm = LLMEngine(tiny_llama, num_blocks=10, block_size=8, max_num_seqs=4,
                    max_num_batched_tokens=32)
    answers: dict[tuple[int, int], list[int]] = {}

    def single(length: int, max_tokens: int) -> list[int]:
        if (length, max_tokens) not in answers:
            answers[length, max_tokens] = llm.generate(
                [_prompt(length)], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                  ignore_eos=True), use_tqdm=False)[0].token_ids
        return answers[length, max_tokens]
    return llm, single


def test_a_failed_step_fails_every_choice_and_frees_their_blocks(llm, monkeypatch):
    llm.add_request("r", _prompt(21), SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    llm.step()                                   # prefill and fork
    assert len(llm.scheduler.running) == 3

    def broken(*args):
        raise RuntimeError("kernel failed")
    monkeypatch.setattr(llm.runner.model, "forward", broken)
    out = llm.step()
    assert sorted((d.index, d.finish_reason) for d in out) == [(0, "error"), (1, "error"),
                                                                (2, "error")]
    assert all("kernel failed" in d.error for d in out) and [d.finished for d in out] == [
        False, False, True]
    monkeypatch.undo()
    assert not llm.has_unfinished()
    _no_blocks_held(llm)


def test_prompt_array_choices_equal_separate_requests(tiny_llama):
    """Three prompts x n=2 in one request on a pool that preempts: choice j of prompt p has
    index p * 2 + j and equals a separate one-prompt request seeded seed + j; each prompt's
    prompt logprobs come once, on a delta of one of its choices; usage counts every prompt."""
    llm = LLMEngine(tiny_llama, num_blocks=12, max_num_seqs=8, max_num_batched_tokens=48)
    prompts = [_prompt(n, seed=n) for n in (37, 9, 50)]
    params = SamplingParams(seed=11, n=2, temperature=1.0, max_tokens=20, ignore_eos=True,
                            prompt_logprobs=0)
    deltas, _ = _run(llm, {"r": (prompts, params)})
    choices = _choices(deltas, "r")
    assert sorted(choices) == list(range(6))
    for p, prompt in enumerate(prompts):
        for j in range(2):
            alone = params.model_copy(update={"n": 1, "seed": 11 + j})
            assert choices[p * 2 + j] == llm.generate([prompt], alone,
                                                      use_tqdm=False)[0].token_ids
    scored = {d.index // 2: d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None}
    assert len([d for d in deltas if d.prompt_logprobs is not None]) == 3
    assert {p: len(lps) for p, lps in scored.items()} == {0: 37, 1: 9, 2: 50}
    assert {d.prompt_tokens for d in deltas} == {96}
    assert [d.finished for d in deltas].count(True) == 1 and deltas[-1].finished
    assert llm.stats().num_preemptions > 0
    _no_blocks_held(llm)


def test_prompt_array_best_of_ranks_each_prompt(tiny_llama):
    llm = LLMEngine(tiny_llama, num_blocks=128, max_num_seqs=8)
    prompts = [_prompt(29), _prompt(13)]
    params = SamplingParams(seed=40, temperature=1.2, max_tokens=6, ignore_eos=True, n=1,
                            best_of=3)
    deltas, _ = _run(llm, {"r": (prompts, params)})
    assert sorted(d.index for d in deltas) == [0, 1] and deltas[-1].finished
    for d in deltas:
        separate = [llm.generate([prompts[d.index]], params.model_copy(update={
            "best_of": None, "seed": 40 + i, "logprobs": 0}), use_tqdm=False)[0]
            for i in range(3)]
        assert d.token_ids == max(separate, key=lambda o: o.cumulative_logprob).token_ids
    _no_blocks_held(llm)


def test_prompt_array_abort_and_errors(llm):
    llm.add_request("r", [_prompt(21), _prompt(30)], SamplingParams(n=2, max_tokens=100,
                                                                    ignore_eos=True))
    for _ in range(3):
        llm.step()
    assert len(llm.scheduler.running) == 4
    llm.abort("r")
    last = llm.step()
    assert sorted((d.index, d.finish_reason) for d in last) == [(i, "abort") for i in range(4)]
    assert [d.finished for d in last] == [False, False, False, True]
    _no_blocks_held(llm)
    with pytest.raises(ValueError, match="prompt 1: token ids must be ints"):
        llm.add_request("bad", [[5, 6], [5, 10**9]], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0: prompt is empty"):
        llm.add_request("bad", ["", "x"], SamplingParams())
    assert not llm.has_unfinished()
