"""Serves a GGUF file as it is: config, tokenizer and chat template from its metadata,
tensors kept in their stored types.

transformers reads the metadata (``AutoConfig`` / ``AutoTokenizer`` with ``gguf_file``); gguf's
``GGUFReader`` maps the file, and every matrix becomes a ``Linear.stored`` in its own format:
quantized block types as ``kernels.Lanes`` (lossless, ``kernels/lanes.py``), F16 and BF16 as
tensors of that dtype, F32 as fp32. Norms and biases are fp32. Nothing is dequantized to a
dense copy where the compiled kernels apply; the token embedding is read in its stored type
(a tied head is the same table). Llama-family files store q and k rows permuted for
llama.cpp's rotary layout; they are put back in the Hugging Face order (a row permutation,
exact for every block type), as transformers' GGUF reader does. What that reader leaves out of
the config is read here: the head size a Qwen3 file states, and rope scaling (llama.cpp keeps
Llama 3's only as per-pair frequency divisors, ``rope_freqs.weight``, read back into llama3
settings; other kinds as ``rope.scaling.*`` keys). A tensor of a type the engine does not
serve, a missing or misshapen tensor, a rope scaling it does not serve, or a truncated file is
an error at load that names it.
"""
import copy
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

import kernels
from engine.models.decoder import CausalLM, DecoderSpec, RMSNorm
from engine.models.rope import llama3_from_divisors

__all__ = ["ARCHITECTURES", "architecture", "end_of_turn_ids", "eos_ids", "is_gguf", "load_gguf",
           "open_reader", "read_config"]

# GGUF's general.architecture -> the transformers class the engine serves
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SERVED_TYPES = tuple(DENSE_TYPES) + kernels.GGUF_LANE_TYPES
_PERMUTED = ("llama", "mistral")    # archs whose q/k rows llama.cpp's converter permutes
_MARK = "\u2063assistant-reply\u2063"    # a reply text no template rewrites
# GGUF layer tensor name -> (our module path inside the layer, part index of a fused weight)
_LAYER = {"attn_norm": ("input_layernorm", None), "ffn_norm": ("post_attention_layernorm", None),
          "attn_q": ("self_attn.qkv_proj", 0), "attn_k": ("self_attn.qkv_proj", 1),
          "attn_v": ("self_attn.qkv_proj", 2), "attn_output": ("self_attn.o_proj", None),
          "attn_q_norm": ("self_attn.q_norm", None), "attn_k_norm": ("self_attn.k_norm", None),
          "ffn_gate": ("mlp.gate_up_proj", 0), "ffn_up": ("mlp.gate_up_proj", 1),
          "ffn_down": ("mlp.down_proj", None)}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IGNORED = ("rope_freqs.weight",)   # llama3 rope divisors: read into the config's rope settings


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


def open_reader(path: Path):
    from gguf import GGUFReader
    try:
        return GGUFReader(str(path))
    except Exception as exc:    # noqa: BLE001 - gguf raises plain ValueError/IndexError/...
        raise ValueError(f"{path.name}: not a readable GGUF file (truncated or corrupt?): "
                         f"{type(exc).__name__}: {exc}") from exc


def architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError("no general.architecture in the GGUF metadata")
    arch = bytes(field.parts[field.data[0]]).decode()
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return arch


def read_config(path: str | Path) -> PretrainedConfig:
    """The transformers config of a GGUF file, with ``architectures`` and tied embeddings
    as the file has them (read once per file: parsing the metadata takes seconds)."""
    return copy.deepcopy(_config(str(Path(path).resolve()), Path(path).stat().st_mtime_ns))


@lru_cache(maxsize=4)
def _config(file: str, mtime_ns: int) -> PretrainedConfig:
    path = Path(file)
    reader = open_reader(path)
    arch = architecture(reader)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.architectures = [ARCHITECTURES[arch]]
    head_dim = _head_size(reader, arch)
    if head_dim is not None:        # transformers' reader leaves Qwen3's at its default, 128
        config.head_dim = head_dim
    scaling = _rope_scaling(reader, arch, config)
    if scaling is not None:         # transformers' reader drops it
        config.rope_parameters = {**(config.rope_parameters or {}), **scaling}
    config.tie_word_embeddings = not any(t.name == "output.weight" for t in reader.tensors)
    return config


