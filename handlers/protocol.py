"""Request parsing: TorchServe's request dict -> a validated ParsedRequest, or a RequestError.

Routes come from TorchServe's extra URL path segments, which the 0.12 frontend hands to the
worker as the ``url_path`` request header (``/predictions/<model>/<version>/v1/completions``
gives ``v1/completions``; no extra segments give ""). Bodies are validated with pydantic; a
violation is a 400 whose message names the field. Nothing here touches the engine's state.
"""
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationError)

from engine import SamplingParams
from engine.logprobs import MAX_LOGPROBS
from engine.structured_output_params import StructuredOutputsParams
from handlers.tool_calls import (ToolError, Tools, hermes_turns, history_turn, parse_tools,
                                 renders_tools)

Api = Literal["generate", "completions", "chat", "models", "stats", "tokenize", "detokenize"]
ROUTES: dict[str, Api] = {"": "generate", "generate": "generate", "v1/completions": "completions",
                          "v1/chat/completions": "chat", "v1/models": "models", "stats": "stats",
                          "tokenize": "tokenize", "detokenize": "detokenize"}
ANSWERED_AT_ONCE = ("models", "stats", "tokenize", "detokenize")    # never reach the engine
PROMPT_SHAPES = ("must be a non-empty string or list of token ids (completions: also a list of "
                 "them)")
_TYPE_TAG = re.compile(r"(str|int|float|bool|list\[.*\]|dict\[.*\])")
OPENAI_IGNORED = ("model", "user", "stream_options", "max_completion_tokens", "messages",
                  "prompt", "stream")
# OpenAI options we do not implement: refused (400) unless left at their no-op values. A route
# that implements one declares it as a field of its body (so it never reaches this check):
# completions take echo, logprobs, best_of; chat takes logprobs, top_logprobs and the tools.
OPENAI_UNSUPPORTED = ("echo", "logprobs", "top_logprobs", "suffix", "best_of",
                      "tools", "tool_choice", "parallel_tool_calls")


class RequestError(Exception):
    """A client error: HTTP status, message, and the offending field (if any)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


Prompt = str | list[int]


@dataclass
class ParsedRequest:
    api: Api
    prompts: list[Prompt] = field(default_factory=list)   # completions may carry many
    params: SamplingParams | None = None
    stream: bool = False
    include_usage: bool = False
    request_timeout_s: Any = None     # the request's own deadline; handlers/limits.py checks it
    echo: list[str] | None = None          # completions with echo: each prompt's text
    echo_first_token: list[str] = field(default_factory=list)   # and its first token's
    tools: Tools | None = None             # chat with tools (handlers/tool_calls.py)
    reply: dict[str, Any] | None = None    # tokenize / detokenize: the answer's body


class GenerateBody(BaseModel):
    """Native route: prompt, stream, and SamplingParams' fields by vLLM's names."""
    model_config = ConfigDict(extra="allow")
    prompt: StrictStr | list[StrictInt]
    stream: StrictBool = False


class StaticGenerateBody(BaseModel):
    """The static-batching LLM baseline's body (handlers/static_llm.py)."""
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr | list[StrictInt] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    ignore_eos: StrictBool = False


