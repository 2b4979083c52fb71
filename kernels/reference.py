"""Pure-PyTorch paged attention and KV-cache store: the reference the Triton kernels must match.

Owns the two kernel signatures the engine calls (see ``kernels/__init__.py`` for dispatch).
Shapes, shared by both implementations:

- ``key``/``value``: ``[num_tokens, num_kv_heads, head_dim]`` new K/V of this step.
- ``k_cache``/``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
- ``slot_mapping``: ``[num_tokens]`` int, ``block * block_size + offset``; ``-1`` skips the token.
- ``query``: ``[num_tokens, num_heads, head_dim]``, sequences laid end to end.
- ``query_start_loc``: ``[num_seqs + 1]`` int32 prefix sums of per-sequence query lengths.
- ``seq_lens``: ``[num_seqs]`` int32 tokens in the cache for each sequence *including* this
  step's queries; query token ``i`` of a sequence sits at position ``seq_len - q_len + i``.
- ``block_tables``: ``[num_seqs, max_blocks]`` int32 block ids (entries past a sequence's
  blocks are ignored).
- ``k_scale``/``v_scale``: per-tensor scales of an fp8 (e4m3) cache: a stored value ``c`` means
  ``c * scale``. Caches of other dtypes ignore them.

Every cache dtype rounds to nearest even when stored (``to_cache``) and is read in fp32
(``from_cache``); fp8 saturates at +-448 (e4m3's largest finite value) instead of overflowing
to NaN.
"""
import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``x`` as a cache of ``dtype`` stores it; fp8: times the fp32 reciprocal of ``scale``,
    saturated, rounded."""
    if dtype != FP8:
        return x.to(dtype)
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def from_cache(c: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The fp32 values cache entries ``c`` stand for."""
    return c.float() * scale if c.dtype == FP8 else c.float()


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as bytes: copies and gathers of float8 are not implemented everywhere."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                       v_scale: float = 1.0) -> None:
    """Write each token's K/V into its cache slot; slots of -1 are skipped."""
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        key, value, slots = key[keep], value[keep], slots[keep]
    for cache, x, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        _raw(cache).view(-1, *cache.shape[2:]).index_copy_(
            0, slots, _raw(to_cache(x, cache.dtype, scale)))


def paged_attention_reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              query_start_loc: torch.Tensor, scale: float, k_scale: float = 1.0,
                              v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged K/V; returns query's shape.

    One sequence at a time, over exactly its own blocks: on CPU this beats batching padded
    sequences, because one sequence's K/V stays in cache between the gather and the attention.
    """
    out = torch.empty_like(query)
    bounds = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = bounds[i], bounds[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k, v = _gather(k_cache, v_cache, block_tables[i:i + 1], seq_len)
        mask = None
        if 1 < q_len < seq_len:     # queries sit at the end: bottom-right aligned causal mask
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            mask = q_pos[:, None] >= torch.arange(seq_len, device=query.device)[None, :]
        out[start:end] = _attend(query[start:end], from_cache(k[0], k_scale),
                                 from_cache(v[0], v_scale), mask, q_len > 1 and mask is None, scale)
    return out


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of ``ctx`` leading positions for each row of ``block_tables``: ``[n, ctx, kvh, d]``."""
    block_size = k_cache.shape[1]
    num = -(-ctx // block_size)
    ids = block_tables[:, :num].long().clamp(min=0).flatten()
    shape = (block_tables.shape[0], num * block_size, *k_cache.shape[2:])
    # index_select copies whole blocks; advanced indexing (k_cache[ids]) is ~2x slower on CPU.
    k = _raw(k_cache).index_select(0, ids).view(k_cache.dtype).view(shape)[:, :ctx]
    v = _raw(v_cache).index_select(0, ids).view(v_cache.dtype).view(shape)[:, :ctx]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            causal: bool, scale: float) -> torch.Tensor:
    """q ``[lq, h, d]``, k/v ``[lk, kvh, d]`` (fp32) -> ``[lq, h, d]``, in fp32 whatever the
    storage; query heads share KV heads in groups (GQA)."""
    # Batched 4-D inputs: 3-D ones take a slower path in SDPA on CPU.
    o = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None],
        v.float().transpose(0, 1)[None], attn_mask=mask, is_causal=causal, scale=scale,
        enable_gqa=True)
    return o[0].transpose(0, 1).to(q.dtype)
