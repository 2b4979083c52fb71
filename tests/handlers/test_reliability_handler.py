"""The continuous-batching handler's reliability rules, driven the way TorchServe 0.12's
frontend drives it (no Java): limits, deadlines, faults of one request, faults of a step, and
the SIGTERM drain. ``Frontend`` replays ContinuousBatching.java: every in-flight request is in
each call (an empty dict once it got a response), a request is done when its criterion is
None (a complete response) or True (the last chunk), and a request left out of a response
stays in flight with its status line unsent."""
import json
import signal
import time
from dataclasses import dataclass, field

import pytest

import engine.llm_engine as llm_engine
from engine import LLMEngine
from engine.detokenizer import Detokenizer
from handlers.continuous_batching import (DRAIN_MESSAGE, ORPHAN_MESSAGE,
                                          ContinuousBatchingHandler)
from handlers.engine_loop import EngineLoop
from handlers.settings import HandlerSettings

LONG = {"prompt": "a long story", "max_tokens": 900, "temperature": 0, "ignore_eos": True}


@dataclass
class Reply:
    body: dict
    status: int | None = None          # set by the first response that went on the wire
    chunks: list[str] = field(default_factory=list)
    done: bool = False
    calls_held: int = 0                # calls in which the request got no response at all

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]


class Context:
    """The parts of ts.context.Context the handler uses, for one call."""

    def __init__(self, ids: list[str], paths: list[str]) -> None:
        self.request_ids = dict(enumerate(ids))
        self.paths = paths
        self.status: dict[int, int] = {}
        self.stopping_criteria = None

    def get_request_id(self, idx: int) -> str:
        return self.request_ids[idx]

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.paths[idx] if key == "url_path" else None

    def set_response_status(self, code: int, phrase: str, idx: int) -> None:
        self.status[idx] = code

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass


class Frontend:
    def __init__(self, handler: ContinuousBatchingHandler) -> None:
        self.handler = handler
        self.replies: dict[str, Reply] = {}
        self.cached: set[str] = set()      # got a response: sent as {} from now on
        self.paths: dict[str, str] = {}

    def send(self, rid: str, body: dict, path: str = "") -> Reply:
        self.replies[rid], self.paths[rid] = Reply(body), path
        return self.replies[rid]

    def requeue(self, rid: str, path: str = "") -> Reply:
        """A job that was streaming on a previous worker: TorchServe re-sends it bodiless."""
        self.replies[rid], self.paths[rid] = Reply({}, status=200), path
        self.cached.add(rid)
        return self.replies[rid]

    def call(self) -> None:
        ids = [rid for rid, r in self.replies.items() if not r.done]
        data = [{} if rid in self.cached or self.replies[rid].body == {} else
                {"body": self.replies[rid].body} for rid in ids]
        ctx = Context(ids, [self.paths[rid] for rid in ids])
        out = self.handler.handle(data, ctx)
        assert len(out) == len(ids)
        for idx, rid in enumerate(ids):
            reply = self.replies[rid]
            if idx not in ctx.request_ids:
                reply.calls_held += 1
                continue
            verdict = ctx.stopping_criteria[idx](out[idx])
            if reply.status is None:
                assert verdict is not True, "True on a first response hangs the client"
                reply.status = ctx.status.get(idx, 200)
            reply.chunks.append(out[idx])
            self.cached.add(rid)
            reply.done = verdict is not False

    def run(self, until=lambda: False, max_calls: int = 5000) -> None:
        for _ in range(max_calls):
            if until() or all(r.done for r in self.replies.values()):
                return
            self.call()
        raise AssertionError("requests still in flight")


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine(tiny_llama, num_blocks=128, max_model_len=2048, max_num_seqs=8)


@pytest.fixture
def handler(engine, tiny_llama):
    h = ContinuousBatchingHandler()
    h.settings = HandlerSettings(model_path=str(tiny_llama), request_timeout_s=60,
                                 max_stop_strings=4, max_stop_chars=8, step_wait_s=0.01)
    h.model_name = "llm"
    h.loop = EngineLoop(engine, h.settings.lease_s, None)
    h.loop.start()
    yield h
    h.loop.stop()
    assert engine.allocator.num_used == 0, "blocks leaked"


@pytest.fixture
def slow(handler, monkeypatch):
    """Steps of at least 5 ms, so a 900-token request outlives a 0.3 s deadline."""
    runner = handler.loop.engine.runner
    real = runner.run

    def run(*args):
        time.sleep(0.005)
        return real(*args)

    monkeypatch.setattr(runner, "run", run)


def blocks_freed(handler) -> bool:
    deadline = time.monotonic() + 10
    while handler.loop.engine.allocator.num_used and time.monotonic() < deadline:
        time.sleep(0.01)
    return handler.loop.engine.allocator.num_used == 0


