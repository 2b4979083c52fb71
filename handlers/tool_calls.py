"""Tool calling on the chat route: OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

``parse_tools`` checks a request's tools (each function's ``parameters`` must be a JSON schema
xgrammar can enforce) and its choice: ``none`` drops the tools, ``auto`` lets the model choose,
``required`` and a named function are enforced by a grammar (engine/structured_output.py): a
named function's output is its arguments object, ``required``'s a JSON array of
``{"name", "arguments"}`` calls (one at most without parallel calls). Under ``auto`` the output
is read in the tool-call formats of the model families: hermes-style
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks (ChatML models: Qwen2, Qwen3,
SmolLM2) and Llama 3's bare ``{"name": ..., "parameters": ...}`` JSON (after an optional
``<|python_tag|>``, several joined by ``;``); only calls of a function in ``tools`` count.

Prompts: a chat template that renders tools gets them (``apply_chat_template(tools=...)``) with
the history's ``tool_calls`` and ``tool`` messages as they are; one that does not (it never
mentions ``tools``) gets them in the hermes format, as a system message listing the tools,
assistant turns with ``<tool_call>`` blocks and ``tool`` results as ``<tool_response>`` turns.
``ToolCallStream`` turns one streamed choice's text into content and OpenAI tool-call deltas.
"""
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from engine.structured_output_params import StructuredOutputsParams

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
HERMES_SYSTEM = ("You are a function calling AI model. You may call one or more functions to "
                 "assist with the user query. Here are the available tools: <tools>{tools}</tools>"
                 "\nFor each function call return a JSON object with the function name and its "
                 "arguments within <tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": "
                 "<function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


class ToolError(ValueError):
    """A bad tool field: ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


@dataclass
class Tools:
    """A request's tools and how it may call them: ``choice`` is auto, required or named."""
    specs: list[ToolSpec]
    choice: Literal["auto", "required", "named"]
    parallel: bool = True
    named: str | None = None
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)   # parameters, by name

    def template_tools(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.specs]

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar ``required`` and a named function impose on the output."""
        if self.choice == "named":
            return StructuredOutputsParams(json=self.schemas[self.named])
        if self.choice == "auto":
            return None
        calls = {"anyOf": [{"type": "object", "properties": {
            "name": {"const": name}, "arguments": schema}, "required": ["name", "arguments"]}
            for name, schema in self.schemas.items()]}
        array = {"type": "array", "items": calls, "minItems": 1}
        return StructuredOutputsParams(json=array | ({} if self.parallel else {"maxItems": 1}))

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """A finished choice's (content, tool calls); (text, []) if it holds no valid call."""
        if self.choice == "named":
            calls = [(self.named, text)] if _object(text) is not None else []
            return (None, [_call(n, a) for n, a in calls]) if calls else (text, [])
        if self.choice == "required":
            try:
                found = json.loads(text)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(found, list) or not all(
                    isinstance(c, dict) and c.get("name") in self.schemas for c in found):
                return text, []
            return None, [_call(c["name"], c.get("arguments", {})) for c in found]
        content, calls = self._auto(text)
        if not calls:
            return text, []
        if not self.parallel:
            calls = calls[:1]
        return content, [_call(n, a) for n, a in calls]

    def _auto(self, text: str) -> tuple[str | None, list[tuple[str, Any]]]:
        start = text.find(OPEN)
        if start >= 0:
            blocks = [_object(m.group(1)) for m in _HERMES.finditer(text, start)]
            content = text[:start] if text[:start].strip() else None
        else:
            body = text.strip().removeprefix(PYTHON_TAG)
            blocks = [_object(part) for part in body.split(";")] if body.startswith("{") else []
            content = None
        calls = []
        for block in blocks:
            if block is None:
                return None, []
            name = block.get("name")
            args = block.get("arguments", block.get("parameters"))
            if name not in self.schemas or not isinstance(args, (dict, str)):
                return None, []
            calls.append((name, args))
        return content, calls


def _object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args}}


