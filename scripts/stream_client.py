"""A small streaming client: prints an LLM's tokens as they arrive from the server.

Speaks the native NDJSON stream (``POST /predictions/llm`` with ``"stream": true``) or, with
``--api completions`` / ``--api chat``, the OpenAI streams (``data: {...}`` events) of
``/1.0/v1/completions`` and ``/1.0/v1/chat/completions`` (the prompt is then the user's
message). Reads the inference key from TorchServe's key_file.json unless ``--key`` is given.

    python scripts/stream_client.py --api chat --prompt "What is the capital of France?"
    python scripts/stream_client.py --prompt "Once upon a time" --max-tokens 64
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
from typing import Any, TextIO

import requests

DEFAULT_KEY_FILE = Path(__file__).resolve().parents[1] / "logs" / "server" / "key_file.json"
ROUTES = {"generate": "", "completions": "/1.0/v1/completions",
          "chat": "/1.0/v1/chat/completions"}


def _event_text(event: dict) -> str:
    return "".join(c.get("text") or (c.get("delta") or {}).get("content") or ""
                   for c in event.get("choices", []))


def stream(url: str, prompt: str, key: str | None = None, max_tokens: int = 64,
           temperature: float = 0.0, api: str = "generate", out: TextIO = sys.stdout) -> dict:
    """Send one streaming request to the model at ``url`` (``.../predictions/llm``) on ``api``,
    write each text delta to ``out`` at once; return the last event."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                            "stream": True}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if api != "generate":
        body["model"] = url.rstrip("/").split("/predictions/")[-1].split("/")[0]
        body["stream_options"] = {"include_usage": True}
    last: dict = {}
    finish = None
    url = url.rstrip("/") + ROUTES[api]
    with requests.post(url, json=body, headers=headers, stream=True, timeout=300) as reply:
        if not reply.ok:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text}")
        out.write(f"user: {prompt}\nassistant: " if api == "chat" else prompt)
        for line in reply.iter_lines(chunk_size=None, decode_unicode=True):
            if not line:
                continue
            if api != "generate":
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                text = _event_text(event)
            else:
                event = json.loads(line)
                text = event.get("text", "")
            out.write(text)
            out.flush()
            finish = event.get("finish_reason") or next(
                (c["finish_reason"] for c in event.get("choices", []) if c.get("finish_reason")),
                finish)
            last = event
    out.write("\n")
    if last.get("usage"):
        out.write(f"[{finish} {json.dumps(last['usage'])}]\n")
    return last


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/predictions/llm")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--api", choices=sorted(ROUTES), default="generate",
                        help="native NDJSON route, or an OpenAI route (server-sent events)")
    parser.add_argument("--key", default=None, help="inference key (default: key_file.json)")
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE)
    args = parser.parse_args(argv)
    key = args.key
    if key is None and args.key_file.exists():
        key = json.loads(args.key_file.read_text())["inference"]["key"]
    stream(args.url, args.prompt, key, args.max_tokens, args.temperature, args.api)


if __name__ == "__main__":
    main()