@pytest.mark.parametrize("extra, field", [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ["x" * 9]}, "stop"),
    ({"request_timeout_s": 61}, "request_timeout_s"),
    ({"request_timeout_s": "soon"}, "request_timeout_s"),
    ({"request_timeout_s": 0}, "request_timeout_s"),
    ({"request_timeout_s": True}, "request_timeout_s")])
def test_limits_are_400_naming_the_field(handler, extra, field):
    fe = Frontend(handler)
    bad = fe.send("bad", {"prompt": "hi", "max_tokens": 3} | extra)
    ok = fe.send("ok", {"prompt": "hi", "max_tokens": 3, "stop": ["zz"] * 4, "stream": True,
                        "request_timeout_s": 60})
    fe.run()
    assert bad.status == 400 and json.loads(bad.text)["error"]["param"] == field
    assert ok.status == 200 and ok.lines()[-1]["finish_reason"] == "length"


def test_non_utf8_body_is_400(handler):
    fe = Frontend(handler)
    bad = fe.send("bad", b'{"prompt": "caf\xe9"}')      # latin-1, as TorchServe forwards it
    fe.run()
    assert bad.status == 400 and "UTF-8" in json.loads(bad.text)["error"]["message"]


def test_deadline_ends_stream_with_error_and_frees_blocks(handler, slow):
    fe = Frontend(handler)
    late = fe.send("late", LONG | {"stream": True, "request_timeout_s": 0.3})
    other = fe.send("other", LONG | {"stream": True, "max_tokens": 20})
    fe.run()
    last = late.lines()[-1]
    assert late.status == 200 and last["finish_reason"] == "error"
    assert "request_timeout_s" in last["error"] and "deadline of 0.3 s" in last["error"]
    assert 0 < last["usage"]["completion_tokens"] < 900
    assert other.lines()[-1]["finish_reason"] == "length"
    assert blocks_freed(handler)


def test_non_streaming_deadline_is_504_sent_at_the_end(handler, slow):
    fe = Frontend(handler)
    late = fe.send("late", LONG | {"request_timeout_s": 0.3})
    fe.run()
    assert late.calls_held > 0, "nothing was held back: the status went out early"
    assert late.status == 504 and len(late.chunks) == 1
    err = json.loads(late.text)["error"]
    assert "request_timeout_s" in err["message"] and err["code"] == 504
    assert blocks_freed(handler)


def test_tokenizer_error_fails_that_request_alone(handler, monkeypatch):
    tok = handler.loop.engine.tokenizer
    real = tok.encode

    def encode(text, *args, **kwargs):
        if "boom" in text:
            raise RuntimeError("tokenizer exploded (injected)")
        return real(text, *args, **kwargs)

    monkeypatch.setattr(tok, "encode", encode)
    fe = Frontend(handler)
    bad = fe.send("bad", {"prompt": "boom", "stream": True})
    ok = fe.send("ok", {"prompt": "fine", "max_tokens": 5, "stream": True})
    fe.run()
    assert bad.status == 500 and "tokenizer exploded" in json.loads(bad.text)["error"]["message"]
    assert ok.status == 200 and ok.lines()[-1]["usage"]["completion_tokens"] == 5