def parse_tools(tools: list[Any] | None, tool_choice: Any,
                parallel_tool_calls: bool | None) -> Tools | None:
    """The request's Tools, or None when it has none (or ``tool_choice: "none"``)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice", "needs tools")
        return None
    specs = []
    for i, tool in enumerate(tools):
        try:
            specs.append(ToolSpec.model_validate(tool))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in (f"tools[{i}]", *err.get("loc", ())))
            raise ToolError(where, err.get("msg", "invalid value")) from None
    schemas = {}
    for i, spec in enumerate(specs):
        schema = spec.function.parameters or NO_PARAMETERS
        try:
            StructuredOutputsParams(json=schema)
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ToolError(f"tools[{i}].function.parameters", message) from None
        if spec.function.name in schemas:
            raise ToolError(f"tools[{i}].function.name", f"{spec.function.name!r} is given twice")
        schemas[spec.function.name] = schema
    parallel = parallel_tool_calls is not False
    if tool_choice in (None, "auto"):
        return Tools(specs, "auto", parallel, schemas=schemas)
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return Tools(specs, "required", parallel, schemas=schemas)
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) \
        else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" \
            or not isinstance(name, str):
        raise ToolError("tool_choice", 'must be "auto", "none", "required" or {"type": '
                                       '"function", "function": {"name": ...}}')
    if name not in schemas:
        raise ToolError("tool_choice", f"function {name!r} is not in tools")
    return Tools(specs, "named", parallel, name, schemas)


def history_turn(message: dict[str, Any], where: str) -> dict[str, Any]:
    """A history message for the chat template: its tool calls' arguments as objects (what
    templates expect; OpenAI sends JSON text)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    turned = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(f"{where}.tool_calls[{j}].function", "needs a name")
        args = function.get("arguments", {})
        args = _object(args) if isinstance(args, str) else args
        if not isinstance(args, dict):
            raise ToolError(f"{where}.tool_calls[{j}].function.arguments",
                            "must be a JSON object (or its text)")
        turned.append({"id": call.get("id"), "type": "function",
                       "function": {"name": function["name"], "arguments": args}})
    return message | {"tool_calls": turned}


def renders_tools(tokenizer: Any) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def hermes_turns(turns: list[dict[str, Any]], tools: Tools | None) -> list[dict[str, Any]]:
    """The conversation with tools, tool calls and tool results written out in the hermes
    format, for a chat template that does not render them itself."""
    out = []
    for turn in turns:
        if turn.get("tool_calls"):
            blocks = "".join(f"{OPEN}\n{json.dumps(c['function'], ensure_ascii=False)}\n{CLOSE}"
                             for c in turn["tool_calls"])
            out.append({"role": turn["role"], "content": (turn["content"] or "") + blocks})
        elif turn["role"] == "tool":
            out.append({"role": "user",
                        "content": f"<tool_response>\n{turn['content']}\n</tool_response>"})
        else:
            out.append({"role": turn["role"], "content": turn["content"]})
    if tools is not None:
        listing = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools.template_tools())
        system = HERMES_SYSTEM.format(tools=listing + "\n")
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


class ToolCallStream:
    """One streamed choice under tools: ``feed`` each text delta, ``finish`` at its end; both
    return (content delta, tool-call deltas in OpenAI's shape)."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0             # characters of ``text`` sent as content
        self.call_id: str | None = None     # a named function's call, once opened
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        self.text += delta
        if self.tools.choice == "named":        # the whole output is the arguments
            call: dict[str, Any] = {"index": 0, "function": {"arguments": delta}}
            if self.call_id is None:
                self.call_id = f"call_{uuid.uuid4().hex[:24]}"
                self.num_calls = 1
                call |= {"id": self.call_id, "type": "function"}
                call["function"] = {"name": self.tools.named, "arguments": delta}
            return "", [call] if delta or "id" in call else []
        if self.tools.choice == "required":
            return "", []
        end = self._content_end()
        content, self.sent = self.text[self.sent:end], max(self.sent, end)
        return content, []

    def _content_end(self) -> int:
        """How much of the text is surely content: all before a (possible) tool call."""
        head = self.text.lstrip()
        if head[:1] == "{" or (head and PYTHON_TAG.startswith(head[:len(PYTHON_TAG)])):
            return self.sent                    # may be a bare JSON call: hold it
        start = self.text.find(OPEN)
        if start >= 0:
            return start
        for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1):
            if OPEN.startswith(self.text[-k:]):
                return len(self.text) - k
        return len(self.text)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        if self.tools.choice == "named":
            return "", []
        content, calls = self.tools.parse(self.text)
        if not calls:
            rest, self.sent = self.text[self.sent:], len(self.text)
            return rest, []
        rest = (content or "")[self.sent:]
        self.num_calls = len(calls)
        return rest, [{"index": i} | call for i, call in enumerate(calls)]
