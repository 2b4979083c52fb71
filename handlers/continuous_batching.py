"""ContinuousBatchingHandler: an LLMEngine behind TorchServe, streaming tokens as they come.

Worker mode: ``continuousBatching: true``, chosen over ``asyncCommunication`` because only it
shows client disconnects (the request is left out of the next call), fails requests one by
one, and has a single writer on the worker socket (async mode corrupted it under load); its
cost is one round trip per call, 0.8-5.4 ms (docs/serving.md has the measurements). The
frontend calls ``handle`` once per round trip with every in-flight request of this worker
(already-seen ones arrive as empty dicts) plus new ones; what ``handle`` returns for a request
is its next HTTP chunk, and ``context.stopping_criteria`` says whether that chunk is the last.
The engine steps in a background thread (handlers.engine_loop); ``handle`` waits up to
``step_wait_s`` for new tokens and returns whatever each request has pending.

Rules learned from TorchServe 0.12 (docs/serving.md, "Wire rules"):
- a request that ends in its first response gets criterion None (a plain, complete response
  with its own status: how 4xx errors reach the client); True there would hang the client;
- once a chunk was sent the status is fixed: later errors travel in the last chunk;
- "" puts nothing on the wire (an empty chunk would end the body), so idle requests get "";
- a request missing from a call was dropped by the frontend (client gone): abort it; a lease
  renewed by every call covers the last request, after which no call comes at all;
- a request id never seen that arrives as an empty dict was streaming on a previous worker
  (killed or scaled down: TorchServe re-queues its job without the body), or is a POST with
  no body field at all (an empty form): it gets an error chunk with criterion False (headers
  first in the second case), then "" with criterion True, which ends either stream cleanly;
- should a request answered with a complete response be sent again (TorchServe's source
  allows it on a kept-alive connection; not observed in 0.12.0), answer "" with criterion
  True, which retires it;
- the keeper's hold request (route ``hold``, handlers/keeper.py) is kept open with "" and
  criterion False, one per worker, so that no worker waits in TorchServe's job poll with the
  model's lock while another has streams (docs/serving.md, "Several workers");
- any response, even "", with criterion False puts the 200 status line on the wire, so a
  non-streaming request is left out of the response (its index dropped from
  ``context.request_ids``) until it finishes: its status is chosen at the end (504 past its
  deadline, 503 while draining, 500 for an engine fault). The frontend re-sends it each call.

Reliability: a request's own fault (bad limits, tokenizer error, a crash while rendering it)
fails that request alone; nothing raises out of ``handle``. SIGTERM to the worker drains it:
every in-flight stream ends with a last chunk carrying an error, new requests get a 503, and
the engine thread stops (TorchServe 0.12 itself closes the worker socket and SIGKILLs the
worker on scale-down or stop, with no window to send anything: docs/serving.md,
"Reliability").

Tensor parallelism (``parallelType: tp`` with a ``torchrun:`` block): TorchServe starts the
worker through torchrun, and every rank loads this handler and gets every request. Rank 0
runs the engine and streams as above (only its replies reach the wire); the other ranks run
the follower loop of engine/tensor_parallel.py on a thread and answer every call with ""
at once, so TorchServe is never held. A lost rank ends every stream with an error chunk,
then rank 0 exits so that torchrun / TorchServe start the worker again.
"""
import json
import logging
import os
import signal
import threading
import time
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

from engine import LLMEngine
from engine.tensor_parallel import follow_torchrun
from handlers.engine_loop import EngineLoop, Stopping
from handlers.framing import Framer, error_body
from handlers.keeper import ROUTE as HOLD_ROUTE, Keeper
from handlers.limits import enforce
from handlers.protocol import ANSWERED_AT_ONCE, ParsedRequest, RequestError, parse_request
from handlers.settings import HandlerSettings
from handlers.stream_metrics import StreamMetrics

logger = logging.getLogger(__name__)
DRAIN_MESSAGE = "the server is shutting down this model's worker; retry later"
ORPHAN_MESSAGE = "the worker serving this stream stopped mid-stream; retry the request"


