"""Builds the TorchServe model archives (.mar) into archives/, building the default models first.

Three archives: ``llm`` (continuous batching, streaming), ``llm_static`` (the same checkpoint
with classic static batching) and ``classifier`` (scripts/make_classifier.py). Each .mar holds
its handler entry file and its config/<name>.model-config.yaml, whose ``handler.model_path`` is
rewritten to the checkpoint's absolute path: the weights stay where they are (one copy on disk,
an archive in a second) instead of being zipped in and unpacked again by TorchServe
(docs/serving.md, "Packaging"). ``--bundle`` puts the checkpoint inside the archive instead (as
``checkpoint/``), for a model store that must travel to another machine. The engine, kernels
and handlers packages are installed in the server's environment (``pip install -e .``), so code
changes need no rebuild. An archive is rebuilt only when its inputs changed (a stamp beside
it) or with ``--force``.

    python scripts/build_archives.py                 # SmolLM2-135M-Instruct's shipped GGUF
    python scripts/build_archives.py --size tiny     # tests
    python scripts/build_archives.py --model-path /path/to/hf-llama-checkpoint
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `scripts.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import re
import subprocess
import tempfile

ROOT = Path(__file__).resolve().parents[1]
ARCHIVES = {  # name: (handler entry file, model kind)
    "llm": ("continuous_batching.py", "llm"),
    "llm_static": ("static_llm.py", "llm"),
    "classifier": ("text_classifier.py", "classifier"),
}


def ensure_checkpoints(size: str, models_dir: Path, llm_path: Path | None) -> dict[str, Path]:
    """The LLM and classifier checkpoints, built (deterministically, offline) when missing."""
    from scripts.make_classifier import make_classifier
    if llm_path is None and size == "tiny":
        from scripts.make_default_model import make_model
        llm_path = make_model(models_dir / "tiny-llama", size="tiny", arch="llama")
    elif llm_path is None:      # the shipped GGUF file, served in its own types
        from scripts.make_smollm2 import smollm2_gguf
        llm_path = smollm2_gguf()
    return {"llm": Path(llm_path).resolve(),
            "classifier": Path(make_classifier(models_dir / "classifier")).resolve()}


def archive_cmd(name: str, handler: Path, config: Path, staged: Path | None,
                out: Path) -> list[str]:
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    extra = ["--extra-files", str(staged)] if staged is not None else []
    return [str(archiver if archiver.exists() else "torch-model-archiver"),
            "--model-name", name, "--version", "1.0", "--handler", str(handler),
            "--config-file", str(config), *extra,
            "--export-path", str(out), "--archive-format", "zip-store", "--force"]


def point_config(text: str, checkpoint: Path) -> str:
    """The model-config.yaml text with ``handler.model_path`` set to ``checkpoint``."""
    text, count = re.subn(r"^(\s+model_path:\s*)\S+", lambda m: m.group(1) + str(checkpoint),
                          text, count=1, flags=re.MULTILINE)
    if count != 1:
        raise ValueError("model-config.yaml has no handler.model_path line to point")
    return text


def set_keys(text: str, values: dict[str, object]) -> str:
    """The model-config.yaml text with these top-level (TorchServe) keys set, comments kept."""
    for key, value in values.items():
        text, count = re.subn(rf"^{key}:[ \t]*[^#\s]+", f"{key}: {value}", text, count=1,
                              flags=re.MULTILINE)
        if count != 1:
            text = f"{key}: {value}\n" + text
    return text


def build_archive(name: str, checkpoint: Path, out: Path, force: bool = False,
                  bundle: bool = False, keys: dict[str, object] | None = None) -> Path:
    """One .mar; ``keys`` overrides top-level keys of its model-config.yaml (e.g. workers)."""
    handler_file, _ = ARCHIVES[name]
    handler = ROOT / "handlers" / handler_file
    config_text = set_keys((ROOT / "config" / f"{name}.model-config.yaml").read_text(),
                           keys or {})
    if not bundle:
        config_text = point_config(config_text, checkpoint)
    archive, stamp_file = out / f"{name}.mar", out / f".{name}.stamp.json"
    stamp = {"checkpoint": str(checkpoint), "bundle": bundle,
             "checkpoint_mtime": max(p.stat().st_mtime for p in (
                 checkpoint.iterdir() if checkpoint.is_dir() else [checkpoint])),
             "config": config_text, "handler": handler.read_text()}
    if not force and archive.exists() and stamp_file.exists() \
            and json.loads(stamp_file.read_text()) == stamp:
        return archive
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-stage-") as stage:
        config = Path(stage) / f"{name}.model-config.yaml"
        config.write_text(config_text)
        staged = None
        if bundle:
            # the archiver copies a directory's contents to the archive root: stage
            # <stage>/files/checkpoint -> checkpoint so the weights land in checkpoint/
            staged = Path(stage) / "files"
            staged.mkdir()
            if checkpoint.is_dir():
                (staged / "checkpoint").symlink_to(checkpoint, target_is_directory=True)
            else:       # a GGUF file: checkpoint/<file>
                (staged / "checkpoint").mkdir()
                (staged / "checkpoint" / checkpoint.name).symlink_to(checkpoint)
        subprocess.run(archive_cmd(name, handler, config, staged, out), check=True)
    stamp_file.write_text(json.dumps(stamp))
    return archive


def build_all(size: str = "default", models_dir: Path = ROOT / "models",
              out: Path = ROOT / "archives", llm_path: Path | None = None,
              names: tuple[str, ...] = tuple(ARCHIVES), force: bool = False,
              bundle: bool = False) -> dict[str, Path]:
    checkpoints = ensure_checkpoints(size, Path(models_dir), llm_path)
    return {name: build_archive(name, checkpoints[ARCHIVES[name][1]], Path(out), force, bundle)
            for name in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "default"], default="default",
                        help="default: SmolLM2-135M-Instruct; tiny: a small test model "
                             "(ignored with --model-path)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a local Hugging Face checkpoint directory or GGUF file to serve "
                             "instead")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "archives")
    parser.add_argument("--names", default=",".join(ARCHIVES), help="archives to build")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--bundle", action="store_true",
                        help="put the weights inside the archives instead of pointing at them")
    args = parser.parse_args(argv)
    built = build_all(args.size, args.models_dir, args.out, args.model_path,
                      tuple(n for n in args.names.split(",") if n), args.force, args.bundle)
    for name, path in built.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
