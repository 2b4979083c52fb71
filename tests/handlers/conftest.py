"""One real TorchServe for the handler tests: tiny LLM + static models, default config.

Token authorization stays on (the default), so every test sends the inference key; the
server runs on free loopback ports with its own run directory (config, logs, Java tmpdir, PID
file, key file) and is stopped by PID when the package's tests end.
"""
import sys
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.build_archives import build_all  # noqa: E402
from scripts.serve import Server, serving  # noqa: E402


@pytest.fixture(scope="package")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archives")
    build_all("tiny", models_dir=ROOT / "models", out=out)
    return out


@pytest.fixture(scope="package")
def server(archives: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    with serving(archives, tmp_path_factory.mktemp("torchserve"), token_auth=True,
                 timeout_s=240) as srv:
        yield srv


@pytest.fixture(scope="package")
def http(server: Server) -> requests.Session:
    session = requests.Session()
    session.headers.update(server.headers())
    return session


@pytest.fixture(scope="package")
def llm_url(server: Server) -> str:
    return f"{server.url()}/predictions/llm"


@pytest.fixture(scope="package")
def offline_engine():
    """The engine the server runs, built in-process with the same handler settings."""
    from engine import LLMEngine
    from handlers.settings import ENGINE_KEYS
    section = yaml.safe_load((ROOT / "config" / "llm.model-config.yaml").read_text())["handler"]
    args = {k: v for k, v in section.items() if k in ENGINE_KEYS}
    return LLMEngine(ROOT / "models" / "tiny-llama", **args)
