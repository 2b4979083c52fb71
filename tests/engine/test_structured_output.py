"""Structured output on a tiny model: every kind of constraint, its errors, and how it lives in
the engine (compiled off the step thread, cached, masked per row, through preemption, prefix
caching, streaming deltas and aborts)."""
import json
import re
import threading

import jsonschema
import pytest
import torch
import xgrammar as xgr
from pydantic import ValidationError

from engine import LLMEngine, SamplingParams
from engine.structured_output import GrammarCompiler, mask
from engine.structured_output_params import StructuredOutputsParams as SO

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "pet": {"enum": ["cat", "dog"]},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
                         "home": {"type": "object", "required": ["zip"], "properties": {
                             "zip": {"type": "string", "pattern": "^[0-9]{3}$"}}}},
          "required": ["name", "age", "pet", "tags", "home"]}
REGEX = r"[0-9]{2}-[a-z]{3}"


def params(so: SO | None = None, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 96, **kw}, structured_outputs=so)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLMEngine(tiny_llama, num_blocks=256, max_model_len=512, max_num_seqs=16)


def run(llm, prompts, plist):
    return llm.generate(prompts, plist, use_tqdm=False)


def test_every_kind_is_followed_greedy_and_sampled(llm):
    choices = ['say "hi"', "back\\slash", "new\nline", "été"]
    plist = [params(SO(json=SCHEMA)), params(SO(json=SCHEMA), temperature=1.0, seed=5),
             params(SO(json=json.dumps(SCHEMA)), temperature=0.9, top_p=0.9, seed=1),
             params(SO(regex=REGEX)),
             params(SO(regex=REGEX), temperature=1.0, seed=2),
             params(SO(choice=choices)), params(SO(choice=choices), temperature=1.0, seed=9),
             params(SO(grammar='root ::= "(" [a-c]+ ")"'), max_tokens=40)]
    outs = run(llm, ["a json", "sampled", "nucleus", "re", "re2", "pick", "p2", "g"],
               plist)
    for out in outs:
        assert out.finish_reason == "stop", out
        assert out.token_ids[-1] in llm.eos_token_ids
    for out in outs[:3]:
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert all(re.fullmatch(REGEX, o.text) for o in outs[3:5])
    assert outs[5].text in choices and outs[6].text in choices
    assert re.fullmatch(r"\([a-c]+\)", outs[7].text)


def test_unconstrained_rows_are_untouched_by_constrained_neighbours(llm):
    plain = [params(max_tokens=24, ignore_eos=True), params(max_tokens=24, temperature=0.8, seed=4)]
    alone = run(llm, ["plain one", "plain two"], plain)
    mixed = run(llm, ["x", "plain one", "y", "plain two"],
                [params(SO(json=SCHEMA)), plain[0], params(SO(regex=REGEX)), plain[1]])
    assert [o.token_ids for o in alone] == [mixed[1].token_ids, mixed[3].token_ids]


def test_mask_touches_only_constrained_rows(tiny_llama, llm):
    state = llm.grammars.start(SO(choice=["ab"]))
    state.future.result()
    state.start()
    logits = torch.randn(3, llm.runner.model.spec.vocab_size)
    before = logits.clone()
    mask(logits, [None, state, None])
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(llm.tokenizer.decode([t]) in ("a", "ab") for t in allowed)


def test_max_tokens_ends_with_length(llm):
    out = run(llm, ["short"], [params(SO(json=SCHEMA), max_tokens=5)])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.text.startswith('{"na')


def test_grammar_end_stops_even_with_ignore_eos(llm):
    out = run(llm, ["choose"], [params(SO(choice=["yes", "no"]), ignore_eos=True)])[0]
    assert out.finish_reason == "stop" and out.text in ("yes", "no")


def test_preemption_keeps_the_matcher_state(tiny_llama, llm):
    prompts = [f"prompt number {i} " * 3 for i in range(4)]
    plist = [params(SO(json=SCHEMA)) if i % 2 else params(max_tokens=40, ignore_eos=True)
             for i in range(4)]
    tight = LLMEngine(tiny_llama, num_blocks=10, max_num_seqs=4, enable_prefix_caching=False)
    want, got = run(llm, prompts, plist), run(tight, prompts, plist)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for out in got[1::2]:
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_prefix_cache_hits_give_the_same_constrained_output(llm):
    prompt = "a shared prefix that fills more than two blocks of sixteen tokens " * 2
    first = run(llm, [prompt], [params(SO(json=SCHEMA))])[0]
    hits = llm.stats().prefix_cache_hit_tokens
    second = run(llm, [prompt], [params(SO(json=SCHEMA))])[0]
    assert llm.stats().prefix_cache_hit_tokens > hits
    assert second.token_ids == first.token_ids


def test_streamed_deltas_add_up_to_the_result(llm):
    want = run(llm, ["stream"], [params(SO(json=SCHEMA))])[0]
    llm.add_request("s", "stream", params(SO(json=SCHEMA)))
    text, ids, reasons = "", [], []
    while llm.has_unfinished():
        for out in llm.step():
            text, ids = text + out.text, ids + out.token_ids
            reasons.append(out.finish_reason)
    assert (text, ids) == (want.text, want.token_ids)
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}