class ContinuousBatchingHandler(BaseHandler):
    """One LLMEngine per worker; one HTTP chunk per request per ``handle`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: EngineLoop | None = None
        self.settings: HandlerSettings | None = None
        self.framers: dict[str, Framer] = {}   # in-flight requests, by TorchServe request id
        self.started: set[str] = set()         # requests whose first chunk went out
        self.closed: set[str] = set()          # answered with a complete response
        self.ending: set[str] = set()          # sent their last chunk; end them with "" + True
        self.hold: str | None = None           # the hold request this worker keeps open
        self.keeper: Keeper | None = None
        self.model_name = ""
        self.follower: threading.Thread | None = None  # a tensor-parallel rank other than 0

    def initialize(self, context: Any) -> None:
        self.settings = HandlerSettings.from_context(context)
        self.model_name = context.model_name
        if self.settings.tensor_parallel_rank:
            self.follower = threading.Thread(target=self._follow, name="tp-follower",
                                             daemon=True)
            self.follower.start()
            self.context, self.initialized = context, True
            return
        engine = LLMEngine(self.settings.model_path, **self.settings.engine_args())
        metrics = StreamMetrics(context.metrics, context.model_name)
        self.loop = EngineLoop(engine, self.settings.lease_s, metrics,
                               self.settings.metrics_interval_s, self._on_fatal)
        self.loop.start()
        self.keeper = Keeper.from_env(context.model_name, lambda: self.hold is not None)
        if self.keeper is not None:
            self.keeper.start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.context = context
        self.initialized = True
        logger.info("engine ready: %s", engine.config)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        if self.follower is not None:   # rank 0 answers; TorchServe drops these replies
            return [""] * len(data)
        assert self.loop is not None and self.settings is not None
        ids = [context.get_request_id(idx) for idx in range(len(data))]
        self._abort_missing(set(ids))
        self.loop.renew(ids)
        replies: list[str] = [""] * len(data)
        verdicts: list[bool | None] = [False] * len(data)
        answered = False
        for idx, (rid, request) in enumerate(zip(ids, data)):
            if rid in self.framers or rid == self.hold:
                continue
            if rid in self.ending:
                self.ending.discard(rid)
                verdicts[idx] = True
                continue
            if rid in self.closed:     # answered already; TorchServe sent it once more
                logger.debug("request %s: retiring after its complete response", rid)
                self.closed.discard(rid)
                verdicts[idx] = True
                continue
            if not request:             # mid-stream on a worker that died or was scaled down
                replies[idx] = self._orphan(idx, rid, context)
                self.ending.add(rid)
                continue
            reply = self._admit(idx, rid, request, context)
            if reply is not None:
                replies[idx], verdicts[idx] = reply, None
                self.closed.add(rid)
                answered = True
        inflight = [rid for rid in ids if rid in self.framers]
        if inflight or self.hold in ids:  # a hold alone: the round trip paced, not spun
            self.loop.wait(inflight, 0.0 if answered else
                           self.settings.step_wait_s if inflight else self.settings.hold_wait_s)
        held = []
        for idx, rid in enumerate(ids):
            if rid not in self.framers:
                continue
            try:
                reply = self._next_chunk(idx, rid, context)
            except Exception as exc:    # this request's fault: never reset the others
                reply = self._crash(idx, rid, exc, context)
            if reply is None:
                held.append(idx)
            else:
                replies[idx], verdicts[idx] = reply
        context.stopping_criteria = [lambda _reply, v=v: v for v in verdicts]
        for idx in held:                # no response yet: the status line stays unsent
            del context.request_ids[idx]
        return replies

    def _follow(self) -> None:
        """A follower rank: run rank 0's steps; exit the process when that ends (rank 0 or
        another rank is gone) so that torchrun starts the ranks again."""
        try:
            follow_torchrun(self.settings.model_path, **self.settings.engine_args())
            logger.info("tensor parallel: rank 0 stopped this rank")
        except BaseException:   # noqa: BLE001 - any end of the loop ends the rank
            logger.exception("tensor parallel: this rank lost the others")
        os._exit(1)

    def _on_fatal(self) -> None:
        """The engine lost a rank: let the streams' error chunks go out, then exit so that
        the worker is started again (a process cannot rejoin its ranks)."""
        def leave() -> None:
            deadline = time.monotonic() + 10
            while self.framers and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)         # the last replies leave the socket
            logger.error("tensor parallel: exiting the worker after a lost rank")
            os._exit(1)
        threading.Thread(target=leave, name="tp-exit", daemon=True).start()

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        logger.info("SIGTERM: draining the engine")
        threading.Thread(target=self.loop.stop, args=(DRAIN_MESSAGE, 503), daemon=True).start()

    def _admit(self, idx: int, rid: str, request: dict[str, Any], context: Any) -> str | None:
        """Start a new request; returns a complete response when it is answered at once."""
        url_path = context.get_request_header(idx, "url_path") or ""
        if url_path.strip("/") == HOLD_ROUTE:
            return self._hold(idx, rid, context)
        try:
            parsed = parse_request(request, url_path, self.loop.engine.tokenizer,
                                   self.settings.default_max_tokens,
                                   self.settings.max_tokens_limit,
                                   self.loop.engine.config.max_num_seqs)
            if parsed.api in ANSWERED_AT_ONCE:
                context.set_response_content_type(idx, "application/json")
                return json.dumps(self._info(parsed))
            if self.loop.stopping:
                raise RequestError(DRAIN_MESSAGE, status=503)
            deadline = enforce(parsed, self.settings, self.loop.engine.tokenizer)
            self.loop.submit(rid, parsed.prompts, parsed.params, deadline)
        except RequestError as err:
            return self._error(idx, err, context)
        except ValueError as exc:       # the engine refused it: too long, out of vocab, ...
            return self._error(idx, RequestError(str(exc), param="prompt"), context)
        except Stopping:                # the loop began draining after the check above
            return self._error(idx, RequestError(DRAIN_MESSAGE, status=503), context)
        except Exception as exc:        # tokenizer, chat template, ...: this request only
            logger.exception("request %s: could not be admitted", rid)
            return self._error(idx, RequestError(f"could not start this request: "
                                                 f"{type(exc).__name__}: {str(exc)[:200]}",
                                                 status=500), context)
        self.framers[rid] = Framer(parsed.api, parsed.stream, parsed.include_usage, rid,
                                   self.model_name, parsed.params, parsed.echo,
                                   parsed.echo_first_token, len(parsed.prompts), parsed.tools)
        return None

    def _next_chunk(self, idx: int, rid: str, context: Any) -> tuple[str, bool | None] | None:
        """The request's next chunk and criterion; None: no response yet (non-streaming)."""
        framer = self.framers[rid]
        context.set_response_content_type(idx, framer.content_type)
        first = rid not in self.started
        drained = self.loop.drain(rid)
        if drained is None:             # aborted behind our back (lease lapsed)
            self._forget(rid)
            if first:
                self.closed.add(rid)
                return self._error(idx, RequestError("request aborted", status=500),
                                   context), None
            return "", True
        stream, outputs = drained
        if not stream.finished:
            if not framer.stream:       # held: its text accumulates in the stream
                return None
            chunk = framer.chunk(outputs, stream)
            self.started.add(rid)       # only once its first chunk exists (see _crash)
            return chunk, False
        self._forget(rid)
        if first:
            self.closed.add(rid)
            if stream.status != 200:    # nothing sent yet: the error gets its own status
                return self._error(idx, RequestError(stream.error, status=stream.status),
                                   context), None
            return (framer.chunk(outputs, stream) if framer.stream else framer.whole(stream)), None
        return framer.chunk(outputs, stream), True

    def _hold(self, idx: int, rid: str, context: Any) -> str | None:
        """Keep the first hold request open (handlers/keeper.py); answer any other at once."""
        if self.hold is None:
            self.hold = rid
            return None
        context.set_response_content_type(idx, "application/json")
        return json.dumps({"held": False, "reason": "this worker holds one already"})

    def _orphan(self, idx: int, rid: str, context: Any) -> str:
        """The error chunk for a stream whose worker is gone (TorchServe re-queued its job)."""
        logger.info("request %s: stream of a previous worker, ending it", rid)
        err = RequestError(ORPHAN_MESSAGE, status=500)
        route = (context.get_request_header(idx, "url_path") or "").strip("/")
        return self._error_chunk(route in ("", "generate"), err)

    def _error_chunk(self, ndjson: bool, err: RequestError) -> str:
        if ndjson:
            return json.dumps({"finish_reason": "error", "error": err.message}) + "\n"
        return f"data: {error_body(err)}\n\ndata: [DONE]\n\n"

    def _crash(self, idx: int, rid: str, exc: Exception, context: Any) -> tuple[str, bool | None]:
        """End a request whose own handling raised, with an error in its last response."""
        logger.exception("request %s: failed while answering it", rid)
        framer, started = self.framers.get(rid), rid in self.started
        self.loop.abort(rid)
        self._forget(rid)
        err = RequestError(f"internal error: {type(exc).__name__}", status=500)
        if not started:
            self.closed.add(rid)
            return self._error(idx, err, context), None
        return self._error_chunk(framer is None or framer.api == "generate", err), True

    def _abort_missing(self, present: set[str]) -> None:
        if self.hold not in present:    # its client (a keeper) is gone: hold the next one
            self.hold = None
        for rid in list(self.framers):
            if rid not in present:
                logger.info("request %s: client gone, aborting", rid)
                self.loop.abort(rid)
                self._forget(rid)
        self.closed &= present
        self.ending &= present

    def _forget(self, rid: str) -> None:
        self.framers.pop(rid, None)
        self.started.discard(rid)

    def _error(self, idx: int, err: RequestError, context: Any) -> str:
        context.set_response_status(err.status, err.message[:200], idx)
        context.set_response_content_type(idx, "application/json")
        return error_body(err)

    def _info(self, parsed: ParsedRequest) -> dict[str, Any]:
        max_model_len = self.loop.engine.max_model_len
        if parsed.api == "stats":
            return self.loop.stats() | {"draining": self.loop.stopping, "pid": os.getpid()}
        if parsed.api == "tokenize":
            return parsed.reply | {"max_model_len": max_model_len}
        if parsed.api == "detokenize":
            return parsed.reply
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": int(time.time()),
                                            "owned_by": "torchserve-llm",
                                            "max_model_len": max_model_len}]}
