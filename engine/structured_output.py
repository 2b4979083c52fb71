"""Structured output at run time: grammars compiled off the step thread, logits masked per row.

``GrammarCompiler`` (one per engine) compiles each request's grammar against the model's
vocabulary with xgrammar, in its own threads, keeping the result under the grammar's key, so
the step thread never waits on a compile and a repeated schema costs a dict lookup. Every
constrained request holds a ``GrammarState``: the compile's future, then an xgrammar matcher
that has accepted each of its output tokens. Preemption leaves the state alone (recompute
replays K/V, it samples nothing already sampled), and prefix caching never sees it. ``mask``
fills one bitmask row per constrained sequence and applies them all to the logits at once.
"""
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch
import xgrammar as xgr

from engine.structured_output_params import StructuredOutputsParams, parse


class GrammarState:
    """One request's grammar: compiling, then a matcher in step with its output tokens."""

    def __init__(self, future: Future) -> None:
        self.future = future
        self.matcher: xgr.GrammarMatcher | None = None

    @property
    def ready(self) -> bool:
        return self.future.done()

    @property
    def error(self) -> str | None:
        """Why the compile failed (only asked once ``ready``)."""
        exc = self.future.exception()
        return None if exc is None else f"structured_outputs: {exc}"

    def start(self) -> None:
        self.matcher = xgr.GrammarMatcher(self.future.result())

    def fork(self) -> "GrammarState":
        """A copy in the same state, for another choice of the same request (n > 1)."""
        state = GrammarState(self.future)
        state.matcher = self.matcher.fork()
        return state

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar forbids it."""
        return self.matcher.accept_token(token)

    @property
    def ended(self) -> bool:
        """The grammar reached its end and accepted a stop token."""
        return self.matcher.is_terminated()


class GrammarCompiler:
    """Compiles grammars for one tokenizer and vocabulary; keeps the latest ``cache_size``."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 cache_size: int = 256, max_workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size            # the model's logits width, padding included
        self.stop_token_ids = stop_token_ids
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self.compile_s: dict[tuple[str, str], float] = {}   # each key's compile time, seconds

    def start(self, params: StructuredOutputsParams) -> GrammarState:
        """A request's GrammarState, its compile queued unless the grammar is cached."""
        key = params.key()
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._cache[key] = self._pool.submit(self._compile, key)
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
        return GrammarState(future)

    def _compile(self, key: tuple[str, str]) -> xgr.CompiledGrammar:
        start = time.perf_counter()
        compiled = self._xgr_compiler().compile_grammar(parse(*key))
        self.compile_s[key] = time.perf_counter() - start
        return compiled

    def _xgr_compiler(self) -> xgr.GrammarCompiler:
        # Built by the first compile: TokenizerInfo reads the whole vocabulary.
        with self._compiler_lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size,
                    stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=max(1, (os.cpu_count() or 2) // 2), cache_enabled=False)
            return self._compiler

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def wait_any(states: list[GrammarState], timeout_s: float) -> None:
    """Block until one of ``states`` finished compiling, or ``timeout_s``."""
    wait([s.future for s in states], timeout=timeout_s, return_when=FIRST_COMPLETED)


def mask(logits: torch.Tensor, grammars: list[GrammarState | None]) -> None:
    """In place: -inf for every token a row's grammar forbids next; rows with None untouched."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[1])
    xgr.BatchGrammarMatcher().batch_fill_next_token_bitmask(
        [grammars[i].matcher for i in rows], bitmask, rows)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    indices=rows)
