"""The offline benchmark runs end to end on a tiny model: every system produces exactly the
workload's tokens, and the JSON holds every number. No timing is asserted."""
import json
from pathlib import Path

from bench.offline import SYSTEMS, main
from bench.workload import make_workload


def test_workload_is_seeded_and_fits() -> None:
    a = make_workload(50, vocab_size=1024, max_model_len=256, seed=3, scale=2.0)
    b = make_workload(50, vocab_size=1024, max_model_len=256, seed=3, scale=2.0)
    assert a == b
    assert a != make_workload(50, vocab_size=1024, max_model_len=256, seed=4, scale=2.0)
    for r in a:
        assert r.prompt_len >= 1 and r.output_len >= 1
        assert r.prompt_len + r.output_len <= 256
        assert all(4 <= t < 1024 for t in r.prompt_ids)


def test_bench_offline_counts_every_token(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    report = main(["--model", str(tiny_llama), "--num-requests", "6", "--scale", "0.1",
                   "--num-blocks", "128", "--max-num-seqs", "4",
                   "--max-num-batched-tokens", "32", "--static-batch-size", "4",
                   "--sanity-requests", "2", "--threads", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    targets = saved["targets"]
    assert len(targets) == 6
    for name in SYSTEMS:
        system = saved["systems"][name]
        assert system["tok_s"] > 0 and system["req_s"] > 0, name
        assert system["output_tokens"] == sum(targets), name
        if system["tokens_per_request"] is not None:
            assert system["tokens_per_request"] == targets, name
    for name in ("ours", "hf_cb", "hf_static"):
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(saved["systems"][name][metric]) == {"mean", "p50", "p99"}
    assert saved["systems"]["ours"]["peak_batch"] <= 4
    assert set(saved["ratios"]) == {"ours / hf_cb (>= 2)", "ours / hf_static",
                                    "ours / ceiling (>= 0.9)"}
    # fp32 greedy on a tiny random model: the same tokens whichever system batches them
    assert saved["sanity"] == {"hf_cb": ["same", "same"], "hf_static": ["same", "same"]}
