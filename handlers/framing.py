"""Framing: how a request's deltas and final state become bytes on the wire, per API.

Native streaming is NDJSON (one object per engine delta, the last one carrying
finish_reason and usage); the OpenAI routes stream ``data: {...}`` server-sent events ending
with ``data: [DONE]``. Non-streaming requests get one JSON object. This file never decides
when to send; it only renders.
"""
import json
import time
from typing import Any

from handlers.protocol import RequestError

OPENAI_FINISH = {"stop": "stop", "length": "length", "abort": "stop", "error": "stop"}


def usage(stream: Any) -> dict[str, int]:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


def error_body(err: RequestError) -> str:
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return json.dumps({"error": {"message": err.message, "type": kind,
                                 "param": err.param, "code": err.status}})


class Framer:
    """Renders one request's responses; ``api`` is generate, completions or chat."""

    def __init__(self, api: str, stream: bool, include_usage: bool, request_id: str,
                 model_name: str) -> None:
        self.api, self.stream, self.include_usage = api, stream, include_usage
        self.model_name = model_name
        self.created = int(time.time())
        prefix = "chatcmpl" if api == "chat" else "cmpl"
        self.id = f"{prefix}-{request_id}"
        self._role_sent = False

    @property
    def content_type(self) -> str:
        if not self.stream:
            return "application/json"
        return "application/x-ndjson" if self.api == "generate" else "text/event-stream"

    def chunk(self, outputs: list[Any], stream: Any) -> str:
        """The bytes for the deltas in ``outputs``; closes the stream when it finished."""
        if self.api == "generate":
            return self._ndjson(outputs, stream)
        parts = [self._sse(self._openai_delta(out.text, None)) for out in outputs
                 if out.text or out.token_ids]
        if stream.finished:
            if stream.error:
                parts.append(self._sse({"error": {"message": stream.error, "type": "server_error",
                                                  "param": None, "code": 500}}))
            parts.append(self._sse(self._openai_delta("", OPENAI_FINISH[stream.finish_reason])))
            if self.include_usage:
                parts.append(self._sse(self._openai_head("chunk") | {"choices": [],
                                                                     "usage": usage(stream)}))
            parts.append("data: [DONE]\n\n")
        return "".join(parts)

    def whole(self, stream: Any) -> str:
        """The single JSON object of a non-streaming request."""
        text = "".join(stream.text)
        if self.api == "generate":
            body = {"text": text, "token_ids": stream.token_ids,
                    "finish_reason": stream.finish_reason, "usage": usage(stream)}
            if stream.error:
                body["error"] = stream.error
            return json.dumps(body)
        choice: dict[str, Any] = {"index": 0, "finish_reason": OPENAI_FINISH[stream.finish_reason],
                                  "logprobs": None}
        if self.api == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return json.dumps(self._openai_head("whole") | {"choices": [choice],
                                                         "usage": usage(stream)})

    def _ndjson(self, outputs: list[Any], stream: Any) -> str:
        lines = []
        for i, out in enumerate(outputs):
            line: dict[str, Any] = {"text": out.text, "token_ids": list(out.token_ids)}
            if i == len(outputs) - 1 and stream.finished:
                line["finish_reason"] = stream.finish_reason
                line["usage"] = usage(stream)
                if stream.error:
                    line["error"] = stream.error
            elif not (out.text or out.token_ids):
                continue
            lines.append(json.dumps(line) + "\n")
        return "".join(lines)

    def _openai_head(self, kind: str) -> dict[str, Any]:
        if self.api == "chat":
            obj = "chat.completion.chunk" if kind == "chunk" else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}

    def _openai_delta(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.api == "chat":
            delta: dict[str, Any] = {"content": text} if text or finish_reason is None else {}
            if not self._role_sent:
                delta["role"] = "assistant"
                self._role_sent = True
            choice["delta"] = delta
        else:
            choice["text"] = text
        return self._openai_head("chunk") | {"choices": [choice]}

    @staticmethod
    def _sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"
