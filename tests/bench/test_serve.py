"""The serving benchmark runs end to end against a real TorchServe with the tiny model: both
systems complete every request with exactly its token count, the JSON holds every number and
the plots are written. The static batch bookkeeping is checked on hand-made records. No timing
is asserted."""
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.client import RequestRecord  # noqa: E402
from bench.serve import main, static_batches, static_kv_fill  # noqa: E402
from bench.workload import Request  # noqa: E402


def _req(i: int, prompt_len: int, output_len: int, arrival_s: float = 0.0) -> Request:
    return Request(f"req-{i}", [5] * prompt_len, output_len, arrival_s)


def test_static_batches_follow_completion_order_and_fill_is_padded() -> None:
    workload = [_req(i, p, o) for i, (p, o) in enumerate([(4, 4), (2, 2), (8, 1), (1, 1)])]
    records = [RequestRecord(r.request_id, done_s=d, batch_size=b)
               for r, d, b in zip(workload, [1.0, 2.0, 1.0, 2.0], [2, 2, 2, 2])]
    batches, how = static_batches(records, workload)
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 3]] and how.startswith("observed")
    # batch [0, 2]: tokens 8 + 9, reserved 2 * (8 + 4); batch [1, 3]: 4 + 2 over 2 * (2 + 2)
    fills = static_kv_fill(sorted(map(sorted, batches)), workload)
    assert math.isclose(fills[0], 17 / 24) and math.isclose(fills[1], 6 / 8)


def test_static_batches_fall_back_to_arrival_groups() -> None:
    workload = [_req(i, 2, 2, arrival_s=10 - i) for i in range(10)]
    records = [RequestRecord(r.request_id, done_s=1.0, batch_size=3) for r in workload]
    batches, how = static_batches(records, workload)
    assert how.startswith("assumed")
    assert batches == [[9, 8, 7, 6, 5, 4, 3, 2], [1, 0]]


def test_bench_serve_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = main(["--model", "tiny", "--model-store", str(tmp_path / "archives"),
                   "--run-dir", str(tmp_path / "server"), "--num-requests", "10",
                   "--sweep-requests", "5", "--rates", "20,inf", "--scale", "0.1",
                   "--stats-interval", "0.05", "--out-dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["headline_rate"] == math.inf
    assert {(r["model"], r["rate"]) for r in saved["runs"]} == {
        (m, r) for m in ("llm", "llm_static") for r in (20.0, math.inf)}
    targets = saved["workload"]["output_lens"]
    assert len(targets) == 10
    for run in saved["runs"]:
        s = run["summary"]
        assert s["failures"] == 0 and not run["errors"], run["model"]
        assert s["req_s"] > 0 and s["tok_s"] > 0
        assert s["output_tokens"] == sum(r["tokens"] for r in run["records"])
        if math.isinf(run["rate"]):
            assert s["tokens_per_request"] == targets, run["model"]
            assert s["e2e_ms"]["p99"] > 0
    static = saved["headline"]["llm_static"]["summary"]
    assert 1 <= static["peak_batch"] <= 8 and 0 < static["kv_fill_mean"] <= 1
    llm = saved["headline"]["llm"]["summary"]
    assert llm["peak_batch"] >= 1 and llm["tpot_ms"] is not None
    assert saved["in_process"]["tokens_per_request"] == targets
    assert set(saved["seed_table"]) == {"request throughput (req/s)", "p99 latency (s)",
                                        "KV-cache utilization (%)", "max concurrency (requests)"}
    for plot in report["plots"]:
        assert Path(plot).stat().st_size > 1000
