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
"""
import torch
import torch.nn.functional as F

_DECODE_GROUP = 16     # decode rows per batched call


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write each token's K/V into its cache slot; slots of -1 are skipped."""
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        key, value, slots = key[keep], value[keep], slots[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def paged_attention_reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged K/V; returns query's shape.

    Decode rows (q_len 1) are sorted by context length and computed in groups, each padded to
    its longest context and masked, so padding stays small; sequences with longer queries
    (prefill chunks) one at a time, so no work is spent on padding queries.
    """
    out = torch.empty_like(query)
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    lens = seq_lens.tolist()
    starts = query_start_loc[:-1].tolist()
    decode = sorted((i for i, n in enumerate(q_lens) if n == 1), key=lambda i: lens[i])
    for g in range(0, len(decode), _DECODE_GROUP):
        group = decode[g:g + _DECODE_GROUP]
        rows = torch.tensor([starts[i] for i in group], device=query.device)
        ctx = lens[group[-1]]
        k, v = _gather(k_cache, v_cache, block_tables[group], ctx)
        lens_t = torch.tensor([lens[i] for i in group], device=query.device)
        mask = torch.arange(ctx, device=query.device)[None, :] < lens_t[:, None]
        out[rows] = _attend(query[rows].unsqueeze(1), k, v, mask[:, None, :], scale).squeeze(1)
    for i, q_len in enumerate(q_lens):
        if q_len <= 1:
            continue
        seq_len, start = lens[i], starts[i]
        k, v = _gather(k_cache, v_cache, block_tables[i:i + 1], seq_len)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        mask = q_pos[:, None] >= torch.arange(seq_len, device=query.device)[None, :]
        out[start:start + q_len] = _attend(query[start:start + q_len].unsqueeze(0), k, v,
                                           mask[None], scale).squeeze(0)
    return out


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of ``ctx`` leading positions for each row of ``block_tables``: ``[n, ctx, kvh, d]``."""
    block_size = k_cache.shape[1]
    num = -(-ctx // block_size)
    ids = block_tables[:, :num].long().clamp(min=0)
    k = k_cache[ids].flatten(1, 2)[:, :ctx]
    v = v_cache[ids].flatten(1, 2)[:, :ctx]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q ``[n, lq, h, d]``, k/v ``[n, lk, kvh, d]``, mask ``[n, lq, lk]`` -> ``[n, lq, h, d]``.

    fp32 math whatever the storage dtype; query heads share KV heads in groups (GQA).
    """
    o = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return o.transpose(1, 2).to(q.dtype)
