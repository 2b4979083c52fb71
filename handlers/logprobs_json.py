"""Logprobs as JSON, in the shape each API expects; rendering only, no engine state.

- completions (OpenAI legacy): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``,
  one entry per token; a top-N dict is keyed by token text and includes the chosen token
  (as vLLM does); an echoed prompt's first token has None for both.
- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
- native: one object per token with ids, texts, logprob, rank and ``top_logprobs``.
JSON has no -inf: logprobs are floored at -9999.0 (vLLM's convention).
"""
from typing import Any

from engine.logprobs import Logprob, PositionLogprobs

FLOOR = -9999.0


def _lp(value: float) -> float:
    return max(value, FLOOR)


def _bytes(text: str) -> list[int] | None:
    """UTF-8 bytes of a token's text; None when the token is part of a character."""
    return None if "\ufffd" in text else list(text.encode("utf-8"))


class CompletionLogprobs:
    """Accumulates the legacy completions ``logprobs`` object of one choice."""

    def __init__(self) -> None:
        self.offset = 0             # characters of the choice's text so far

    def render(self, positions: list[PositionLogprobs | None],
               first_text: str = "") -> dict[str, Any]:
        """``first_text``: the text of an echoed prompt's first token (its entry is None)."""
        body: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for pos in positions:
            if pos is None:         # nothing predicts a prompt's first token
                body["tokens"].append(first_text)
                body["token_logprobs"].append(None)
                body["top_logprobs"].append(None)
                body["text_offset"].append(self.offset)
                self.offset += len(first_text)
                continue
            body["tokens"].append(pos.token.text)
            body["token_logprobs"].append(_lp(pos.token.logprob))
            top = {e.text: _lp(e.logprob) for e in pos.top}
            top.setdefault(pos.token.text, _lp(pos.token.logprob))
            body["top_logprobs"].append(top)
            body["text_offset"].append(self.offset)
            self.offset += len(pos.token.text)
        return body


def chat(positions: list[PositionLogprobs]) -> dict[str, Any]:
    def entry(e: Logprob) -> dict[str, Any]:
        return {"token": e.text, "logprob": _lp(e.logprob), "bytes": _bytes(e.text)}
    return {"content": [entry(p.token) | {"top_logprobs": [entry(e) for e in p.top]}
                        for p in positions]}


def native(positions: list[PositionLogprobs | None]) -> list[dict[str, Any] | None]:
    def entry(e: Logprob) -> dict[str, Any]:
        return {"token_id": e.token_id, "token": e.text, "logprob": _lp(e.logprob),
                "rank": e.rank}
    return [None if p is None else entry(p.token) | {"top_logprobs": [entry(e) for e in p.top]}
            for p in positions]
