"""The llama.cpp comparison: the F32 GGUF rewrite keeps metadata and dequantizes exactly, the
batched-bench table is parsed, and the whole benchmark runs on the tiny model (our side, in
process and served through a real TorchServe) with every token counted. No timing asserted."""
import json
import stat
from pathlib import Path

import gguf
import numpy as np

from bench.decode import main
from bench.llama_cpp import batched_bench, write_f32

TABLE = """main: n_kv_max = 12544, n_batch = 2048, n_ubatch = 512, n_threads = 1

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |     64 |    1 |    192 |    0.512 |   250.00 |    2.000 |    32.00 |    2.512 |    76.43 |
|   128 |     64 |    8 |   1536 |    4.000 |   256.00 |    5.000 |   102.40 |    9.000 |   170.67 |

llama_perf_context_print: total time = 1.0 ms
"""


def test_write_f32_dequantizes_and_keeps_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 64)).astype(np.float32)
    src = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(src, "llama")
    w.add_uint32(gguf.Keys.General.FILE_TYPE, 3)
    w.add_context_length(128)
    w.add_token_list(["a", "b"])
    quant = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("blk.0.w", quant, raw_shape=quant.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("norm", np.ones(64, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = write_f32(src, tmp_path / "f.gguf")
    r, q = gguf.GGUFReader(out), gguf.GGUFReader(src)
    assert r.fields[gguf.Keys.General.FILE_TYPE].contents() == 0
    assert r.fields["llama.context_length"].contents() == 128
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]
    tensors = {t.name: t for t in r.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    expected = gguf.quants.dequantize(q.tensors[0].data, q.tensors[0].tensor_type)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.w"].data).reshape(4, 64), expected)
    assert np.abs(expected - weight).max() < 0.5      # Q4_1 really was dequantized


def test_batched_bench_table_is_parsed(tmp_path: Path) -> None:
    fake = tmp_path / "llama-batched-bench"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{TABLE}EOF\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    rows, cmd = batched_bench(tmp_path, tmp_path / "m.gguf", [1, 8], 128, 64, 1)
    assert [(r["B"], r["S_TG t/s"], r["S_PP t/s"]) for r in rows] == [(1, 32.0, 250.0),
                                                                       (8, 102.4, 256.0)]
    assert "-npl 1,8" in cmd and "-t 1" in cmd and f"-c {8 * 192 + 256}" in cmd


def test_decode_benchmark_our_side_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    report = main(["--model", "tiny", "--batches", "1,3", "--prompt-len", "20", "--gen-len", "6",
                   "--streams", "1,2", "--prompt-mean", "12", "--output-mean", "5",
                   "--no-llama", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    rows = saved["engine_rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["decode_steps"] == 5 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
               for r in rows)
    assert saved["floor"]["weight_bytes"] > 0 and saved["floor"]["tpot_over_floor"] > 0
    served = {r["streams"]: r["ours"] for r in saved["served"]}
    assert set(served) == {1, 2}
    for s in served.values():
        assert s["failures"] == 0 and s["tok_s"] > 0 and s["tpot_ms"] is not None
