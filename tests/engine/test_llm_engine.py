"""LLMEngine: stop conditions, abort, bad input, thread-safe intake, and the public API."""
import json
import shutil
import threading

import pytest
from pydantic import ValidationError

from engine import LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLMEngine(tiny_llama, num_blocks=128, max_model_len=256, max_num_seqs=8)


def _greedy(llm, prompt="a prompt", **overrides):
    params = SamplingParams(**{**GREEDY.model_dump(), **overrides})
    return llm.generate([prompt], params, use_tqdm=False)[0]


def test_generate_returns_full_results_in_order(llm):
    outs = llm.generate(["first", "second prompt", "third"], GREEDY, use_tqdm=False)
    assert [o.request_id for o in outs] == ["generate-0", "generate-1", "generate-2"]
    for o in outs:
        assert o.finish_reason == "length" and len(o.token_ids) == o.completion_tokens == 12
        assert o.text == llm.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        assert o.prompt_tokens > 0 and o.queue_time_s is not None


def test_stop_token_ids_and_eos(llm):
    base = _greedy(llm).token_ids
    out = _greedy(llm, stop_token_ids=[base[3]])
    assert out.finish_reason == "stop" and out.token_ids == base[:base.index(base[3]) + 1]
    out = _greedy(llm, stop_token_ids=[base[3]], min_tokens=len(base))
    assert out.finish_reason == "length" and base[3] not in out.token_ids
    llm.eos_token_ids.append(base[2])
    try:
        assert _greedy(llm).token_ids == base, "ignore_eos"
        out = _greedy(llm, ignore_eos=False)
        assert out.finish_reason == "stop" and out.token_ids[-1] == base[2]
    finally:
        llm.eos_token_ids.remove(base[2])


def test_stop_string_is_trimmed(llm):
    full = _greedy(llm, max_tokens=30)
    stop = full.text[10:14]
    out = _greedy(llm, max_tokens=30, stop=[stop])
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(stop)]


def test_max_model_len_ends_with_length(llm):
    out = _greedy(llm, prompt=[5] * 250, max_tokens=None)
    assert out.finish_reason == "length" and out.prompt_tokens + out.completion_tokens == 256


def test_abort_frees_blocks_and_reports(llm):
    llm.add_request("long", "abort me", SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        llm.step()
    assert llm.allocator.num_used > 0
    llm.abort("long")
    outs = llm.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("long", "abort")]
    assert llm.allocator.num_free == llm.allocator.num_blocks and not llm.has_unfinished()


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"), ([], "empty"), ([1, 10**9], "token ids"), ("word " * 400, "fits at most"),
])
def test_bad_prompts_raise_clear_errors(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.add_request("bad", prompt, GREEDY)
    assert not llm.has_unfinished()


def test_request_that_can_never_fit_is_an_error_in_generate(llm):
    outs = llm.generate(["fine", "x"], [GREEDY, SamplingParams(max_tokens=10_000)],
                        use_tqdm=False)
    assert outs[0].finish_reason == "length"
    assert outs[1].finish_reason == "error" and "max_tokens" in outs[1].error


def test_duplicate_request_id_is_refused(llm):
    llm.add_request("dup", "x", GREEDY)
    with pytest.raises(ValueError, match="already running"):
        llm.add_request("dup", "y", GREEDY)
    llm.abort("dup")
    llm.step()


@pytest.mark.parametrize("bad", [dict(temperature=-0.5), dict(top_p=float("nan")),
                                 dict(max_tokens=-3), dict(top_k=-2), dict(stop=[""]),
                                 dict(unknown=1), dict(presence_penalty=float("inf"))])
def test_invalid_sampling_params_name_the_field(bad):
    with pytest.raises(ValidationError, match=list(bad)[0]):
        SamplingParams(**bad)


def test_invalid_engine_config_raises(tiny_llama):
    with pytest.raises(ValueError, match="block_size"):
        LLMEngine(tiny_llama, block_size=12)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLMEngine(tiny_llama, max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(TypeError):
        LLMEngine(tiny_llama, no_such_option=1)


def test_few_rows_threads_run_small_steps_only(tiny_llama, llm, monkeypatch):
    """Steps of fewer than FEW_ROWS tokens run on few_rows_threads, larger ones (a prefill) on
    num_threads; the tokens do not change."""
    import torch
    from engine.model_runner import FEW_ROWS
    expected = _greedy(llm, "a prompt of several tokens").token_ids
    before = torch.get_num_threads()
    few = LLMEngine(tiny_llama, num_blocks=64, max_model_len=256, num_threads=2,
                    few_rows_threads=1)
    model, seen = few.runner.model, []
    real = model.forward

    def forward(input_ids, *args, **kwargs):
        seen.append((input_ids.numel(), torch.get_num_threads()))
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    try:
        assert _greedy(few, "a prompt of several tokens").token_ids == expected
    finally:
        torch.set_num_threads(before)
    assert seen[0][0] >= FEW_ROWS and seen[0][1] == 2         # the prefill
    assert len(seen) > 1 and all(threads == 1 for _, threads in seen[1:])
    with pytest.raises(ValueError, match="few_rows_threads must be positive"):
        LLMEngine(tiny_llama, few_rows_threads=0)


def test_requests_added_from_other_threads(llm):
    expected = _greedy(llm, "threaded").token_ids
    done = {}

    def add(i):
        llm.add_request(f"t{i}", "threaded", GREEDY)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or llm.has_unfinished():
        for out in llm.step():
            done.setdefault(out.request_id, []).extend(out.token_ids)
    assert done == {f"t{i}": expected for i in range(6)}


def test_unsupported_architecture_names_the_supported(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLMEngine(bad)
