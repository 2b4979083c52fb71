"""Fault isolation: a fault of one sequence fails that request alone, a fault of a step fails
that step's requests; blocks go back to the pool and the engine keeps serving, token for token."""
import pytest
import torch

import engine.llm_engine as llm_engine
from engine import LLMEngine, SamplingParams
from engine.detokenizer import Detokenizer
from engine.faults import NONFINITE_MESSAGE, finite_rows

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = ["the first prompt", "a second, longer prompt here", "third one"]
POISON = 7          # a token id whose embedding the tests set to NaN


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLMEngine(tiny_llama, num_blocks=64, max_model_len=256, max_num_seqs=2)


@pytest.fixture(scope="module")
def clean(llm):
    return llm.generate(PROMPTS, GREEDY, use_tqdm=False)


def run(llm, prompts, params=GREEDY):
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert not llm.has_unfinished() and llm.allocator.num_used == 0
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_rows_finds_nan_and_both_infinities_anywhere(dtype):
    logits = torch.randn(7, 1000).to(dtype)
    logits[1, 0] = float("nan")
    logits[2, 999] = float("inf")
    logits[3, 500] = float("-inf")
    logits[4, 3:6] = float("nan")
    logits[5, 10], logits[5, 20] = float("inf"), float("-inf")
    logits[6] = torch.finfo(dtype).max     # large but finite
    assert finite_rows(logits) == [True, False, False, False, False, False, True]


def test_nonfinite_logits_fail_their_request_alone(llm, clean):
    ids = llm.tokenizer.encode(PROMPTS[1]) + [POISON]
    decoder = llm.runner.model.model
    table = decoder.embed_table     # the compiled path's packed table (fp32 panels), or None
    row = (decoder.embed_tokens.weight[POISON] if table is None
           else table.values[POISON // 16, :, POISON % 16])
    saved = row.clone()
    with torch.no_grad():
        row.fill_(float("nan"))
    try:
        outs = run(llm, [PROMPTS[0], ids, PROMPTS[2]],
                   [GREEDY, GREEDY, SamplingParams(temperature=0.8, seed=3, max_tokens=10)])
    finally:
        with torch.no_grad():
            row.copy_(saved)
    assert outs[1].finish_reason == "error" and outs[1].error == NONFINITE_MESSAGE
    assert outs[1].token_ids == []
    assert outs[0].token_ids == clean[0].token_ids and outs[0].error is None
    assert outs[2].finish_reason == "length" and outs[2].error is None
    assert [o.token_ids for o in run(llm, PROMPTS)] == [c.token_ids for c in clean]


class FailingDetokenizer(Detokenizer):
    """Raises on the third output token of prompts that hold the word "fail"."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        super().__init__(tokenizer, prompt_ids, stop)
        self.faulty, self.count = "fail" in tokenizer.decode(prompt_ids), 0

    def add(self, token_id: int) -> tuple[str, bool]:
        self.count += 1
        if self.faulty and self.count == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return super().add(token_id)


def test_detokenizer_error_fails_its_request_alone(llm, clean, monkeypatch):
    monkeypatch.setattr(llm_engine, "Detokenizer", FailingDetokenizer)
    outs = run(llm, [PROMPTS[0], "fail " + PROMPTS[1], PROMPTS[2]])
    assert outs[1].finish_reason == "error" and "detokenizer failed" in outs[1].error
    assert "UnicodeDecodeError" in outs[1].error and len(outs[1].token_ids) == 3
    assert outs[0].token_ids == clean[0].token_ids and outs[2].token_ids == clean[2].token_ids


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory (injected)"),
                                 RuntimeError("triton kernel launch failed (injected)")])
def test_step_fault_fails_that_steps_requests_and_engine_goes_on(llm, clean, monkeypatch, exc):
    model = llm.runner.model    # the logits: after every layer wrote K/V
    real, calls = model.logits, []

    def forward(*args, **kwargs):       # fails in the 3rd step
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "logits", forward)
    for i, prompt in enumerate(PROMPTS):    # max_num_seqs 2: the third waits outside the batch
        llm.add_request(f"r{i}", prompt, GREEDY)
    results = {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                results[out.request_id] = out
    assert llm.allocator.num_used == 0
    for rid in ("r0", "r1"):
        assert results[rid].finish_reason == "error"
        want = "out of device memory" if isinstance(exc, torch.OutOfMemoryError) else "RuntimeError"
        assert want in results[rid].error
    assert results["r2"].finish_reason == "length" and results["r2"].error is None
    assert results["r2"].completion_tokens == 10
    monkeypatch.undo()
    assert [o.token_ids for o in run(llm, PROMPTS)] == [c.token_ids for c in clean]