def _head_size(reader, arch: str) -> int | None:
    """The attention head size the file states (``<arch>.attention.key_length``), if any."""
    sizes = {}
    for kind in ("key", "value"):
        field = reader.fields.get(f"{arch}.attention.{kind}_length")
        if field is not None:
            sizes[kind] = int(field.parts[field.data[0]][0])
    if len(set(sizes.values())) > 1:
        raise ValueError(f"attention key length {sizes['key']} differs from value length "
                         f"{sizes['value']}; the engine serves one head size")
    return next(iter(sizes.values()), None)


def _rope_scaling(reader, arch: str, config: PretrainedConfig) -> dict | None:
    """The rope scaling the file states, as ``rope_parameters`` entries: llama.cpp writes
    llama3 scaling as per-pair frequency divisors (``rope_freqs.weight``), other kinds as
    ``<arch>.rope.scaling.*`` keys, yarn's with its original context and ramp (the engine
    refuses kinds it does not serve)."""
    prefix = f"{arch}.rope.scaling."
    keys = {name[len(prefix):]: field for name, field in reader.fields.items()
            if name.startswith(prefix)}
    kind = bytes(keys["type"].parts[keys["type"].data[0]]).decode() if "type" in keys else "none"
    numbers = {key: float(field.parts[field.data[0]][0]) for key, field in keys.items()
               if key != "type"}
    if kind == "yarn":
        if "factor" not in numbers or "original_context_length" not in numbers:
            raise ValueError(f"yarn rope scaling needs {prefix}factor and "
                             f"{prefix}original_context_length")
        if numbers.get("yarn_ext_factor", 1.0) != 1.0:
            raise ValueError(f"yarn extrapolation factor {numbers['yarn_ext_factor']}: the "
                             "engine serves yarn's full extrapolation (1.0) only")
        names = {"factor": "factor", "yarn_beta_fast": "beta_fast",
                 "yarn_beta_slow": "beta_slow", "yarn_attn_factor": "attention_factor"}
        return {"rope_type": "yarn",
                "original_max_position_embeddings": int(numbers["original_context_length"]),
                **{ours: numbers[key] for key, ours in names.items() if key in numbers}}
    if kind != "none":
        return {"rope_type": kind, "factor": numbers.get("factor", 1.0)}
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    if freqs.tensor_type.name != "F32":
        raise ValueError(f"tensor 'rope_freqs.weight' has GGUF type {freqs.tensor_type.name}; "
                         "rope frequency divisors are F32")
    theta = (config.rope_parameters or {}).get("rope_theta", 10000.0)
    head_dim = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    return llama3_from_divisors(np.asarray(freqs.data), head_dim, float(theta))


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


def load_gguf(path: str | Path, spec: DecoderSpec, device: str,
              max_positions: int) -> CausalLM:
    """A CausalLM whose linear layers hold the file's tensors in their stored formats
    (``Linear.stored``; ``CausalLM.pack`` packs them)."""
    path = Path(path)
    reader = open_reader(path)
    arch = architecture(reader)
    with torch.device("meta"):      # no dense weights are ever allocated
        model = CausalLM(spec, max_positions)
    rope = model.model.rope
    with torch.device(device):      # the rotary tables are computed, not loaded
        fresh = type(rope)(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling)
    rope.cos, rope.sin = fresh.cos, fresh.sin
    fused: dict[str, list] = {}
    loaded: set[str] = set()
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        target, part = _target(t.name, spec.num_layers)
        value = _tensor(t)
        if arch in _PERMUTED and part in (0, 1) and target.endswith("qkv_proj"):
            heads = spec.num_heads if part == 0 else spec.num_kv_heads
            value = _rows(value, _unpermute(value.shape[0], heads))
        if part is not None:
            fused.setdefault(f"{target}.{t.name.rsplit('.', 1)[1]}", [None] * 3)[part] = value
            continue
        _place(model, f"{target}.{t.name.rsplit('.', 1)[1]}", value, spec, device)
        loaded.add(f"{target}.{t.name.rsplit('.', 1)[1]}")
    for name, parts in fused.items():
        count = 3 if ".qkv_proj." in name else 2
        if any(p is None for p in parts[:count]):
            raise ValueError(f"{path.name}: {name} lacks a part ({count} expected)")
        _place(model, name, _concat(parts[:count], name), spec, device)
        loaded.add(name)
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if spec.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{path.name}: lacks tensors for {missing[:5]}")
    return model.eval()


