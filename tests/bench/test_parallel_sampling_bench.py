"""The parallel-sampling benchmark runs end to end on a tiny model: choices equal the seeded
separate requests, and one prefill computes fewer rows and holds fewer blocks. No timing is
asserted."""
import json
from pathlib import Path

from bench.parallel_sampling import main


def test_n_choices_against_separate_requests(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "parallel.json"
    report = main(["--model", str(tiny_llama), "--prompt-tokens", "45", "--n", "3",
                   "--max-tokens", "5", "--num-blocks", "64", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["identical"]
    n, separate = report["results"]["n"], report["results"]["separate"]
    assert (n["prefill_rows"], separate["prefill_rows"]) == (45, 3 * 45)
    assert n["peak_blocks"] < separate["peak_blocks"]
