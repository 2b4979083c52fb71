"""Tiny GGUF material for the tests: random valid blocks of a GGUF block type, and a GGUF file
written from a Hugging Face Llama, Qwen2 or Qwen3 checkpoint directory the way llama.cpp's
converter lays one out (``<arch>.*`` and tokenizer.ggml.* metadata, blk.N.* tensor names,
Qwen2's q/k/v biases, Qwen3's q/k norms and head size, q/k rows permuted for its rotary layout
in Llama files only), with its matrices stored in a chosen type."""
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

# byte offsets of each block type's fp16 (scale, min) header fields; min None: no min
_HEADERS = {"Q8_0": (0, None), "Q4_0": (0, None), "Q5_0": (0, None), "Q4_1": (0, 2),
            "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None)}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def random_blocks(type_name: str, rows: int, cols: int, seed: int, scale: float = 1.0,
                  centered: bool = False) -> np.ndarray:
    """Raw blocks (uint8 ``[rows, bytes per row]``) of a ``rows x cols`` tensor: random
    integers and sub-block scales, with fp16 scales in [1e-3, 1e-2] (and mins in +-1e-2),
    times ``scale``. ``centered`` sets each K-quant block's min so that its weights average
    about zero, as a trained model's do (unsigned values with a random min have a large common
    mean, which makes a random network ill-conditioned)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scale_at, min_at = _HEADERS[type_name]
    raw[:, scale_at:scale_at + 2] = _half(scale * rng.uniform(1e-3, 1e-2, len(raw)))
    if min_at is not None:
        low = 0.0 if type_name.endswith("_K") else -1e-2    # K-quants subtract dmin * m
        raw[:, min_at:min_at + 2] = _half(scale * rng.uniform(low, 1e-2, len(raw)))
    if centered and type_name in ("Q4_K", "Q5_K"):
        sc, mn = gguf.quants.Q4_K.get_scale_min(raw[:, 4:16].copy())     # [blocks, 8] each
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float64)
        middle = 7.5 if type_name == "Q4_K" else 15.5                   # the values' mean
        dmin = d * middle * sc.mean(axis=1, keepdims=True) / np.maximum(
            mn.mean(axis=1, keepdims=True), 1)
        raw[:, 2:4] = _half(dmin[:, 0])
    return raw.reshape(rows, -1)


def _half(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows in llama.cpp's rotary order (its converter's permutation)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf_name: str) -> str:
    """The llama.cpp tensor name of a Hugging Face Llama/Qwen weight name."""
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        layer, rest = module[len("model.layers."):].split(".", 1)
        return f"blk.{layer}.{_LAYER[rest]}.{kind}"
    return f"{_TOP[module]}.{kind}"


def write_gguf(out: Path, checkpoint: Path, matrix_type: str | Callable[[str], str],
               raw_tensors: dict[str, tuple[str, np.ndarray]] | None = None,
               model_name: str | None = None, rope_scaling: tuple[str, float] | None = None
               ) -> Path:
    """``checkpoint`` (a Llama, Qwen2 or Qwen3 directory: config.json, model.safetensors, a
    byte-level BPE tokenizer.json) as the GGUF file ``out``: 2-D weights stored as
    ``matrix_type`` (F32, F16 or a type gguf.quants can quantize; or a function of the GGUF
    tensor name giving one), norms and biases as F32. ``raw_tensors`` replaces tensors by GGUF
    name with ``(type name, raw blocks)`` as they are. ``model_name`` is ``general.name``
    (llama.cpp writes Mistral models as ``llama`` files named for Mistral); ``rope_scaling``
    is a ``(type, factor)`` written as ``<arch>.rope.scaling.*`` keys. A checkpoint with
    llama3 rope scaling gets llama.cpp's ``rope_freqs.weight`` (per-pair divisors), one with
    yarn its scaling keys."""
    type_of = matrix_type if callable(matrix_type) else lambda name: matrix_type
    config = json.loads((checkpoint / "config.json").read_text())
    arch = config["model_type"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer = gguf.GGUFWriter(str(out), arch)
    if model_name:
        writer.add_name(model_name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = config["rope_parameters"]
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        writer.add_rope_scaling_factor(rope_scaling[1])
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", rope_divisors(rope, head_dim))
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, checkpoint)
    raw_tensors = raw_tensors or {}
    for name, w in load_file(str(checkpoint / "model.safetensors")).items():
        target = gguf_name(name)
        if target in raw_tensors:
            kind, raw = raw_tensors[target]
            writer.add_tensor(target, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute(w, config["num_attention_heads" if "q_proj" in name
                               else "num_key_value_heads"])
        _add_matrix(writer, target, w, type_of(target) if w.ndim == 2 else "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def rope_divisors(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter stores for llama3 rope scaling: each frequency pair's
    divisor (1 for short wavelengths, the factor for long ones, blended between)."""
    factor, old = rope["factor"], rope["original_max_position_embeddings"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * np.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelength < old / high:
            out.append(1.0)
        elif wavelength > old / low:
            out.append(factor)
        else:
            share = (old / wavelength - low) / (high - low)
            out.append(1 / ((1 - share) / factor + share))
    return np.array(out, dtype=np.float32)


def _add_matrix(writer: gguf.GGUFWriter, name: str, w: np.ndarray, kind: str) -> None:
    if kind == "F32":
        writer.add_tensor(name, w.astype(np.float32))
    elif kind == "F16":
        writer.add_tensor(name, w.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(w.astype(np.float32), qtype),
                          raw_dtype=qtype)


def _add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Path) -> None:
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"]: t["id"] for t in tok["added_tokens"] if t["special"]}
    tok_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in tok["model"]["merges"]])
    writer.add_bos_token_id(special[tok_config["bos_token"]])
    writer.add_eos_token_id(special[tok_config["eos_token"]])
    writer.add_unk_token_id(special[tok_config["unk_token"]])
    writer.add_pad_token_id(special[tok_config["pad_token"]])
    writer.add_add_bos_token(True)
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])
