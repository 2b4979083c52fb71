"""Framing: how a request's deltas and final state become bytes on the wire, per API.

Native streaming is NDJSON (one object per engine delta, the last one carrying
finish_reason and usage); the OpenAI routes stream ``data: {...}`` server-sent events ending
with ``data: [DONE]``. Non-streaming requests get one JSON object. This file never decides
when to send; it only renders.

A request with ``n`` > 1 or several prompts (completions) renders each choice by its
``index``, prompt-major (choice ``j`` of prompt ``p`` is ``p * n + j``): OpenAI chunks carry
it in ``choices[0].index`` and end each choice with its own finish chunk; native lines carry
``index`` and the choice's ``finish_reason``; whole replies list every choice. Logprobs are
rendered by handlers/logprobs_json.py in each API's shape; an echoed prompt (completions)
comes first in each of its choices' text and logprobs.
"""
import json
import time
from typing import Any

from handlers import logprobs_json
from handlers.protocol import RequestError
from handlers.tool_calls import ToolCallStream, Tools

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
                 model_name: str, params: Any = None, echo: list[str] | None = None,
                 echo_first_token: list[str] | None = None, num_prompts: int = 1,
                 tools: Tools | None = None) -> None:
        self.api, self.stream, self.include_usage = api, stream, include_usage
        self.model_name = model_name
        self.created = int(time.time())
        prefix = "chatcmpl" if api == "chat" else "cmpl"
        self.id = f"{prefix}-{request_id}"
        self.n = params.n if params is not None else 1          # choices per prompt
        self.num_choices = self.n * num_prompts
        self.logprobs = params is not None and params.logprobs is not None
        self.prompt_logprobs = params is not None and params.prompt_logprobs is not None
        self.echo, self.echo_first_token = echo, echo_first_token or []
        self._started: set[int] = set()        # choices whose first chunk went out
        self._ended: set[int] = set()          # choices whose finish chunk went out
        self._offsets: dict[int, logprobs_json.CompletionLogprobs] = {}
        self._prompt: dict[int, list[Any]] = {}    # each prompt's logprobs, once they arrived
        self.tools = tools
        self._calls: dict[int, ToolCallStream] = {}    # streamed choices' tool-call state

    @property
    def content_type(self) -> str:
        if not self.stream:
            return "application/json"
        return "application/x-ndjson" if self.api == "generate" else "text/event-stream"

    def chunk(self, outputs: list[Any], stream: Any) -> str:
        """The bytes for the deltas in ``outputs``; closes the stream when it finished."""
        if self.api == "generate":
            return self._ndjson(outputs, stream)
        parts, ended = [], {}
        for out in outputs:
            self._keep_prompt_logprobs(out)
            text, calls = self._tool_stream(out.index).feed(out.text) if self.tools \
                else (out.text, [])
            if text or out.token_ids or calls or (self.echo is not None
                                                  and out.index not in self._started):
                parts.append(self._sse(self._openai_delta(out.index, text, None,
                                                          out.logprobs or [], calls)))
            if out.finish_reason is not None:
                ended[out.index] = out.finish_reason
        if stream.finished:
            if stream.error:
                parts.append(self._sse({"error": {"message": stream.error, "type": "server_error",
                                                  "param": None, "code": 500}}))
            for i in range(self.num_choices):
                if i not in self._ended:
                    ended.setdefault(i, stream.finish_reason)
        for i, reason in ended.items():
            finish = OPENAI_FINISH[reason]
            if self.tools is not None:
                calls = self._tool_stream(i)
                text, deltas = calls.finish()
                if text or deltas:
                    parts.append(self._sse(self._openai_delta(i, text, None, [], deltas)))
                finish = "tool_calls" if calls.num_calls and reason == "stop" else finish
            parts.append(self._sse(self._openai_delta(i, "", finish, [])))
            self._ended.add(i)
        if stream.finished:
            if self.include_usage:
                parts.append(self._sse(self._openai_head("chunk") | {"choices": [],
                                                                     "usage": usage(stream)}))
            parts.append("data: [DONE]\n\n")
        return "".join(parts)

    def whole(self, stream: Any) -> str:
        """The single JSON object of a non-streaming request."""
        choices = self._gather(stream)
        if self.api == "generate":
            body: dict[str, Any] = {"usage": usage(stream)}
            if self.n == 1:
                body = {"text": "".join(stream.text), "token_ids": stream.token_ids,
                        "finish_reason": stream.finish_reason} | body
                if self.logprobs:
                    body["logprobs"] = logprobs_json.native(choices[0]["logprobs"])
            else:
                body = {"outputs": [self._native_choice(i, c) for i, c in choices.items()],
                        "finish_reason": stream.finish_reason} | body
            if self.prompt_logprobs and 0 in self._prompt:
                body["prompt_logprobs"] = logprobs_json.native(self._prompt[0])
            if stream.error:
                body["error"] = stream.error
            return json.dumps(body)
        rendered = []
        for i, c in choices.items():
            reason = OPENAI_FINISH[c["finish_reason"] or stream.finish_reason]
            choice: dict[str, Any] = {"index": i, "finish_reason": reason,
                                      "logprobs": self._openai_logprobs(i, c["logprobs"])}
            if self.api == "chat":
                choice["message"] = {"role": "assistant", "content": c["text"]}
                content, calls = self.tools.parse(c["text"]) if self.tools else (c["text"], [])
                if calls:
                    choice["message"] = {"role": "assistant", "content": content,
                                         "tool_calls": calls}
                    if choice["finish_reason"] == "stop":
                        choice["finish_reason"] = "tool_calls"
            else:
                choice["text"] = self._echoed(i) + c["text"]
            rendered.append(choice)
        return json.dumps(self._openai_head("whole") | {"choices": rendered,
                                                         "usage": usage(stream)})

    def _gather(self, stream: Any) -> dict[int, dict[str, Any]]:
        """Each choice's whole text, ids, logprobs and finish reason from the stream's deltas."""
        choices = {i: {"text": "", "token_ids": [], "logprobs": [], "finish_reason": None}
                   for i in range(self.num_choices)}
        for out in stream.history:
            self._keep_prompt_logprobs(out)
            c = choices[out.index]
            c["text"] += out.text
            c["token_ids"] += list(out.token_ids)
            c["logprobs"] += out.logprobs or []
            c["finish_reason"] = out.finish_reason or c["finish_reason"]
        return choices

    def _native_choice(self, index: int, c: dict[str, Any]) -> dict[str, Any]:
        body = {"index": index, "text": c["text"], "token_ids": c["token_ids"],
                "finish_reason": c["finish_reason"]}
        if self.logprobs:
            body["logprobs"] = logprobs_json.native(c["logprobs"])
        return body

    def _openai_logprobs(self, index: int, positions: list[Any]) -> dict[str, Any] | None:
        """The choice's next logprobs, the echoed prompt's first (completions)."""
        if not self.logprobs:
            return None
        if self.api == "chat":
            return logprobs_json.chat(positions)
        first = index not in self._offsets
        offsets = self._offsets.setdefault(index, logprobs_json.CompletionLogprobs())
        if first and self.echo is not None:
            prompt = index // self.n
            return offsets.render(self._prompt.get(prompt, []) + positions,
                                  self.echo_first_token[prompt])
        return offsets.render(positions)

    def _tool_stream(self, index: int) -> ToolCallStream:
        return self._calls.setdefault(index, ToolCallStream(self.tools))

    def _keep_prompt_logprobs(self, out: Any) -> None:
        if out.prompt_logprobs is not None:
            self._prompt[out.index // self.n] = out.prompt_logprobs

    def _echoed(self, index: int) -> str:
        """The echoed prompt text that starts choice ``index`` ("" without echo)."""
        return "" if self.echo is None else self.echo[index // self.n]

    def _ndjson(self, outputs: list[Any], stream: Any) -> str:
        lines = []
        for i, out in enumerate(outputs):
            line: dict[str, Any] = {"text": out.text, "token_ids": list(out.token_ids)}
            if self.n > 1:
                line["index"] = out.index
                if out.finish_reason is not None:
                    line["finish_reason"] = out.finish_reason
            if self.logprobs and out.logprobs is not None:
                line["logprobs"] = logprobs_json.native(out.logprobs)
            if self.prompt_logprobs and out.prompt_logprobs is not None:
                line["prompt_logprobs"] = logprobs_json.native(out.prompt_logprobs)
            if i == len(outputs) - 1 and stream.finished:
                line["finish_reason"] = stream.finish_reason
                line["usage"] = usage(stream)
                if stream.error:
                    line["error"] = stream.error
            elif not (out.text or out.token_ids or "finish_reason" in line
                      or "prompt_logprobs" in line):
                continue
            lines.append(json.dumps(line) + "\n")
        return "".join(lines)

    def _openai_head(self, kind: str) -> dict[str, Any]:
        if self.api == "chat":
            obj = "chat.completion.chunk" if kind == "chunk" else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}

    def _openai_delta(self, index: int, text: str, finish_reason: str | None,
                      positions: list[Any],
                      tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        first = index not in self._started
        self._started.add(index)
        logprobs = self._openai_logprobs(index, positions) if finish_reason is None else None
        choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason,
                                  "logprobs": logprobs}
        if self.api == "chat":
            delta: dict[str, Any] = {}
            if text or (finish_reason is None and not tool_calls):
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta
        else:
            choice["text"] = self._echoed(index) + text if first else text
        return self._openai_head("chunk") | {"choices": [choice]}

    @staticmethod
    def _sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"
