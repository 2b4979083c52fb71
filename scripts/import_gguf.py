"""Imports a Llama / Mistral / Qwen2 / Qwen3 GGUF file as a Hugging Face checkpoint directory.

transformers' GGUF reader does the work (config, tokenizer with its chat template, dequantized
weights); this file checks the architecture first, rebuilds the model as a plain (unquantized)
transformers model so it can be saved, and writes: config.json with ``architectures``,
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

# GGUF's general.architecture -> the transformers class the engine serves
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_MARK = "\u2063assistant-reply\u2063"    # a reply text no template rewrites


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


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (reads the header only)."""
    from gguf import GGUFReader
    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path}: no general.architecture in the GGUF metadata")
    return bytes(field.parts[field.data[0]]).decode()


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) the chat template puts right after an assistant reply."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    after = rendered.split(_MARK, 1)[-1] if _MARK in rendered else ""
    ids = tokenizer.encode(after, add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return ids[:1] if ids and ids[0] in special else []


def eos_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS followed by the end-of-turn token, without duplicates."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return ids + [t for t in end_of_turn_ids(tokenizer) if t not in ids]


def import_gguf(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Convert ``src`` (a .gguf file) into the checkpoint directory ``out``; returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    src, out = Path(src).resolve(), Path(out)
    arch = gguf_architecture(src)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{src.name}: unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    kwargs = dict(gguf_file=src.name)
    steps = tqdm(total=4, desc=f"import {src.name}", unit="step")

    def done(what: str) -> None:
        steps.set_postfix_str(what)
        steps.update(1)

    tokenizer = AutoTokenizer.from_pretrained(src.parent, **kwargs)
    done("tokenizer")
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, dtype=getattr(torch, dtype),
                                                     **kwargs)
    done("weights")
    config = quantized.config
    config.architectures = [ARCHITECTURES[arch]]
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
