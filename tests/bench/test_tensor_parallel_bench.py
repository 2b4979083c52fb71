"""The tensor-parallel benchmark runs end to end on the tiny model (TP=1 then TP=2, gloo):
both sides decode every batch, the report holds each rank's memory, and the weights per rank
at TP=2 are at most 0.6x of TP=1's (a shard of every matrix, vocabulary included). No timing
is asserted."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.tensor_parallel import main  # noqa: E402


def test_bench_tensor_parallel_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    sides = main(["--model", "tiny", "--tp", "2", "--batches", "1,4", "--prompt-len", "16",
                  "--gen-len", "6", "--threads", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [s["tp"] for s in saved["sides"]] == [1, 2]
    for side in sides:
        assert [r["batch"] for r in side["rows"]] == [1, 4]
        assert all(r["decode_steps"] == 5 and r["decode_tok_s"] > 0 for r in side["rows"])
    one, two = sides
    assert len(two["rss_per_rank"]) == 2 and all(r > 0 for r in two["rss_per_rank"])
    assert two["weight_bytes_per_rank"] <= 0.6 * one["weight_bytes_per_rank"]
