"""Builds a small Hugging Face checkpoint directory, offline and deterministically.

Owns the model sizes (`tiny` and `tiny-mqa` for tests, `default` for CPU serving), the architectures (llama,
qwen2, qwen3), weight initialisation and the on-disk layout: config.json, model.safetensors
(or shards plus model.safetensors.index.json), generation_config.json, tokenizer.json,
tokenizer_config.json (with the chat template) and a `make_model.json` stamp of the settings, so
a second call with the same settings returns the existing directory without rebuilding.

`tiny` models are randomly initialised with a large initializer_range (no near-tied logits, so
greedy decoding is comparable token for token against transformers), random norm weights and,
for qwen2, random attention biases. The `default` model (~28M parameters) is pretrained for a
fixed number of steps on the tokenizer's prose corpus (about 4 minutes on 2 idle CPU cores),
enough to write English words and short phrases, repetitive and without sense under greedy
decoding. It must never need the network.

    python scripts/make_default_model.py --out models/default --size default
    python scripts/make_default_model.py --size tiny --arch qwen3 --shards 2
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file or imported with scripts/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import shutil
import tempfile

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, PretrainedConfig,
                          PreTrainedModel, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from scripts.train_tokenizer import save_tokenizer, train_tokenizer

STAMP_FILE = "make_model.json"
STAMP_VERSION = 1

SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                 initializer_range=0.2, tie_word_embeddings=False),
    "default": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=2048,
                    initializer_range=0.02, tie_word_embeddings=True),
}
# one KV head (multi-query) and tied embeddings: tensor parallelism replicates the KV head
SIZES["tiny-mqa"] = dict(SIZES["tiny"], num_key_value_heads=1, tie_word_embeddings=True)
DEFAULT_TRAIN_STEPS = {"tiny": 0, "default": 250}
ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
ROPE_THETA = 10000.0
ROPE_SCALINGS = ("llama3", "yarn")


def rope_parameters(size: str, rope_scaling: str | None) -> dict:
    """The rope settings; `llama3` scales frequencies as Llama 3.1 does (factor 8), `yarn` as
    Qwen2.5's long-context setting does (factor 4)."""
    if rope_scaling is None:
        return {"rope_type": "default", "rope_theta": ROPE_THETA}
    if rope_scaling not in ROPE_SCALINGS:
        raise ValueError(f"unknown rope scaling {rope_scaling!r}; known: "
                         f"{', '.join(ROPE_SCALINGS)}")
    original = SIZES[size]["max_position_embeddings"] // 4
    if rope_scaling == "yarn":
        return {"rope_type": "yarn", "rope_theta": ROPE_THETA, "factor": 4.0,
                "original_max_position_embeddings": original}
    return {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original}


def build_config(size: str, arch: str, rope_scaling: str | None,
                 special_ids: dict[str, int]) -> PretrainedConfig:
    """The transformers config for one size and architecture."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    config_class, _ = ARCHS[arch]
    fields = dict(SIZES[size], hidden_act="silu", rms_norm_eps=1e-6, attention_dropout=0.0,
                  rope_parameters=rope_parameters(size, rope_scaling), dtype="float32",
                  **special_ids)
    if arch == "qwen2":
        fields.update(use_sliding_window=False, max_window_layers=fields["num_hidden_layers"])
    if arch == "qwen3":
        # tiny uses head_dim != hidden_size / num_heads so that path is exercised
        head_dim = 32 if size == "tiny" else fields["hidden_size"] // fields["num_attention_heads"]
        fields.update(head_dim=head_dim, attention_bias=False, use_sliding_window=False,
                      max_window_layers=fields["num_hidden_layers"])
    return config_class(**fields)


def _randomize_norms_and_biases(model: PreTrainedModel, scale: float) -> None:
    """transformers initialises norm weights to 1 and biases to 0; make both non-trivial so a
    loader that drops them (q/k norms, qkv biases, layer norms) is caught."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, scale)


def _max_shard_bytes(model: PreTrainedModel, shards: int) -> int:
    """The smallest `max_shard_size` for which transformers writes at most `shards` files."""
    state_dict = model.state_dict()

    def num_files(max_bytes: int) -> int:
        split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_bytes)
        return len(split.filename_to_tensors)

    low, high = 1, sum(p.numel() * p.element_size() for p in state_dict.values())
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if num_files(middle) <= shards else (middle + 1, high)
    if num_files(low) != shards:
        raise ValueError(f"cannot split this model into exactly {shards} safetensors files")
    return low


def _settings(size: str, arch: str, seed: int, rope_scaling: str | None, shards: int,
              train_steps: int) -> dict:
    return {"version": STAMP_VERSION, "size": size, "arch": arch, "seed": seed,
            "rope_scaling": rope_scaling, "shards": shards, "train_steps": train_steps}


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _build(out_dir: Path, settings: dict) -> None:
    size, arch, seed = settings["size"], settings["arch"], settings["seed"]
    tokenizer = train_tokenizer(SIZES[size]["vocab_size"])
    special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = build_config(size, arch, settings["rope_scaling"], special_ids)
    assert config.vocab_size == len(tokenizer), "model and tokenizer vocabularies differ"
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = ARCHS[arch][1](config).eval()
        _randomize_norms_and_biases(model, config.initializer_range)
        if settings["train_steps"] > 0:
            from scripts.train_model import train

            train(model, tokenizer, settings["train_steps"], seed)
    model.generation_config = GenerationConfig(**special_ids)
    shards = settings["shards"]
    model.save_pretrained(out_dir, max_shard_size=_max_shard_bytes(model, shards) if shards > 1
                          else "50GB")
    assert len(list(out_dir.glob("*.safetensors"))) == shards, "unexpected number of shards"
    save_tokenizer(tokenizer, out_dir)
    (out_dir / STAMP_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def make_model(out_dir: str | Path, size: str = "tiny", arch: str = "llama", seed: int = 0,
               rope_scaling: str | None = None, shards: int = 1,
               train_steps: int | None = None) -> Path:
    """Builds the checkpoint in `out_dir` (or returns it untouched if it already holds one built
    with the same settings). `train_steps=None` uses the size's default (0 for tiny)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if train_steps is None:
        train_steps = DEFAULT_TRAIN_STEPS.get(size, 0)
    build_config(size, arch, rope_scaling, {})  # validate the names before any work
    out_dir = Path(out_dir)
    settings = _settings(size, arch, seed, rope_scaling, shards, train_steps)
    stamp = _read_stamp(out_dir)
    if stamp == settings:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and stamp is None:
        raise FileExistsError(f"{out_dir} is not empty and was not built by make_model; "
                              "choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and swap it in, so a reader never sees a half-written checkpoint
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _build(staging, settings)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="checkpoint directory (models/<size>-<arch>)")
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rope-scaling", choices=ROPE_SCALINGS, default=None)
    parser.add_argument("--shards", type=int, default=1, help="safetensors files to split into")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="pretraining steps (default: 0 for tiny, 250 for default)")
    args = parser.parse_args(argv)
    out_dir = args.out or Path("models") / f"{args.size}-{args.arch}"
    path = make_model(out_dir, args.size, args.arch, args.seed, args.rope_scaling, args.shards,
                      args.train_steps)
    print(path)


if __name__ == "__main__":
    main()
