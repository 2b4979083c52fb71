"""The numbers every benchmark reports, computed one way for every system compared.

Owns the per-system record (``SystemResult``: wall time, tokens, per-token timestamps, batch and
KV-cache samples, preemptions), the latency statistics derived from timestamps (TTFT, TPOT
excluding the first token, ITL, end-to-end; mean/p50/p99 in ms), the printed table and the
``--json`` report file. It never runs a model: benchmarks fill a ``SystemResult`` and hand it
here.
"""
import json
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class SystemResult:
    """One system's run. ``token_times_s[i]``: when request i's tokens came out, from start."""
    name: str
    wall_s: float
    num_requests: int
    output_tokens: int
    tokens_per_request: list[int] | None = None      # None where requests are not tracked
    token_times_s: list[list[float]] | None = None
    peak_batch: int | None = None
    kv_usage: list[float] = field(default_factory=list)   # blocks used / pool, per step
    kv_fill: list[float] = field(default_factory=list)    # tokens stored / slots held, per step
    preemptions: int | None = None
    first_tokens: list[list[int]] = field(default_factory=list)   # for token-for-token checks
    peak_rss_gib: float = 0.0
    note: str = ""

    def summary(self) -> dict:
        s = dict(wall_s=self.wall_s, output_tokens=self.output_tokens,
                 tok_s=self.output_tokens / self.wall_s, req_s=self.num_requests / self.wall_s,
                 peak_batch=self.peak_batch, kv_usage_mean=_mean(self.kv_usage),
                 kv_usage_peak=max(self.kv_usage, default=None), kv_fill_mean=_mean(self.kv_fill),
                 preemptions=self.preemptions, peak_rss_gib=self.peak_rss_gib, note=self.note,
                 tokens_per_request=self.tokens_per_request)
        if self.token_times_s is not None:
            s.update(latency_summary(self.token_times_s))
        return s


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def latency_summary(token_times_s: list[list[float]]) -> dict:
    """TTFT, TPOT (excluding the first token), ITL and e2e: mean/p50/p99 in milliseconds."""
    ttft = [t[0] for t in token_times_s if t]
    e2e = [t[-1] for t in token_times_s if t]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in token_times_s if len(t) > 1]
    itl = [b - a for t in token_times_s for a, b in zip(t, t[1:])]
    out = {}
    for name, xs in dict(ttft=ttft, tpot=tpot, itl=itl, e2e=e2e).items():
        ms = np.asarray(xs) * 1e3
        out[f"{name}_ms"] = (dict(mean=float(ms.mean()), p50=float(np.percentile(ms, 50)),
                                  p99=float(np.percentile(ms, 99))) if len(ms) else None)
    return out


def peak_rss_gib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def agreement(a: list[list[int]], b: list[list[int]]) -> list[str]:
    """Per request: "same", or the index where the two greedy outputs first differ."""
    out = []
    for x, y in zip(a, b):
        diff = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        out.append("same" if diff is None and len(x) == len(y)
                   else f"differ@{min(len(x), len(y)) if diff is None else diff}")
    return out


def print_table(summaries: dict[str, dict], ratios: dict[str, float]) -> None:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    rows = [("tok/s", "tok_s"), ("req/s", "req_s"), ("wall s", "wall_s"),
            ("output tokens", "output_tokens")]
    for m in ("ttft", "tpot", "itl", "e2e"):
        rows += [(f"{m} ms {q}", (f"{m}_ms", q)) for q in ("mean", "p50", "p99")]
    rows += [("peak batch", "peak_batch"), ("KV usage mean", "kv_usage_mean"),
             ("KV usage peak", "kv_usage_peak"), ("KV fill mean", "kv_fill_mean"),
             ("preemptions", "preemptions"), ("peak RSS GiB", "peak_rss_gib")]
    print(f"\n{'':16}" + "".join(f"{n:>12}" for n in summaries))
    for label, key in rows:
        vals = [s.get(key) if isinstance(key, str) else (s.get(key[0]) or {}).get(key[1])
                for s in summaries.values()]
        print(f"{label:16}" + "".join(f"{cell(v):>12}" for v in vals))
    for name, s in summaries.items():
        if s["note"]:
            print(f"{name}: {s['note']}")
    for name, value in ratios.items():
        print(f"{name:28} {value:.2f}x")


def machine() -> dict:
    """CPU model, cores, load average and date, for the results page."""
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return dict(cpu=cpu, cores=os.cpu_count(), load_avg=os.getloadavg(),
                date=time.strftime("%Y-%m-%d %H:%M %Z"))


def write_report(path: Path | None, report: dict) -> None:
    """A benchmark's ``--json`` report (nothing when no path was given)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
