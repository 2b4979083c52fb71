"""Imports a Llama / Mistral / Qwen2 / Qwen3 GGUF file as a Hugging Face checkpoint directory.

transformers' GGUF reader does the work (config, tokenizer with its chat template, dequantized
weights); this file checks the architecture first, takes the config as the engine reads it
(``architectures``, the head size and the rope scaling the file states, which transformers'
reader leaves out), rebuilds the model as a plain (unquantized) transformers model so it can be
saved, and writes: config.json with ``architectures``,
model.safetensors (fp32 unless ``--dtype`` says otherwise), the tokenizer files, and
generation_config.json whose EOS ids include the chat template's end-of-turn token. The
directory appears whole or not at all (written beside it, then renamed).

    python scripts/import_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `scripts.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

import torch
from tqdm import tqdm

from engine.models.gguf_file import architecture, eos_ids, open_reader, read_config


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` that replaces ``out`` whole when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield stage
        stage.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def import_gguf(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Convert ``src`` (a .gguf file) into the checkpoint directory ``out``; returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    src, out = Path(src).resolve(), Path(out)
    try:
        architecture(open_reader(src))
    except ValueError as exc:
        raise ValueError(f"{src.name}: {exc}") from exc
    kwargs = dict(gguf_file=src.name)
    steps = tqdm(total=4, desc=f"import {src.name}", unit="step")

    def done(what: str) -> None:
        steps.set_postfix_str(what)
        steps.update(1)

    tokenizer = AutoTokenizer.from_pretrained(src.parent, **kwargs)
    done("tokenizer")
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, config=read_config(src),
                                                     dtype=getattr(torch, dtype), **kwargs)
    done("weights")
    config = quantized.config
    if hasattr(config, "quantization_config"):     # GGUF models refuse save_pretrained
        del config.quantization_config
    # A fresh model of the same config holds plain tensors: that one can be saved.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(quantized.state_dict(), assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    del quantized
    done("model")
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=eos_ids(tokenizer),
                                  pad_token_id=tokenizer.pad_token_id)
    with staged_dir(out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        generation.save_pretrained(stage)
        for file in stage.iterdir():
            file.chmod(0o644)
    done("saved")
    steps.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a .gguf file")
    parser.add_argument("out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    try:
        print(import_gguf(args.src, args.out, args.dtype))
    except ValueError as exc:
        sys.exit(f"import_gguf: {exc}")


if __name__ == "__main__":
    main()
