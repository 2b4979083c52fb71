"""scripts/gpu_check.sh --cpu-dry-run: every step of the GPU check runs (on the CPU, reference
backend, tiny shapes) and passes, so the script is ready when a GPU is lent."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("setup", "models", "kernels", "linear", "parity", "bench_kernels", "bench_offline",
         "serve")


def test_cpu_dry_run_passes_every_step(tiny_llama, tmp_path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    shutil.copytree(tiny_llama, work / "tiny-llama")     # the same build: reused, not redone
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WORK=str(work),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        result = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", str(out)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        sys.path.insert(0, str(ROOT))
        from scripts.serve import stop_server
        stop_server(work / "serve" / "server")
    summary = (out / "summary.txt").read_text()
    assert result.returncode == 0, summary + result.stdout[-3000:]
    for step in STEPS:
        assert f"{step}: pass" in summary, summary
        assert (out / f"{step}.log").stat().st_size > 0
    parity = [json.loads(line) for line in (out / "parity.log").read_text().splitlines()
              if line.startswith('{"check": "parity"')]
    assert [p["dtype"] for p in parity] == ["float32", "bfloat16"]
    assert parity[0]["identical"] == parity[0]["prompts"]
    assert all(p["backend"] == "reference" and p["seeded_alone_equals_busy"] for p in parity)
    linear = [json.loads(line) for line in (out / "linear.log").read_text().splitlines()
              if line.startswith('{"check": "linear"')]
    assert len(linear) == 1 and linear[0]["ok"] and len(linear[0]["worst_error_over_bound"]) == 12
    served = json.loads((out / "serve.log").read_text().strip().splitlines()[-1])
    assert served["status"] == 200 and served["text"] and served["stream_equals_whole"]
    assert "ours / hf_cb" in (out / "bench_offline.log").read_text()
