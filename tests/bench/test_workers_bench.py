"""The several-workers benchmark runs end to end against a real TorchServe with two workers
of the tiny model: every request completes with exactly its token count and the JSON holds
the run's numbers. No timing is asserted."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.workers import main  # noqa: E402


def test_bench_workers_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    runs = main(["--model", "tiny", "--workers", "2", "--streams", "8", "--scale", "0.1",
                 "--stats-interval", "0.05", "--out-dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert [(r["workers"], r["streams"]) for r in saved["runs"]] == [(2, 8)]
    summary = runs[0]["summary"]
    assert summary["failures"] == 0 and summary["output_tokens"] > 0
    assert summary["ttft_ms"]["p99"] >= summary["ttft_ms"]["p50"] > 0
