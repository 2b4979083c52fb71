"""Writes the storage tree KServe's TorchServe runtime mounts at /mnt/models: ``config/``
(deploy/kserve/config.properties, config/metrics.yaml) and ``model-store/llm.mar`` with the
weights bundled (the archive travels to another machine). Upload the tree to the storage URI
of deploy/kserve/inferenceservice.yaml.

    python scripts/build_kserve.py --out kserve-store                # SmolLM2-135M-Instruct
    python scripts/build_kserve.py --out kserve-store --size tiny
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `scripts.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import shutil

from scripts.build_archives import ROOT, build_archive, ensure_checkpoints

KSERVE = ROOT / "deploy" / "kserve"


def build_kserve(out: Path, size: str = "default", llm_path: Path | None = None,
                 models_dir: Path = ROOT / "models") -> Path:
    """The tree under ``out``; returns ``out``."""
    config = Path(out) / "config"
    config.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(KSERVE / "config.properties", config / "config.properties")
    shutil.copyfile(ROOT / "config" / "metrics.yaml", config / "metrics.yaml")
    checkpoint = ensure_checkpoints(size, Path(models_dir), llm_path)["llm"]
    build_archive("llm", checkpoint, Path(out) / "model-store", bundle=True)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=["tiny", "default"], default="default")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a local Hugging Face checkpoint directory to serve instead")
    args = parser.parse_args(argv)
    print(build_kserve(args.out, args.size, args.model_path))


if __name__ == "__main__":
    main()