def test_compile_is_cached_and_never_on_the_step_thread(tiny_llama, monkeypatch):
    llm = LLMEngine(tiny_llama, num_blocks=128, max_num_seqs=8)
    gate, threads = threading.Event(), []
    compile_ = GrammarCompiler._compile

    def slow(self, key):
        threads.append(threading.current_thread())
        gate.wait(30)
        return compile_(self, key)
    monkeypatch.setattr(GrammarCompiler, "_compile", slow)
    llm.add_request("c1", "constrained", params(SO(json=SCHEMA)))
    llm.add_request("c2", "constrained too", params(SO(json=dict(SCHEMA))))
    llm.add_request("free", "unconstrained", params(max_tokens=6, ignore_eos=True))
    seen = {}
    for _ in range(6):      # the free request runs to its end while the grammar compiles
        for out in llm.step():
            seen.setdefault(out.request_id, []).append(out)
    assert set(seen) == {"free"} and seen["free"][-1].finish_reason == "length"
    assert llm.scheduler.running == [] and len(llm._compiling) == 2
    gate.set()
    while llm.has_unfinished():
        for out in llm.step():
            seen.setdefault(out.request_id, []).append(out)
    assert [seen[r][-1].finish_reason for r in ("c1", "c2")] == ["stop", "stop"]
    assert len(threads) == 1 and threads[0] is not threading.current_thread()
    assert len(llm.grammars.compile_s) == 1
    assert llm.allocator.num_free == llm.allocator.num_blocks


def test_abort_while_compiling_and_failed_compile(tiny_llama, monkeypatch):
    llm = LLMEngine(tiny_llama, num_blocks=128, max_num_seqs=8)
    gate = threading.Event()

    def broken(self, key):
        gate.wait(30)
        raise RuntimeError("compiler exploded")
    monkeypatch.setattr(GrammarCompiler, "_compile", broken)
    llm.add_request("a", "x", params(SO(regex="a+")))
    assert [(o.request_id, o.finish_reason) for o in llm.step()] == []
    llm.abort("a")
    assert [(o.request_id, o.finish_reason) for o in llm.step()] == [("a", "abort")]
    llm.add_request("b", "x", params(SO(regex="b+")))
    gate.set()
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("b", "error")]
    assert "compiler exploded" in outs[0].error and not llm._compiling


def test_grammar_with_no_allowed_token_fails_that_request_only(llm):
    outs = run(llm, ["x", "y"], [params(SO(choice=["a"]), min_tokens=4),
                                params(max_tokens=8, ignore_eos=True)])
    assert outs[0].finish_reason == "error" and "min_tokens" in outs[0].error
    assert outs[1].finish_reason == "length"
    assert llm.allocator.num_used == 0


@pytest.mark.parametrize("bad, field", [
    (dict(json={"type": "nope"}), "json"), (dict(json="{not json"), "json"),
    (dict(json={"type": "object", "required": "a"}), "json"), (dict(json=[1]), "json"),
    (dict(regex="[a-"), "regex"), (dict(grammar="root ::= missing"), "grammar"),
    (dict(choice=[]), "choice"), (dict(choice=["ok", ""]), "choice"),
    (dict(), "structured_outputs"), (dict(regex="a", choice=["b"]), "structured_outputs"),
    (dict(regexp="a"), "regexp"),
])
def test_invalid_constraints_name_the_field(bad, field):
    with pytest.raises(ValidationError) as err:
        SamplingParams(structured_outputs=bad)
    loc = err.value.errors()[0]["loc"]
    assert loc[0] == "structured_outputs" and field in loc


def test_choice_grammar_matches_exactly_its_choices():
    choices = ['q"uote', "b\\s", "tab\t", "ü", "a", "ab"]
    info = xgr.TokenizerInfo([chr(c) for c in range(32, 127)] + ["\t", "ü"])
    compiled = xgr.GrammarCompiler(info).compile_grammar(
        xgr.Grammar.from_ebnf(SO(choice=choices).key()[1]))
    for text in choices + ["b", "abc", "q\\\"uote", ""]:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        assert (matcher.accept_string(text) and matcher.is_completed()) == (text in choices), text


def test_equal_constraints_share_one_key():
    assert SO(json=SCHEMA).key() == SO(json=json.dumps(SCHEMA)).key()
    assert SO(json_object=True).key() == SO(json={"type": "object"}).key()
    assert SO(regex="a").key() != SO(grammar='root ::= "a"').key()


def test_every_parallel_choice_follows_its_own_matcher(llm):
    outs = run(llm, ["several"], [params(SO(regex=REGEX), n=3, temperature=1.0, seed=11)])
    assert [o.index for o in outs] == [0, 1, 2] and len({o.text for o in outs}) > 1
    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch(REGEX, out.text), out
