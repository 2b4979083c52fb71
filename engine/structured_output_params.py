"""StructuredOutputsParams: what a request's output must match, by vLLM's names, checked on arrival.

Exactly one of ``json`` (a JSON schema), ``json_object``, ``regex``, ``choice`` or ``grammar``
(xgrammar's EBNF). Checking parses the grammar with xgrammar, which takes well under a
millisecond and needs no tokenizer; compiling it against the vocabulary (the slow part) happens
later, off the step thread, in engine/structured_output.py. JSON is generated compact (one line,
xgrammar's ``any_whitespace=False``) so a model cannot spend its tokens on whitespace.
"""
import json
import re
from functools import lru_cache
from typing import Any

import jsonschema
import xgrammar as xgr
from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# xgrammar's C++ errors start with "[time] file.cc:line: " and sometimes "Check failed: ...: ".
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: .*? is false: )?")


class StructuredOutputsParams(BaseModel):
    """One constraint on a request's output; invalid values raise a ValidationError naming it."""
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True,
                              serialize_by_alias=True)

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from exc
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("a JSON schema must be an object")
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"invalid JSON schema: {exc.message}") from exc
        parse("json", json.dumps(value))
        return value

    @field_validator("regex", "grammar")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse(info.field_name, value)
        return value

    @field_validator("choice")
    @classmethod
    def _choices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if any(not c for c in value):
                raise ValueError("choices must be non-empty strings")
            parse("grammar", choice_ebnf(value))
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputsParams":
        given = [k for k, v in zip(KINDS, (self.json_schema, self.json_object or None,
                                           self.regex, self.choice, self.grammar))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        return self

    def key(self) -> tuple[str, str]:
        """(kind, text) naming the grammar: equal keys compile to the same grammar."""
        if self.json_schema is not None:
            return "json", json.dumps(self.json_schema)
        if self.json_object:
            return "json", '{"type": "object"}'
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "grammar", choice_ebnf(self.choice)
        return "grammar", self.grammar


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF root matching exactly one of ``choices`` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


@lru_cache(maxsize=256)
def parse(kind: str, text: str) -> xgr.Grammar:
    """The xgrammar Grammar of one (kind, text) key; ValueError with xgrammar's reason."""
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(text, any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        return xgr.Grammar.from_ebnf(text)
    except RuntimeError as exc:
        reason = _CPP_PREFIX.sub("", str(exc).strip())
        raise ValueError(f"invalid {'JSON schema' if kind == 'json' else kind}: {reason}") \
            from None
