"""Reporting for the serving benchmark: the seed's table beside ours, the targets, the plots.

Owns how a finished benchmark report (the dict ``bench/serve.py`` writes as JSON) is
shown: the seed document's numbers next to ours with both ratios, which targets were met, and
the PNG plots (latency CDFs of the headline run; throughput and p99 latency against request
rate). It never sends a request or runs a model.
"""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# The seed document's claim: (continuous batching + paged attention, TorchServe static batching)
SEED = {"request throughput (req/s)": (215.0, 12.0), "p99 latency (s)": (2.1, 15.3),
        "KV-cache utilization (%)": (94.0, 62.0), "max concurrency (requests)": (256.0, 32.0)}
TARGETS = {"req/s ratio": 20.0, "served / in-process": 0.9, "KV utilization": 0.97}


def headline_rows(ours: dict, static: dict) -> dict[str, tuple[float, float]]:
    """Our numbers in the seed table's units, keyed like ``SEED``."""
    def p99_s(s: dict) -> float:
        return s["e2e_ms"]["p99"] / 1e3 if s.get("e2e_ms") else math.nan

    return {"request throughput (req/s)": (ours["req_s"], static["req_s"]),
            "p99 latency (s)": (p99_s(ours), p99_s(static)),
            "KV-cache utilization (%)": (100 * (ours["kv_fill_mean"] or math.nan),
                                         100 * (static["kv_fill_mean"] or math.nan)),
            "max concurrency (requests)": (float(ours["peak_batch"] or 0),
                                           float(static["peak_batch"] or 0))}


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def print_seed_table(rows: dict[str, tuple[float, float]]) -> None:
    head = (f"{'':28}{'seed CB':>10}{'seed static':>12}{'seed ratio':>11}"
            f"{'ours llm':>11}{'ours static':>12}{'our ratio':>11}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, (seed_cb, seed_static) in SEED.items():
        ours, static = rows[name]
        print(f"{name:28}{seed_cb:>10.3g}{seed_static:>12.3g}"
              f"{_ratio(seed_cb, seed_static):>10.2f}x{ours:>11.3g}{static:>12.3g}"
              f"{_ratio(ours, static):>10.2f}x")


def compare(summaries: dict[str, dict]) -> dict[str, float]:
    """The ratios printed under the table: ours over static, served over in-process."""
    llm, static = summaries["llm"], summaries["llm_static"]
    ratios = {"llm / llm_static req/s": _ratio(llm["req_s"], static["req_s"]),
              "llm_static / llm p99 e2e": _ratio(static["e2e_ms"]["p99"], llm["e2e_ms"]["p99"])}
    if summaries.get("in-process"):
        ratios["served / in-process tok/s"] = llm["tok_s"] / summaries["in-process"]["tok_s"]
    return ratios


def check_targets(rows: dict[str, tuple[float, float]], ratios: dict[str, float]
                  ) -> dict[str, dict]:
    """Each target: the value, the goal, and whether it was met."""
    served_over_inproc = ratios.get("served / in-process tok/s")
    req = rows["request throughput (req/s)"]
    p99 = rows["p99 latency (s)"]
    kv = rows["KV-cache utilization (%)"][0] / 100
    out = {"req/s ratio": dict(value=_ratio(*req), goal=">= 20 and lower p99",
                               met=_ratio(*req) >= TARGETS["req/s ratio"] and p99[0] < p99[1]),
           "KV utilization": dict(value=kv, goal=">= 0.97", met=kv >= TARGETS["KV utilization"])}
    if served_over_inproc is not None:
        out["served / in-process"] = dict(value=served_over_inproc, goal=">= 0.9",
                                          met=served_over_inproc >= TARGETS["served / in-process"])
    for name, t in out.items():
        verdict = "met" if t["met"] else "MISSED"
        print(f"target {name:22} {t['value']:8.3f} ({t['goal']}): {verdict}")
    return out


def _cdf(ax: plt.Axes, values_ms: list[float], label: str) -> None:
    xs = np.sort(np.asarray(values_ms) / 1e3)
    if len(xs):
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label)


def plot_all(report: dict, out_dir: Path) -> list[Path]:
    """latency_cdf.png (headline run) and sweep.png (throughput, p99 vs rate); their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head = report["headline"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, run in head.items():
        lat = run["latencies_ms"]
        _cdf(axes[0], lat["ttft"], f"{model} TTFT")
        _cdf(axes[1], lat["e2e"], f"{model} end-to-end")
    for ax, title in zip(axes, ("time to first token", "end-to-end latency")):
        ax.set(xlabel="seconds", ylabel="fraction of requests", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"latency CDFs, {report['config']['num_requests']} requests, rate "
                 f"{report['headline_rate']}")
    fig.tight_layout()
    cdf_path = out_dir / "latency_cdf.png"
    fig.savefig(cdf_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for model in ("llm", "llm_static"):
        runs = sorted((r for r in report["runs"] if r["model"] == model),
                      key=lambda r: r["rate"])
        if not runs:
            continue
        finite = [r["rate"] for r in runs if math.isfinite(r["rate"])]
        top = 2 * max(finite) if finite else 1.0   # where "all at once" is drawn
        xs = [r["rate"] if math.isfinite(r["rate"]) else top for r in runs]
        s = [r["summary"] for r in runs]
        axes[0].plot(xs, [x["req_s"] for x in s], "o-", label=model)
        axes[1].plot(xs, [x["tok_s"] for x in s], "o-", label=model)
        axes[2].plot(xs, [(x["e2e_ms"] or {}).get("p99", math.nan) / 1e3 for x in s], "o-",
                     label=model)
    for ax, ylabel in zip(axes, ("completed req/s", "output tok/s", "p99 end-to-end (s)")):
        ax.set(xlabel="offered request rate (req/s; rightmost point: all at once)",
               ylabel=ylabel, xscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].set_yscale("log")
    fig.tight_layout()
    sweep_path = out_dir / "sweep.png"
    fig.savefig(sweep_path, dpi=110)
    plt.close(fig)
    return [cdf_path, sweep_path]
