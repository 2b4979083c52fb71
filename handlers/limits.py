"""Limits: what a request may ask of this server beyond its schema (handler: settings).

Stop strings are checked against the engine every token, so their count and length are
capped (``max_stop_strings``, ``max_stop_chars``); a prompt array may hold at most
``max_prompts`` prompts, and a request at most ``max_request_tokens`` tokens (its prompts'
tokens plus ``max_tokens`` for every choice of every prompt); every request has a deadline,
``request_timeout_s`` from the settings unless the request asks for less with a field of the
same name. A violation is a 400 naming the field and the limit. Nothing here touches the
engine.
"""
from typing import Any

from handlers.protocol import ParsedRequest, RequestError
from handlers.settings import HandlerSettings


def enforce(parsed: ParsedRequest, settings: HandlerSettings, tokenizer: Any) -> float:
    """Check ``parsed`` against the server's limits; returns its deadline, in seconds.
    Text prompts are tokenized here, once: ``parsed.prompts`` holds token ids afterwards."""
    prompts = parsed.prompts
    if len(prompts) > settings.max_prompts:
        raise RequestError(f"prompt: at most {settings.max_prompts} prompts per request on this "
                           f"server (max_prompts), got {len(prompts)}", param="prompt")
    parsed.prompts = [tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else p
                      for p in prompts]
    params = parsed.params
    total = (sum(map(len, parsed.prompts))
             + len(prompts) * params.num_children * (params.max_tokens or 0))
    if total > settings.max_request_tokens:
        raise RequestError(f"prompt: the request's prompt tokens plus max_tokens for each of its "
                           f"{len(prompts) * params.num_children} choices come to {total}; "
                           f"this server allows {settings.max_request_tokens} "
                           f"(max_request_tokens)", param="prompt")
    stop = params.stop
    if len(stop) > settings.max_stop_strings:
        raise RequestError(f"stop: at most {settings.max_stop_strings} stop strings on this "
                           f"server, got {len(stop)}", param="stop")
    longest = max(map(len, stop), default=0)
    if longest > settings.max_stop_chars:
        raise RequestError(f"stop: a stop string may have at most {settings.max_stop_chars} "
                           f"characters on this server, got one of {longest}", param="stop")
    return timeout(parsed.request_timeout_s, settings.request_timeout_s)


def timeout(asked: object, limit_s: float) -> float:
    """The request's ``request_timeout_s`` (a number in (0, limit_s]), else ``limit_s``."""
    if asked is None:
        return limit_s
    if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not asked > 0:
        raise RequestError("request_timeout_s: must be a positive number of seconds",
                           param="request_timeout_s")
    if asked > limit_s:
        raise RequestError(f"request_timeout_s: must be <= {limit_s:g} on this server",
                           param="request_timeout_s")
    return float(asked)
