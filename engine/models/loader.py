"""Builds a CausalLM from a local checkpoint: a Hugging Face directory (safetensors, sharded
or not) or a GGUF file (engine/models/gguf_file.py), and reads either one's config and
tokenizer."""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from engine.models import gguf_file
from engine.models.decoder import CausalLM, DecoderSpec

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# checkpoint name suffix -> (our name suffix, index of the part inside the fused weight)
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def read_spec(config: PretrainedConfig) -> DecoderSpec:
    """The network shape of a supported architecture; others get an error naming the supported."""
    arch = (config.architectures or ["?"])[0]
    if arch not in SUPPORTED:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})
    theta = rope.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
    heads = config.num_attention_heads
    return DecoderSpec(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
        num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps, rope_theta=float(theta),
        rope_scaling=rope or None, max_position_embeddings=config.max_position_embeddings,
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(config, "attention_bias", False)),
        o_bias=arch != "Qwen2ForCausalLM" and bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def read_config(path: str | Path) -> PretrainedConfig:
    """The transformers config of a checkpoint directory or GGUF file."""
    return gguf_file.read_config(path) if gguf_file.is_gguf(path) else \
        AutoConfig.from_pretrained(path)


def read_tokenizer(path: str | Path):
    """The tokenizer (with its chat template) of a checkpoint directory or GGUF file."""
    from transformers import AutoTokenizer
    if gguf_file.is_gguf(path):
        path = Path(path)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def read_eos_ids(path: str | Path, tokenizer) -> list[int]:
    """EOS ids from the checkpoint's generation config, else the tokenizer's (a GGUF file's:
    its EOS and the chat template's end-of-turn token)."""
    if gguf_file.is_gguf(path):
        return gguf_file.eos_ids(tokenizer)
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def load_model(path: str | Path, dtype: torch.dtype, device: str,
               max_positions: int) -> CausalLM:
    """A fresh CausalLM from config.json and every safetensors shard of ``path``, or from a
    GGUF file's tensors in their stored formats (fp32 compute)."""
    if gguf_file.is_gguf(path):
        if dtype != torch.float32:
            raise ValueError(f"a GGUF file is served with dtype float32 (its tensors keep their "
                             f"stored types), got {dtype}")
        return gguf_file.load_gguf(path, read_spec(read_config(path)), device, max_positions)
    spec = read_spec(AutoConfig.from_pretrained(path))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CausalLM(spec, max_positions)
    finally:
        torch.set_default_dtype(previous)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in _shards(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if spec.tie_word_embeddings and name == "lm_head.weight":
                    continue
                target, part = _target(name)
                if target not in params:
                    raise ValueError(f"unexpected weight {name!r} in {file.name}")
                _copy(params[target], f.get_tensor(name), target, part, spec)
                loaded.add(target)
    missing = set(params) - loaded - ({"lm_head.weight"} if spec.tie_word_embeddings else set())
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights: {sorted(missing)[:5]}")
    return model.eval()


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {path}")
    return files


def _target(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _FUSED:
            fused, index = _FUSED[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), index
    return name, None


@torch.no_grad()
def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str, part: int | None,
          spec: DecoderSpec) -> None:
    if part is None:
        rows = slice(None)
    else:
        sizes = ([spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2
                 if ".qkv_proj." in name else [spec.intermediate_size] * 2)
        start = sum(sizes[:part])
        rows = slice(start, start + sizes[part])
    target = param.data[rows]
    if target.shape != tensor.shape:
        raise ValueError(f"weight shape {tuple(tensor.shape)} does not fit {tuple(target.shape)}")
    target.copy_(tensor)
