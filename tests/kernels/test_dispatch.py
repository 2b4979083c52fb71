"""The kernels dispatch point: backend choice, env variable, logging once, triton missing."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paged_batch import make_batch

import kernels
from kernels import paged_attention, store_kv

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_backend():
    before = kernels.get_backend()
    yield
    kernels.set_backend(before)


def small_batch() -> dict:
    return make_batch([(1, 20), (3, 5)], num_heads=2, num_kv_heads=1, head_dim=16,
                      block_size=16, dtype=torch.float32)


def spy(calls: list, name: str, fn):
    def wrapped(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("backend,expected", [("auto", "cpu"), ("reference", "reference"),
                                              ("triton", "triton")])
def test_backend_choice_on_cpu(monkeypatch, backend: str, expected: str) -> None:
    kernels.set_backend(backend)
    kernels._load_triton()
    calls: list[str] = []
    if expected == "cpu" and not kernels._use_cpu(torch.empty(1)):
        expected = "reference"      # no compiler here: auto keeps the reference
    if kernels._cpu_fns:
        attend, linear, store = kernels._cpu_fns
        monkeypatch.setattr(kernels, "_cpu_fns", (spy(calls, "cpu", attend), linear,
                                                  spy(calls, "cpu", store)))
    monkeypatch.setattr(kernels, "paged_attention_reference",
                        spy(calls, "reference", kernels.paged_attention_reference))
    monkeypatch.setattr(kernels, "store_kv_reference",
                        spy(calls, "reference", kernels.store_kv_reference))
    store, attend, *linear = kernels._triton_fns
    monkeypatch.setattr(kernels, "_triton_fns", (spy(calls, "triton", store),
                                                 spy(calls, "triton", attend), *linear))
    batch = small_batch()
    out = paged_attention(**batch)
    key = torch.randn(2, 1, 16)
    store_kv(key, key, batch["k_cache"], batch["v_cache"], torch.tensor([-1, 3]))
    assert calls == [expected, expected]
    expected_out = kernels.paged_attention_reference(**small_batch())
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=1e-4)
    assert torch.equal(batch["k_cache"].view(-1, 1, 16)[3], key[1])


def test_choice_logged_once(caplog) -> None:
    kernels.set_backend("reference")
    batch = small_batch()
    with caplog.at_level(logging.INFO, logger="kernels"):
        for _ in range(3):
            paged_attention(**batch)
    records = [r for r in caplog.records if r.name == "kernels"]
    assert len(records) == 1 and "reference" in records[0].getMessage()


def test_unknown_backend_rejected() -> None:
    with pytest.raises(ValueError, match="unknown kernels backend"):
        kernels.set_backend("cuda")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None          # import triton now fails, as where it is not installed
import torch
import kernels
from kernels import paged_attention, store_kv
cache = torch.zeros(2, 16, 1, 16)
key = torch.ones(1, 1, 16)
mode = sys.argv[1] if len(sys.argv) > 1 else ""
try:
    if mode == "set":
        kernels.set_backend("triton")
    store_kv(key, key, cache, cache, torch.tensor([5]))
except RuntimeError as err:
    print("ERROR", err)
else:
    print("OK", kernels.get_backend(), float(cache.sum()))
"""


def test_import_and_auto_without_triton() -> None:
    result = run_python(WITHOUT_TRITON, KERNELS_BACKEND="auto")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK auto 16.0"


@pytest.mark.parametrize("how", ["env", "set"])
def test_forcing_triton_without_triton_is_a_clear_error(how: str) -> None:
    code = WITHOUT_TRITON.replace('sys.argv[1] if len(sys.argv) > 1 else ""', repr(how))
    result = run_python(code, KERNELS_BACKEND="triton" if how == "env" else "auto")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ERROR") and "triton is not installed" in result.stdout


def test_env_backend_is_read_and_checked() -> None:
    code = "import kernels; print(kernels.get_backend())"
    assert run_python(code, KERNELS_BACKEND="reference").stdout.strip() == "reference"
    bad = run_python(code, KERNELS_BACKEND="cuda")
    assert bad.returncode != 0 and "KERNELS_BACKEND" in bad.stderr
