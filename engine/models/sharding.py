"""Tensor-parallel shards of a loaded model: each rank keeps a view of every weight object.

The split, per layer: q/k/v and gate/up are column parallel (output rows split: the rank's
query heads and the KV heads they read, the rank's slice of gate and the same slice of up),
o and down are row parallel (input columns split: each rank's partial outputs are summed by
one all-reduce after each, and their biases are added by rank 0 alone). The embedding and the
head are vocab parallel: rank r holds vocabulary rows ``[r V / tp, (r + 1) V / tp)``; a token
outside them looks up zeros, an all-reduce sums the rows, and the head's logits shards are
gathered at rank 0. When tp exceeds the KV heads, the ranks whose query heads read one KV head
each hold a copy of it. A weight is a dense tensor or ``kernels.Lanes`` (GGUF block types,
int8/int4 at load), sliced by rows or by columns (on group boundaries), so every format shards
the same way and is packed, shard only, afterwards.
"""
import torch

import kernels
from engine.models.decoder import CausalLM, DecoderSpec, Linear

__all__ = ["check", "shard"]


def check(spec: DecoderSpec, size: int) -> None:
    """Raise a ValueError naming both numbers if ``size`` ranks cannot split this model."""
    if spec.num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the {spec.num_heads} "
                         "attention heads")
    if spec.num_kv_heads % size and size % spec.num_kv_heads:
        raise ValueError(f"tensor_parallel_size {size} and the {spec.num_kv_heads} KV heads: "
                         "one must divide the other (KV heads are split, or replicated when "
                         "there are fewer than ranks)")
    for what, n in (("intermediate_size", spec.intermediate_size),
                    ("vocab_size", spec.vocab_size)):
        if n % size:
            raise ValueError(f"tensor_parallel_size {size} does not divide the {what} {n}")


def shard(model: CausalLM, rank: int, size: int, group) -> None:
    """Keep only rank ``rank``'s shard of every weight of ``model`` (loaded, not yet packed)
    and give the row-parallel layers, the embedding and the head ``group`` to reduce over."""
    spec = model.spec
    check(spec, size)
    h, kvh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    heads = h // size
    kv_heads = max(1, kvh // size)
    first_kv = rank * kvh // size       # replicated: the KV head this rank's queries read
    q = torch.arange(rank * heads * d, (rank + 1) * heads * d)
    k = h * d + torch.arange(first_kv * d, (first_kv + kv_heads) * d)
    qkv = torch.cat([q, k, k + kvh * d])
    inter = spec.intermediate_size // size
    gate = torch.arange(rank * inter, (rank + 1) * inter)
    gate_up = torch.cat([gate, gate + spec.intermediate_size])
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _rows(attn.qkv_proj, qkv)
        _columns(attn.o_proj, rank * heads * d, (rank + 1) * heads * d, rank, group)
        _rows(mlp.gate_up_proj, gate_up)
        _columns(mlp.down_proj, rank * inter, (rank + 1) * inter, rank, group)
        attn.q_size, attn.kv_size = heads * d, kv_heads * d
        attn.attn.num_heads, attn.attn.num_kv_heads = heads, kv_heads
    vocab = spec.vocab_size // size
    rows = slice(rank * vocab, (rank + 1) * vocab)
    embed = model.model.embed_tokens
    if getattr(embed, "stored", None) is not None:
        embed.stored = _view_rows(embed.stored, rows)
    else:
        embed.weight = torch.nn.Parameter(embed.weight[rows], requires_grad=False)
    if spec.tie_word_embeddings:
        model.lm_head.weight = embed.weight
    else:
        _rows(model.lm_head, rows)
    model.model.vocab_start, model.model.group = rank * vocab, group
    model.group = group


def _rows(linear: Linear, index: torch.Tensor | slice) -> None:
    """A column-parallel layer: these output rows (and their bias)."""
    _set(linear, _view_rows(_weight(linear), index))
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias[index], requires_grad=False)


def _columns(linear: Linear, start: int, stop: int, rank: int, group) -> None:
    """A row-parallel layer: inputs ``start:stop``; its bias stays with rank 0 only."""
    w = _weight(linear)
    try:
        view = w.columns(start, stop) if isinstance(w, kernels.Lanes) else w[:, start:stop]
    except ValueError as exc:
        raise ValueError(f"tensor parallel shard of a row-parallel layer: {exc}") from None
    _set(linear, view)
    if linear.bias is not None and rank != 0:
        linear.bias = None
    linear.group = group


def _weight(linear: Linear):
    return linear.stored if linear.stored is not None else linear.weight


def _view_rows(w, index: torch.Tensor | slice):
    return w.rows(index) if isinstance(w, kernels.Lanes) else w[index]


def _set(linear: Linear, w) -> None:
    if linear.stored is not None:
        linear.stored = w
    else:
        linear.weight = torch.nn.Parameter(w, requires_grad=False)
    shape = w.shape
    linear.out_features, linear.in_features = shape[0], shape[1]