class ClassifyBody(BaseModel):
    """The text classifier's body (handlers/text_classifier.py)."""
    model_config = ConfigDict(extra="forbid")
    text: StrictStr


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1)
    best_of: StrictInt | None = Field(None, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    stream_options: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None      # an assistant turn's calls
    tool_call_id: StrictStr | None = None               # a tool turn's answer to one

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(str(part.get("text", "")) for part in self.content
                       if part.get("type") == "text")

    def turn(self) -> dict[str, Any]:
        extra = {k: v for k in ("name", "tool_calls", "tool_call_id")
                 if (v := getattr(self, k)) is not None}
        return {"role": self.role, "content": self.text()} | extra


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = None
    stream_options: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered as the chat route does."""
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None
    add_special_tokens: StrictBool | None = None     # default: what the serving routes do
    return_token_strs: StrictBool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: list[StrictInt]


def field_error(exc: ValidationError) -> RequestError:
    """The first pydantic error as a message naming its field."""
    err = exc.errors()[0]
    # drop pydantic's union-member tags ("str", "list[int]") so the name is the field's own
    parts = [str(p) for p in err.get("loc", ()) if not _TYPE_TAG.fullmatch(str(p))]
    loc = ".".join(parts)
    message = err.get("msg", "invalid value")
    if not parts:       # a check across fields: its message starts with the field it blames
        message = message.removeprefix("Value error, ")
        named = re.match(r"(\w+)\b", message)
        if named and named.group(1) in SamplingParams.model_fields:
            parts, loc = [named.group(1)], named.group(1)
            message = message[len(loc):].lstrip(": ")
    if parts[:1] == ["prompt"]:
        loc, message = "prompt", PROMPT_SHAPES
    if err.get("type") == "extra_forbidden":
        message = "unknown field"
    return RequestError(f"{loc}: {message}" if loc else message, param=loc or None)


def decode_body(request: dict[str, Any]) -> dict[str, Any]:
    """The JSON object of a request; TorchServe pre-parses application/json bodies."""
    body = request.get("body")
    if body is None:
        body = request.get("data")
    if body is None:
        raise RequestError("request body must be a JSON object sent with "
                           "Content-Type: application/json")
    if isinstance(body, (bytes, bytearray)):    # TorchServe forwards what it could not decode
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"request body is not valid UTF-8: {exc}") from exc
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as exc:
            raise RequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def sampling_params(fields: dict[str, Any], default_max_tokens: int,
                    max_tokens_limit: int | None) -> SamplingParams:
    fields = dict(fields)
    if fields.get("max_tokens") is None:
        fields["max_tokens"] = default_max_tokens
    try:
        params = SamplingParams(**fields)
    except ValidationError as exc:
        raise field_error(exc) from exc
    if max_tokens_limit is not None and params.max_tokens > max_tokens_limit:
        raise RequestError(f"max_tokens: must be <= {max_tokens_limit} on this server",
                           param="max_tokens")
    return params


def chat_prompt(tokenizer: Any, messages: list[ChatMessage], tools: Tools | None = None) -> Prompt:
    """The chat route's prompt: a template's text as token ids, none added (its special tokens
    are in the text, as transformers' ``apply_chat_template(tokenize=True)`` has it); the
    plain layout as text (tokenized as any text prompt)."""
    text = chat_text(tokenizer, messages, tools)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(text, add_special_tokens=False)
    return text


def chat_text(tokenizer: Any, messages: list[ChatMessage], tools: Tools | None = None) -> str:
    """The tokenizer's chat template; a plain "role: text" layout if it has none. Tools, tool
    calls and tool results go to a template that renders tools, else are written out in the
    hermes format (handlers/tool_calls.py)."""
    turns = [history_turn(m.turn(), f"messages[{i}]") for i, m in enumerate(messages)]
    template = getattr(tokenizer, "chat_template", None)
    if template and renders_tools(tokenizer):
        return tokenizer.apply_chat_template(turns, tools=tools and tools.template_tools(),
                                             tokenize=False, add_generation_prompt=True)
    turns = hermes_turns(turns, tools)
    if template:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


def openai_choices(api: Api, parsed: BaseModel, extra: dict[str, Any]) -> None:
    """Map the routes' n / best_of / logprobs / echo onto SamplingParams' fields in ``extra``."""
    extra["n"] = parsed.n
    if api == "chat":
        if parsed.top_logprobs is not None and not parsed.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true", param="top_logprobs")
        if parsed.logprobs:
            extra["logprobs"] = parsed.top_logprobs or 0
        return
    if parsed.best_of is not None:
        extra["best_of"] = parsed.best_of
    extra["logprobs"] = parsed.logprobs
    if parsed.echo:
        extra["prompt_logprobs"] = parsed.logprobs
    if extra.get("max_tokens") == 0:
        if not parsed.echo:
            raise RequestError("max_tokens: 0 only scores the prompt; it needs echo: true",
                               param="max_tokens")
        extra["prompt_logprobs"] = parsed.logprobs or 0


def echo_texts(tokenizer: Any, prompt: Prompt) -> tuple[str, str]:
    """The echoed prompt's text and the text of its first token."""
    ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt, add_special_tokens=True)
    text = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=True)
    return text, tokenizer.decode(ids[:1], skip_special_tokens=False) if ids else ""


