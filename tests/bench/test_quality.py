"""The quality benchmark runs end to end on the tiny test model: the dense engine scores the
text as transformers does, int8 at load stays near dense, every row is reported. The bounds
are the benchmark's targets only where the tiny random model can show them (int8); int4 on
random weights says nothing about a real model, so only its presence is checked."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import main  # noqa: E402


def test_bench_quality_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    main(["--model", str(tiny_llama), "--tokens", "96", "--gguf", "", "--groups", "32",
          "--json", str(out)])
    report = json.loads(out.read_text())
    rows = {r["system"]: r for r in report["rows"]}
    assert set(rows) == {"ours dense fp32", "ours int8 g32", "ours int4 g32"}
    assert report["tokens"] == 96
    assert abs(rows["ours dense fp32"]["ratio"] - 1) < 1e-4
    assert abs(rows["ours int8 g32"]["ratio"] - 1) < 0.02
    assert rows["ours int4 g32"]["ppl"] > 0