class FailingDetokenizer(Detokenizer):
    """Raises on the fifth output token of prompts holding the word "fail"."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        super().__init__(tokenizer, prompt_ids, stop)
        self.faulty, self.count = "fail" in tokenizer.decode(prompt_ids), 0

    def add(self, token_id: int) -> tuple[str, bool]:
        self.count += 1
        if self.faulty and self.count == 5:
            raise ValueError("cannot decode (injected)")
        return super().add(token_id)


def assert_stream_failed(reply, message: str) -> None:
    """A stream a fault ended: mid-stream, an error line last; before its first chunk existed
    (a loaded machine, or a fast engine, can run several steps inside the first call), one
    complete 500."""
    if reply.status == 200:
        assert reply.lines()[-1]["finish_reason"] == "error"
        assert message in reply.lines()[-1]["error"]
    else:
        assert reply.status == 500 and len(reply.chunks) == 1, reply
        assert message in json.loads(reply.text)["error"]["message"]


def test_detokenizer_error_mid_stream_fails_that_stream_alone(handler, monkeypatch):
    monkeypatch.setattr(llm_engine, "Detokenizer", FailingDetokenizer)
    fe = Frontend(handler)
    bad = fe.send("bad", LONG | {"prompt": "fail here", "stream": True, "max_tokens": 40})
    whole = fe.send("whole", LONG | {"prompt": "fail too", "max_tokens": 40})
    ok = fe.send("ok", LONG | {"stream": True, "max_tokens": 40})
    fe.run()
    assert_stream_failed(bad, "detokenizer failed")
    assert whole.status == 500
    assert "detokenizer failed" in json.loads(whole.text)["error"]["message"]
    assert ok.lines()[-1]["finish_reason"] == "length"
    assert sum(len(line["token_ids"]) for line in ok.lines()) == 40


def test_step_fault_fails_its_streams_and_the_next_request_is_served(handler, monkeypatch):
    import torch
    model = handler.loop.engine.runner.model
    real, armed = model.logits, []

    def forward(*args, **kwargs):
        if armed:       # the first step after every stream has sent a chunk
            armed.clear()
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "logits", forward)
    fe = Frontend(handler)
    streams = [fe.send(f"s{i}", LONG | {"stream": True}) for i in range(3)]
    fe.run(until=lambda: all(s.chunks and s.lines() for s in streams))
    armed.append(1)
    fe.run()
    for s in streams:
        assert s.status == 200
        assert_stream_failed(s, "out of device memory")
    after = fe.send("after", LONG | {"max_tokens": 6})
    fe.run()
    assert after.status == 200 and json.loads(after.text)["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("crash_at", [1, 2])     # its first chunk, or a later one
def test_a_crash_while_answering_fails_that_request_alone(handler, monkeypatch, crash_at):
    from handlers.framing import Framer
    real, calls = Framer.chunk, []

    def chunk(self, outputs, stream):
        if stream.request_id == "bad":
            calls.append(1)
            if len(calls) >= crash_at:
                raise KeyError("renderer bug (injected)")
        return real(self, outputs, stream)

    monkeypatch.setattr(Framer, "chunk", chunk)
    fe = Frontend(handler)      # it asserts that no first response is final (client hangs)
    bad = fe.send("bad", LONG | {"stream": True, "max_tokens": 60})
    ok = fe.send("ok", LONG | {"stream": True, "max_tokens": 60})
    fe.run()
    if crash_at == 1:       # nothing sent yet: the error gets its own status
        assert bad.status == 500
        assert json.loads(bad.text)["error"]["message"] == "internal error: KeyError"
    else:
        assert bad.status == 200
        assert bad.lines()[-1] == {"finish_reason": "error", "error": "internal error: KeyError"}
    assert ok.lines()[-1]["finish_reason"] == "length"
    assert blocks_freed(handler)


def test_sigterm_drains_every_stream_with_an_error_and_stops_the_engine(handler, slow):
    fe = Frontend(handler)
    streams = [fe.send(f"s{i}", LONG | {"stream": True}) for i in range(2)]
    chat = fe.send("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 900,
                            "ignore_eos": True, "stream": True}, "v1/chat/completions")
    whole = fe.send("whole", LONG)
    fe.run(until=lambda: all(s.chunks and s.lines() for s in streams))
    handler._on_sigterm(signal.SIGTERM, None)
    fe.run()
    for s in streams:
        assert s.status == 200 and s.lines()[-1]["finish_reason"] == "error"
        assert s.lines()[-1]["error"] == DRAIN_MESSAGE
    assert DRAIN_MESSAGE in chat.text and chat.text.endswith("data: [DONE]\n\n")
    assert whole.status == 503 and json.loads(whole.text)["error"]["message"] == DRAIN_MESSAGE
    late = fe.send("late", LONG | {"stream": True})
    fe.run()
    assert late.status == 503
    handler.loop._thread.join(timeout=10)
    assert not handler.loop._thread.is_alive(), "engine thread still running"
    assert handler.loop.engine.allocator.num_used == 0 and not handler.loop.engine.has_unfinished()


def test_stream_of_a_previous_worker_ends_with_an_error_chunk(handler):
    fe = Frontend(handler)
    native = fe.requeue("native")
    sse = fe.requeue("sse", "v1/completions")
    new = fe.send("new", {"prompt": "hi", "max_tokens": 4, "stream": True})
    empty_form = fe.send("empty", {})      # a POST with no body field: data arrives as {} too
    fe.run()
    for reply in (native, empty_form):
        assert reply.status == 200 and reply.chunks[-1] == ""
        assert reply.lines() == [{"finish_reason": "error", "error": ORPHAN_MESSAGE}]
    assert ORPHAN_MESSAGE in sse.text and sse.text.endswith("data: [DONE]\n\n")
    assert new.lines()[-1]["usage"]["completion_tokens"] == 4


def test_hold_request_stays_open_without_bytes_one_per_worker(handler):
    """The keeper's hold (handlers/keeper.py): the first stays open with "" and criterion
    False beside real streams, a second is answered at once, and once the first is gone
    (its client left: missing from a call) the next one is held."""
    fe = Frontend(handler)
    hold = fe.send("hold-1", {"pid": 1}, path="hold")
    extra = fe.send("hold-2", {"pid": 2}, path="/hold")
    stream = fe.send("s", {"prompt": "hi", "max_tokens": 5, "stream": True})
    fe.run(until=lambda: stream.done)
    assert stream.lines()[-1]["finish_reason"] == "length"
    assert hold.status == 200 and not hold.done and set(hold.chunks) == {""}
    assert extra.done and json.loads(extra.text)["held"] is False
    del fe.replies["hold-1"]
    again = fe.send("hold-3", {"pid": 3}, path="hold")
    fe.call()
    fe.call()
    assert handler.hold == "hold-3" and not again.done and set(again.chunks) == {""}
