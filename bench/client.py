"""HTTP load driver for the serving benchmark: sends a workload to one TorchServe model.

Owns how requests go on the wire and how their timing is observed: each request waits for its
arrival time on its own thread, then either streams NDJSON from the continuous-batching model
(one timestamp per token as its line arrives) or gets one whole JSON answer from the
static-batching model (every token stamped when the answer arrives). A ``StatsSampler`` polls
the engine's stats route during a run; ``cpu_seconds`` reads where the CPU time went. It
computes no statistics and starts no server. ``drive_streams`` keeps a fixed number of
streams busy instead (closed loop), with any sender, so peers with other protocols share it.
"""
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import requests
from tqdm import tqdm

from bench.workload import Request, make_workload

READ_TIMEOUT_S = 900


@dataclass
class RequestRecord:
    """One request as the client saw it; times are seconds."""
    request_id: str
    sent_s: float = 0.0                  # from the run's start
    done_s: float = 0.0                  # from the run's start
    token_times_s: list[float] = field(default_factory=list)   # per token, from sent_s
    prompt_tokens: int | None = None
    batch_size: int | None = None        # static model: size of the batch it ran in
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_times_s)


def body_for(request: Request, stream: bool) -> dict:
    """Greedy, output forced to exactly ``output_len`` tokens (ignore EOS)."""
    body = {"prompt": request.prompt_ids, "max_tokens": request.output_len,
            "temperature": 0.0, "ignore_eos": True}
    return body | {"stream": True} if stream else body


def send(url: str, headers: dict[str, str], request: Request, start: float,
         stream: bool) -> RequestRecord:
    """POST one request and stamp its tokens as they arrive.

    A streamed reply is NDJSON, one object per delta; a whole reply is a single JSON line
    holding every token. Either way each line's tokens are stamped when the line arrives.
    """
    rec = RequestRecord(request.request_id)
    t0 = time.perf_counter()
    rec.sent_s = t0 - start
    try:
        with requests.post(url, json=body_for(request, stream), headers=headers, stream=True,
                           timeout=(10, READ_TIMEOUT_S)) as reply:
            if reply.status_code != 200:
                rec.error = f"HTTP {reply.status_code}: {reply.text[:200]}"
            else:
                for line in reply.iter_lines(chunk_size=None):
                    if not line:
                        continue
                    now = time.perf_counter() - t0
                    obj = json.loads(line)
                    rec.token_times_s += [now] * len(obj.get("token_ids", ()))
                    if "error" in obj:
                        rec.error = str(obj["error"])
                    if "usage" in obj:
                        rec.prompt_tokens = obj["usage"]["prompt_tokens"]
                    rec.batch_size = obj.get("batch_size", rec.batch_size)
    except (requests.RequestException, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.done_s = time.perf_counter() - start
    return rec


def drive(url: str, headers: dict[str, str], workload: list[Request], stream: bool,
          desc: str = "") -> tuple[float, list[RequestRecord]]:
    """Send every request at its arrival time; returns (wall seconds, records in order)."""
    records: list[RequestRecord | None] = [None] * len(workload)

    def run(i: int, request: Request, start: float) -> int:
        delay = request.arrival_s - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        records[i] = send(url, headers, request, start, stream)
        return i

    with ThreadPoolExecutor(max_workers=len(workload)) as pool, \
            tqdm(total=len(workload), desc=desc, unit="req", leave=False) as bar:
        start = time.perf_counter()
        futures = [pool.submit(run, i, r, start) for i, r in enumerate(workload)]
        for future in as_completed(futures):
            future.result()
            bar.update(1)
        wall_s = time.perf_counter() - start
    return wall_s, records


def drive_streams(send_one: Callable[[Request, float], RequestRecord], workload: list[Request],
                  streams: int, desc: str = "") -> tuple[float, list[RequestRecord]]:
    """Closed loop: ``streams`` clients, each sending the next request once its last is done.

    ``send_one(request, start)`` sends one request and returns its record. Returns (wall
    seconds, records in workload order).
    """
    records: list[RequestRecord | None] = [None] * len(workload)
    queue = iter(range(len(workload)))
    lock = threading.Lock()

    def client(start: float, bar: tqdm) -> None:
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            records[i] = send_one(workload[i], start)
            bar.update(1)

    with ThreadPoolExecutor(max_workers=streams) as pool, \
            tqdm(total=len(workload), desc=desc, unit="req", leave=False) as bar:
        start = time.perf_counter()
        for future in [pool.submit(client, start, bar) for _ in range(streams)]:
            future.result()
        wall_s = time.perf_counter() - start
    return wall_s, records


def warm_up(base_url: str, headers: dict[str, str], vocab_size: int,
            models: tuple[str, ...] = ("llm", "llm_static"), count: int = 4) -> None:
    """A few short requests to each LLM, so first-call costs stay out of the numbers."""
    warm = make_workload(count, vocab_size, 64, seed=123, prompt_mean=8, output_mean=4)
    for model in models:
        drive(f"{base_url}/{model}", headers, warm, stream=model == "llm", desc=f"warm-up {model}")


class StatsSampler:
    """Polls ``GET <stats_url>`` every ``interval_s`` on a thread; ``samples`` gets each JSON."""

    def __init__(self, stats_url: str, headers: dict[str, str], interval_s: float = 0.2) -> None:
        self.stats_url, self.headers, self.interval_s = stats_url, headers, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> dict:
        reply = requests.get(self.stats_url, headers=self.headers, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def __enter__(self) -> "StatsSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.wait(self.interval_s):
                try:
                    reply = session.get(self.stats_url, headers=self.headers, timeout=30)
                    self.samples.append(reply.json())
                except (requests.RequestException, ValueError):
                    continue


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds so far (user + system) of TorchServe's frontend, its workers and this client."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"frontend": 0.0, "workers": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            fields = stat.read_text().rsplit(")", 1)[1].split()   # from field 3 (state) on
        except (OSError, ValueError):
            continue
        used = (int(fields[11]) + int(fields[12])) / tick
        if pid == server_pid:
            out["frontend"] += used
        elif int(fields[1]) == server_pid:
            out["workers"] += used
    times = os.times()
    out["client"] = times.user + times.system
    return out