def parse_request(request: dict[str, Any], url_path: str, tokenizer: Any,
                  default_max_tokens: int = 16,
                  max_tokens_limit: int | None = None,
                  max_choices: int | None = None) -> ParsedRequest:
    api = ROUTES.get(url_path.strip("/"))
    if api is None:
        raise RequestError(f"unknown route {url_path!r}; use /v1/completions, "
                           f"/v1/chat/completions, /v1/models, /tokenize, /detokenize or no "
                           f"extra path", status=404)
    if api in ("models", "stats"):
        return ParsedRequest(api=api)
    body = decode_body(request)
    if api in ("tokenize", "detokenize"):
        return ParsedRequest(api=api, reply=tokenizer_reply(api, body, tokenizer))
    tools = None
    try:
        if api == "generate":
            parsed = GenerateBody.model_validate(body)
            extra, prompts = dict(parsed.model_extra or {}), [parsed.prompt]
        elif api == "completions":
            parsed = CompletionBody.model_validate(body)
            extra, prompts = dict(parsed.model_extra or {}), completion_prompts(parsed.prompt)
        else:
            parsed = ChatBody.model_validate(body)
            extra = dict(parsed.model_extra or {})
            if parsed.max_completion_tokens is not None:
                extra["max_tokens"] = parsed.max_completion_tokens
            tools = parse_tools(parsed.tools, parsed.tool_choice, parsed.parallel_tool_calls)
            prompts = [chat_prompt(tokenizer, parsed.messages, tools)]
    except ValidationError as exc:
        raise field_error(exc) from exc
    except ToolError as exc:
        raise RequestError(str(exc), param=exc.param) from exc
    for i, prompt in enumerate(prompts):
        if not prompt:
            where = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
            raise RequestError(f"{where}: must not be empty", param="prompt")
    for key in OPENAI_IGNORED if api != "generate" else ():
        extra.pop(key, None)
    if api != "generate" and "response_format" in extra:
        extra["structured_outputs"] = response_format(extra.pop("response_format"),
                                                      extra.get("structured_outputs"))
    if tools is not None and (forced := tools.constraint()) is not None:
        if extra.get("structured_outputs") is not None:
            raise RequestError("tool_choice: a required or named tool call fixes the output's "
                               "format; drop response_format / structured_outputs",
                               param="tool_choice")
        extra["structured_outputs"] = forced
    for key in OPENAI_UNSUPPORTED if api != "generate" else ():
        value = extra.pop(key, None)
        if value not in (None, False, {}, []) and not (key == "best_of" and value == 1):
            raise RequestError(f"{key}: not supported by this server", param=key)
    timeout_s = extra.pop("request_timeout_s", None)
    if api != "generate":
        openai_choices(api, parsed, extra)
    params = sampling_params(extra, default_max_tokens, max_tokens_limit)
    if max_choices is not None and params.num_children > max_choices:
        field = "best_of" if params.best_of else "n"
        raise RequestError(f"{field}: must be <= {max_choices} on this server (max_num_seqs)",
                           param=field)
    if parsed.stream and params.num_children > params.n:
        raise RequestError("best_of: must equal n when streaming (the best choices are known "
                           "only at the end)", param="best_of")
    options = getattr(parsed, "stream_options", None) or {}
    echo, first = None, []
    if getattr(parsed, "echo", False):
        echo, first = map(list, zip(*(echo_texts(tokenizer, p) for p in prompts)))
    return ParsedRequest(api=api, prompts=prompts, params=params, stream=parsed.stream,
                         include_usage=bool(options.get("include_usage")),
                         request_timeout_s=timeout_s, echo=echo, echo_first_token=first,
                         tools=tools)


def tokenizer_reply(api: Api, body: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """The body of a /tokenize or /detokenize answer (vLLM's shapes, less max_model_len)."""
    try:
        if api == "detokenize":
            ids = DetokenizeBody.model_validate(body).tokens
            bad = [t for t in ids if not 0 <= t < len(tokenizer)]
            if bad:
                raise RequestError(f"tokens: ids must be in [0, {len(tokenizer)}); got {bad[:3]}",
                                   param="tokens")
            return {"prompt": tokenizer.decode(ids)}
        parsed = TokenizeBody.model_validate(body)
        if (parsed.prompt is None) == (parsed.messages is None):
            raise RequestError("prompt: give prompt or messages", param="prompt")
        text, templated = parsed.prompt, False
        if parsed.messages is not None:
            tools = parse_tools(parsed.tools, None, None)
            text = chat_text(tokenizer, parsed.messages, tools)
            templated = bool(getattr(tokenizer, "chat_template", None))
    except ValidationError as exc:
        raise field_error(exc) from exc
    except ToolError as exc:
        raise RequestError(str(exc), param=exc.param) from exc
    special = not templated if parsed.add_special_tokens is None else parsed.add_special_tokens
    ids = tokenizer.encode(text, add_special_tokens=special)
    strs = tokenizer.convert_ids_to_tokens(ids) if parsed.return_token_strs else None
    return {"count": len(ids), "tokens": ids, "token_strs": strs}


def completion_prompts(prompt: Prompt | list[str] | list[list[int]]) -> list[Prompt]:
    """The prompts of a completions body: a list of strings or of token-id lists is many."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return list(prompt)
    return [prompt]


def response_format(value: Any, structured_outputs: Any) -> Any:
    """OpenAI's ``response_format`` as the engine's ``structured_outputs``: ``{"type": "text"}``
    constrains nothing, ``json_object`` asks for a JSON object, ``json_schema`` for
    ``json_schema.schema``; None leaves ``structured_outputs`` as it was. Errors name the part
    of ``response_format`` that is wrong."""
    def bad(where: str, message: str) -> RequestError:
        return RequestError(f"{where}: {message}", param=where)
    if value is None:
        return structured_outputs
    if structured_outputs is not None:
        raise bad("response_format", "give response_format or structured_outputs, not both")
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise bad("response_format.type", "must be text, json_object or json_schema")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise bad("response_format.json_schema.schema", "must be a JSON schema object")
    try:
        return StructuredOutputsParams(json=spec["schema"])
    except ValidationError as exc:
        raise bad("response_format.json_schema.schema", exc.errors()[0]["msg"]) from exc