def _target(name: str, layers: int) -> tuple[str, int | None]:
    """Our module path and fused part of a GGUF tensor name (``blk.3.attn_q.weight``)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER and parts[1].isdigit() \
            and int(parts[1]) < layers:
        module, part = _LAYER[parts[2]]
        return f"model.layers.{parts[1]}.{module}", part
    if len(parts) == 2 and parts[0] in _TOP:
        return _TOP[parts[0]], None
    raise ValueError(f"unexpected tensor {name!r} in the GGUF file")


def _tensor(t) -> kernels.Lanes | torch.Tensor:
    """A GGUF tensor in its stored format: lanes for block types, a tensor for F32/F16/BF16."""
    kind = t.tensor_type.name
    if kind not in SERVED_TYPES:
        raise ValueError(f"tensor {t.name!r} has GGUF type {kind}, which this engine does not "
                         f"serve; served: {', '.join(SERVED_TYPES)}")
    shape = tuple(int(d) for d in reversed(t.shape))       # GGUF lists the inner dim first
    if kind in DENSE_TYPES:
        data = np.asarray(t.data)
        if kind == "BF16":      # gguf's reader gives BF16 data as its raw bytes
            data = data.view(np.uint16)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"tensor {t.name!r}: {data.size} values for shape {shape}")
        return torch.from_numpy(data.copy()).view(DENSE_TYPES[kind]).reshape(shape)
    if len(shape) != 2:
        raise ValueError(f"tensor {t.name!r}: a {kind} tensor of shape {shape} is no matrix")
    try:        # a plain array: numpy's memmap subclass costs ~1 us per slice
        return kernels.from_gguf(kind, t.data.view(np.ndarray), shape)
    except ValueError as exc:
        raise ValueError(f"tensor {t.name!r} ({kind}): {exc}") from exc


def _rows(value: kernels.Lanes | torch.Tensor, index: torch.Tensor):
    return value.rows(index) if isinstance(value, kernels.Lanes) else value[index]


def _unpermute(rows: int, heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's rotary permutation of q or k (``heads`` heads)."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(-1)


def _concat(parts: list, name: str):
    if all(isinstance(p, kernels.Lanes) for p in parts):
        return kernels.Lanes.concat(parts)
    if all(isinstance(p, torch.Tensor) for p in parts) and len({p.dtype for p in parts}) == 1:
        return torch.cat(parts)
    raise ValueError(f"{name}: its parts are stored in different kinds of format "
                     f"({', '.join(type(p).__name__ for p in parts)})")


def _place(model: CausalLM, name: str, value, spec: DecoderSpec, device: str) -> None:
    """Put ``value`` at parameter ``name`` on ``device``: a linear weight as ``stored``, the
    embedding's table as ``stored`` of the embedding, anything else (norms, biases) as fp32."""
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    current = getattr(module, attr, None)
    if current is None or attr not in ("weight", "bias"):
        raise ValueError(f"tensor for {name!r} has no place in a {spec} model")
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(f"tensor for {name!r} has shape {tuple(value.shape)}, the model "
                         f"needs {tuple(current.shape)}")
    value = value.to(device)
    if attr == "weight" and not isinstance(module, RMSNorm) and len(value.shape) == 2:
        module.stored = value
        return
    if isinstance(value, kernels.Lanes):
        value = value.dequantize()      # a quantized norm or bias: tiny, dense
    setattr(module, attr, torch.nn.Parameter(value.float(), requires_grad=False))
