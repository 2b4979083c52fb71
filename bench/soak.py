"""Soak: many streaming requests against the served LLM, as a careless or hostile crowd sends
them, then a check that the server is back to empty.

N requests at concurrency C on loopback: a share are malformed (each must get a 4xx), the rest
stream greedy or sampled answers with ``ignore_eos`` (so each has an exact expected length),
and a share of those hang up after a random number of lines. After the last request it waits
for the engine to go idle and reports completed, exact-length, disconnected, 4xx, 5xx, other
failures and the KV blocks still held. Bounded in count and in time; it starts its own
TorchServe (only the ``llm`` model) unless given the run directory of one already running.

    python bench/soak.py --size tiny --requests 5000 --concurrency 32
    python bench/soak.py --run-dir logs/server --requests 300     # a server already up
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `scripts.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import http.client
import json
import random
import socket
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import requests

from scripts.serve import Server, free_ports, running_server, start_server, stop_server

# Bodies the server must refuse with a 4xx; (label, raw body bytes).
MALFORMED = [
    ("not json", b"{not json"),
    ("not utf-8", b'{"prompt": "caf\xe9"}'),
    ("not an object", b"[1, 2, 3]"),
    ("empty prompt", b'{"prompt": ""}'),
    ("wrong type", b'{"prompt": "hi", "max_tokens": "many"}'),
    ("negative temperature", b'{"prompt": "hi", "temperature": -1}'),
    ("NaN", b'{"prompt": "hi", "top_p": NaN}'),
    ("unknown field", b'{"prompt": "hi", "max_token": 3}'),
    ("too many stops", json.dumps({"prompt": "hi", "stop": ["s"] * 1000}).encode()),
    ("long stop", json.dumps({"prompt": "hi", "stop": ["x" * 5000]}).encode()),
    ("deadline above the limit", b'{"prompt": "hi", "request_timeout_s": 1e9}'),
    ("max_tokens above the limit", b'{"prompt": "hi", "max_tokens": 100000000}'),
    ("out-of-vocab ids", b'{"prompt": [1, 2, 99999999]}'),
    ("over-long prompt", json.dumps({"prompt": "word " * 20000}).encode()),
]


@dataclass
class Outcome:
    kind: str                   # malformed, greedy, sampled
    status: int | None = None
    completed: bool = False     # the stream's last line carried finish_reason
    exact: bool = False         # ... with exactly max_tokens tokens
    disconnected: bool = False  # we hung up on purpose
    failure: str | None = None  # connection error, bad chunk, error in the last line


@dataclass
class Report:
    requests: int = 0
    not_sent: int = 0           # left out when the time limit ran out
    completed: int = 0
    exact_length: int = 0
    disconnected: int = 0
    status_4xx: int = 0
    status_5xx: int = 0
    malformed: int = 0
    malformed_4xx: int = 0
    greedy: int = 0
    sampled: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    blocks_held_after: int = -1
    streams_left_after: int = -1
    wall_s: float = 0.0


def one(server: Server, rng: random.Random, malformed_frac: float, disconnect_frac: float,
        max_tokens: tuple[int, int], read_timeout_s: float) -> Outcome:
    """Send one request on its own connection and classify what came back."""
    headers = server.headers() | {"Content-Type": "application/json"}
    if rng.random() < malformed_frac:
        out, body = Outcome("malformed"), rng.choice(MALFORMED)[1]
        want, hang_up_after = 0, None
    else:
        want = rng.randint(*max_tokens)
        sampled = rng.random() < 0.5
        params = {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(2**31)} if sampled \
            else {"temperature": 0}
        out = Outcome("sampled" if sampled else "greedy")
        body = json.dumps({"prompt": f"soak request {rng.randrange(10**6)}: tell me a story",
                           "max_tokens": want, "ignore_eos": True, "stream": True} | params
                          ).encode()
        hang_up_after = rng.randint(0, 4) if rng.random() < disconnect_frac else None
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["inference"],
                                      timeout=read_timeout_s)
    try:
        conn.request("POST", "/predictions/llm", body, headers)
        reply = conn.getresponse()
        out.status = reply.status
        if reply.status != 200:
            reply.read()
            return out
        tokens, last = 0, {}
        for n, line in enumerate(iter(reply.readline, b"")):
            if hang_up_after is not None and n >= hang_up_after:
                conn.sock.shutdown(socket.SHUT_RDWR)
                out.disconnected = True
                return out
            if line.strip():
                last = json.loads(line)
                tokens += len(last.get("token_ids", ()))
        out.completed = "finish_reason" in last
        if last.get("error"):
            out.failure = f"error in stream: {last['error'][:60]}"
        elif not out.completed:
            out.failure = "stream ended without finish_reason"
        out.exact = out.completed and not last.get("error") and tokens == want \
            and last["usage"]["completion_tokens"] == want
    except (OSError, http.client.HTTPException, ValueError) as exc:
        out.failure = type(exc).__name__
    finally:
        conn.close()
    return out


def engine_stats(server: Server) -> dict:
    return requests.get(f"{server.url()}/predictions/llm/1.0/stats", headers=server.headers(),
                        timeout=30).json()


def soak(server: Server, requests_n: int, concurrency: int, malformed_frac: float = 0.1,
         disconnect_frac: float = 0.3, max_tokens: tuple[int, int] = (4, 32),
         time_limit_s: float = 600, seed: int = 0, idle_timeout_s: float = 30) -> Report:
    """Run the soak against ``server``'s llm; returns the report (blocks measured once idle)."""
    start = time.monotonic()
    seeds = random.Random(seed)
    read_timeout_s = max(30.0, time_limit_s)

    def task(i: int, task_seed: int) -> Outcome | None:
        if time.monotonic() - start > time_limit_s:
            return None
        return one(server, random.Random(task_seed), malformed_frac, disconnect_frac,
                   max_tokens, read_timeout_s)

    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(task, range(requests_n),
                                 [seeds.randrange(2**31) for _ in range(requests_n)]))
    report = Report(requests=requests_n, wall_s=time.monotonic() - start)
    failures: Counter[str] = Counter()
    for out in outcomes:
        if out is None:
            report.not_sent += 1
            continue
        report.malformed += out.kind == "malformed"
        report.greedy += out.kind == "greedy"
        report.sampled += out.kind == "sampled"
        report.completed += out.completed
        report.exact_length += out.exact
        report.disconnected += out.disconnected
        if out.status is not None:
            report.status_4xx += 400 <= out.status < 500
            report.status_5xx += out.status >= 500
            report.malformed_4xx += out.kind == "malformed" and 400 <= out.status < 500
        if out.failure:
            failures[out.failure] += 1
    report.failures = dict(failures)
    deadline = time.monotonic() + idle_timeout_s      # leases (lease_s) free dropped streams
    while True:
        stats = engine_stats(server)
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0 \
            and stats["num_streams"] == 0 and stats["num_blocks_used"] == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    report.blocks_held_after = stats["num_blocks_used"]
    report.streams_left_after = stats["num_streams"]
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--malformed", type=float, default=0.1, help="share of malformed bodies")
    parser.add_argument("--disconnect", type=float, default=0.3,
                        help="share of well-formed streams the client hangs up on")
    parser.add_argument("--min-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-limit-s", type=float, default=900,
                        help="no request starts after this; reads time out after it too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=["tiny", "default"], default="tiny",
                        help="the generated LLM to serve when starting a server")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="serve this Hugging Face checkpoint instead")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="soak the server already running from this run directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    own = args.run_dir is None
    if own:
        from scripts.build_archives import build_all
        run_dir = Path(tempfile.mkdtemp(prefix="soak-"))
        build_all(args.size, out=run_dir / "archives", llm_path=args.model_path, names=("llm",))
        server = start_server(run_dir / "archives", ("llm",), run_dir / "server",
                              ports=free_ports())
    else:
        server = running_server(args.run_dir)
        if server is None:
            raise SystemExit(f"no server running from {args.run_dir}")
    try:
        report = soak(server, args.requests, args.concurrency, args.malformed, args.disconnect,
                      (args.min_tokens, args.max_tokens), args.time_limit_s, args.seed)
    finally:
        if own:
            stop_server(server.run_dir)
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
