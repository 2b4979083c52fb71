"""EngineLoop: one LLMEngine stepped by a background thread, with per-request output buffers.

TorchServe calls the handler once per round trip; the engine steps at its own pace in this
thread. Each request has a RequestStream that collects the engine's deltas until the handler
drains them. A request whose lease is not renewed (its client is gone and TorchServe stopped
sending it) is aborted here, so its KV blocks return to the pool; so is one past its deadline,
which finishes with an error and an HTTP status for the handler to send. ``stop`` fails
every stream (a drain) and lets the thread free their blocks before it ends. An engine that
failed for good (``engine.failed``: a tensor-parallel rank was lost) has ended every request
with an error; the loop then stops and calls ``on_fatal``. This file knows
the engine API and threads, never TorchServe's wire format.
"""
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from engine import RequestOutput
from handlers.stream_metrics import StreamMetrics

logger = logging.getLogger(__name__)


class Stopping(Exception):
    """``submit`` after ``stop``: the worker is draining."""


@dataclass
class RequestStream:
    """Everything the handler needs to answer one request, filled by the engine thread."""
    request_id: str
    arrival_s: float
    lease_until_s: float
    deadline_s: float = float("inf")                      # monotonic; past it: fail with 504
    pending: list[Any] = field(default_factory=list)      # RequestOutput deltas not yet sent
    history: list[Any] = field(default_factory=list)      # every delta (whole replies)
    choice_tokens: dict[int, int] = field(default_factory=dict)   # completion tokens by choice
    text: list[str] = field(default_factory=list)         # all text so far (non-streaming)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    status: int = 200                                     # HTTP status of a failed stream
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    orphaned: bool = False                                # aborted: nobody reads it any more

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineLoop:
    """Owns the engine; ``submit``/``abort``/``renew``/``drain``/``wait`` are thread-safe."""

    def __init__(self, engine: Any, lease_s: float, metrics: StreamMetrics | None,
                 metrics_interval_s: float = 0.5, on_fatal: Any = None) -> None:
        self.engine = engine
        self.on_fatal = on_fatal
        self.lease_s = lease_s
        self.metrics = metrics
        self.metrics_interval_s = metrics_interval_s
        self._cond = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._stats: dict[str, Any] = asdict(engine.stats())
        self._last_metrics_s = 0.0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self, message: str = "the engine stopped", status: int = 503) -> None:
        """Fail every stream with ``message``, free their blocks, end the engine thread."""
        with self._cond:
            self._fail_all(message, status)
            self._stopping = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def submit(self, request_id: str, prompt: str | list[int] | list[Any], params: Any,
               timeout_s: float | None = None) -> RequestStream:
        """Queue a request; the engine's ValueError (bad prompt, too long, ...) propagates;
        Stopping once the loop is stopping."""
        now = time.monotonic()
        stream = RequestStream(request_id, arrival_s=now, lease_until_s=now + self.lease_s,
                               deadline_s=now + timeout_s if timeout_s else float("inf"))
        with self._cond:
            if self._stopping:
                raise Stopping("the engine is shutting down")
            self.engine.add_request(request_id, prompt, params)
            self._streams[request_id] = stream
            self._cond.notify_all()
        return stream

    def renew(self, request_ids: Iterable[str]) -> None:
        until = time.monotonic() + self.lease_s
        with self._cond:
            for rid in request_ids:
                stream = self._streams.get(rid)
                if stream is not None:
                    stream.lease_until_s = until

    def abort(self, request_id: str) -> None:
        """The client is gone: stop generating and free the request's blocks."""
        with self._cond:
            stream = self._streams.get(request_id)
            if stream is None:
                return
            if stream.finished:
                del self._streams[request_id]
                return
            stream.orphaned = True
            self._abort_engine(request_id)
            self._cond.notify_all()

    def active_ids(self) -> list[str]:
        with self._cond:
            return [rid for rid, s in self._streams.items() if not s.orphaned]

    def get(self, request_id: str) -> RequestStream | None:
        with self._cond:
            return self._streams.get(request_id)

    def drain(self, request_id: str) -> tuple[RequestStream, list[Any]] | None:
        """Take the pending deltas; a finished stream is forgotten once drained."""
        with self._cond:
            stream = self._streams.get(request_id)
            if stream is None or stream.orphaned:
                return None
            outputs, stream.pending = stream.pending, []
            if stream.finished:
                del self._streams[request_id]
            return stream, outputs

    def wait(self, request_ids: list[str], timeout_s: float) -> None:
        """Block until one of ``request_ids`` has something to send, or ``timeout_s``."""
        def ready() -> bool:
            return any((s := self._streams.get(rid)) is not None and (s.pending or s.finished)
                       for rid in request_ids)
        with self._cond:
            self._cond.wait_for(ready, timeout=timeout_s)

    def stats(self) -> dict[str, Any]:
        """The latest engine stats snapshot, taken by the engine thread after each step."""
        with self._cond:
            return dict(self._stats, num_streams=len(self._streams))

    def _abort_engine(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except (KeyError, ValueError):
            logger.debug("abort of %s: not in the engine any more", request_id)

    def _expire(self, now: float) -> None:
        """Abort requests whose lease lapsed (client gone) or whose deadline passed."""
        for rid, stream in list(self._streams.items()):
            if stream.finished or stream.orphaned:
                continue
            if stream.lease_until_s < now:
                logger.info("request %s: lease expired, aborting", rid)
                stream.orphaned = True
                self._abort_engine(rid)
            elif stream.deadline_s < now:
                limit = stream.deadline_s - stream.arrival_s
                logger.info("request %s: past its %.3g s deadline, aborting", rid, limit)
                self._fail(rid, stream, f"request_timeout_s: the request ran past its deadline "
                                        f"of {limit:.3g} s after {stream.completion_tokens} "
                                        f"tokens", 504)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self.engine.has_unfinished(),
                                    timeout=self.lease_s / 2)
                if self._stopping and not self.engine.has_unfinished():
                    return
                self._expire(time.monotonic())
                if not self.engine.has_unfinished():
                    continue
            try:
                outputs = self.engine.step()
                stats = self.engine.stats()
            except Exception:  # the engine isolates model faults; this is anything else
                logger.exception("engine step failed")
                with self._cond:
                    self._fail_all("engine step failed; see the worker log", 500)
                time.sleep(0.1)         # no hot loop if the engine keeps failing
                if self._stopping:      # a broken engine cannot finish the drain: give up
                    return
                continue
            now = time.monotonic()
            with self._cond:
                for out in outputs:
                    self._push(out, now)
                self._stats = asdict(stats)
                failed = getattr(self.engine, "failed", None)
                if failed:
                    logger.error("engine failed for good: %s", failed)
                    self._fail_all(failed, 500)
                    self._stopping = True
                self._cond.notify_all()
            if failed:
                if self.on_fatal is not None:
                    self.on_fatal()
                return
            self._emit_engine_metrics(stats, now, idle=stats.num_running + stats.num_waiting == 0)

    def _push(self, out: Any, now: float) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None or stream.finished:   # failed here already: the engine's abort is moot
            return
        if out.token_ids:
            if stream.first_token_s is None:
                stream.first_token_s = now
                if self.metrics:
                    self.metrics.first_token(now - stream.arrival_s, out.queue_time_s)
            stream.last_token_s = now
        stream.text.append(out.text)
        stream.token_ids.extend(out.token_ids)
        stream.history.append(out)
        stream.prompt_tokens = out.prompt_tokens
        stream.choice_tokens[out.index] = out.completion_tokens
        stream.completion_tokens = sum(stream.choice_tokens.values())   # usage: every choice
        stream.finish_reason = out.finish_reason if out.finished else None
        stream.error = out.error or stream.error       # n > 1: one choice's error stays
        if out.error:
            stream.status = 500
        if stream.orphaned:
            if stream.finished:
                del self._streams[out.request_id]
            return
        stream.pending.append(out)
        if stream.finished and self.metrics:
            self.metrics.finished(stream, now)

    def _fail_all(self, message: str, status: int) -> None:
        """Fail every unfinished stream (caller holds the lock)."""
        for rid, stream in list(self._streams.items()):
            if not stream.finished:
                self._fail(rid, stream, message, status)

    def _fail(self, rid: str, stream: RequestStream, message: str, status: int) -> None:
        """Finish ``stream`` with an error now; the engine frees its blocks at its next step."""
        self._abort_engine(rid)
        stream.finish_reason, stream.error, stream.status = "error", message, status
        if stream.orphaned:
            del self._streams[rid]
        else:                           # the final delta, as the engine would have sent it
            stream.pending.append(RequestOutput(rid, "", [], "error", stream.prompt_tokens,
                                                stream.completion_tokens, message))
        self._cond.notify_all()

    def _emit_engine_metrics(self, stats: Any, now: float, idle: bool) -> None:
        if self.metrics and (idle or now - self._last_metrics_s >= self.metrics_interval_s):
            self._last_metrics_s = now
            self.metrics.engine(stats)
