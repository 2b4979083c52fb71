"""Triton paged attention over one flat batch of prefill chunks and decode rows, with GQA.

Same signature and semantics as ``paged_attention_reference`` in ``kernels/reference.py``.
One program computes a tile of ``BLOCK_Q`` query tokens of one sequence times the query heads
that share one KV head (the group, padded to a power of two), so decode rows with small groups
still give ``tl.dot`` at least 16 rows. Programs find their sequence by binary search over
``query_start_loc``, so the launch needs no device-to-host copy. Long decode contexts may be
split across programs (flash-decoding) and merged by log-sum-exp in a second kernel.
Importing this module imports triton; ``kernels/__init__.py`` only does so when it is used.
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl

# The interpreter's tl.dot is wrong on bf16 inputs; on a GPU the cache dtype feeds the tensor cores.
_DOT_FP32 = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 32


@triton.jit(do_not_specialize=["num_seqs"])
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, block_tables_ptr, seq_lens_ptr,
                      query_start_loc_ptr, num_seqs, scale_log2,
                      stride_qt, stride_qh, stride_os, stride_ot, stride_oh, stride_ls,
                      stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                      stride_bt,
                      NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                      HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                      DOT_FP32: tl.constexpr):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # Sequence s owns tiles [start_loc[s] // BLOCK_Q + s, start_loc[s+1] // BLOCK_Q + s + 1):
    # at least cdiv(q_len, BLOCK_Q) of them, and the total is known on the host.
    lo = num_seqs * 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= tile_id, mid + 1, lo)
        hi = tl.where(first <= tile_id, hi, mid)
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile = tile_id - (q_start // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_Q * GROUP_P)
    q_idx = tile * BLOCK_Q + rows // GROUP_P
    head = kv_head * GROUP + rows % GROUP_P
    row_ok = (q_idx < q_len) & (rows % GROUP_P < GROUP)
    token = (q_start + q_idx).to(tl.int64)
    q_pos = seq_len - q_len + q_idx
    dims = tl.arange(0, DIM_P)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)

    # This tile's causal horizon, cut into equal BLOCK_N-aligned parts, one per split.
    kv_end = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_Q)
    per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * per_split
    kv_hi = tl.minimum(kv_end, kv_lo + per_split)

    # A finite floor keeps fully masked rows free of (-inf) - (-inf).
    m_i = tl.full([BLOCK_Q * GROUP_P], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P, DIM_P], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + cols
        pos_ok = pos < kv_hi
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        k_off = block * stride_kb + (pos % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        v_off = block * stride_vb + (pos % BLOCK_SIZE) * stride_vs + kv_head * stride_vh
        k_t = tl.load(k_ptr + k_off[None, :] + dims[:, None],
                      mask=pos_ok[None, :] & dim_ok[:, None], other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + dims[None, :],
                    mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_FP32:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k_t, input_precision="ieee") * scale_log2
        s = tl.where((pos[None, :] <= q_pos[:, None]) & pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = (o_ptr + split * stride_os + token[:, None] * stride_ot + head[:, None] * stride_oh
              + dims[None, :])
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + split * stride_ls + token * NUM_HEADS + head, lse, mask=row_ok)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, num_splits,
                  stride_ps, stride_pt, stride_ph, stride_ls, stride_ot, stride_oh,
                  NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr,
                  SPLITS_P: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P)
    dims = tl.arange(0, DIM_P)
    lse = tl.load(lse_ptr + splits * stride_ls + token * NUM_HEADS + head,
                  mask=splits < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse - top)
    part = tl.load(part_ptr + splits[:, None] * stride_ps + token * stride_pt + head * stride_ph
                   + dims[None, :], mask=(weight[:, None] > 0) & (dims[None, :] < HEAD_DIM),
                   other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(part * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def choose_num_kv_splits(num_seqs: int, num_tokens: int, num_kv_heads: int, max_context: int,
                         num_sms: int) -> int:
    """Flash-decoding split count: only for pure decode batches too small to fill the device.

    ``max_context`` is an upper bound (block table width * block size): reading the real
    lengths would cost a device-to-host copy per layer.
    """
    programs = num_seqs * num_kv_heads
    if num_tokens != num_seqs or programs >= num_sms:
        return 1
    splits = min(-(-2 * num_sms // programs), max_context // _MIN_SPLIT_TOKENS, _MAX_SPLITS)
    return 1 if splits < 2 else 1 << int(math.log2(splits))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_attention_triton(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float, *,
                           num_kv_splits: int | None = None,
                           block_q: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged K/V; returns query's shape.

    ``num_kv_splits`` and ``block_q`` override the heuristics (tests use them to force paths).
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert num_heads % num_kv_heads == 0 and query_start_loc.shape == (num_seqs + 1,)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be dense"
    if query.stride(-1) != 1:
        query = query.contiguous()
    # The in-kernel binary search keeps its bounds in int32 (no-ops for the documented dtype).
    seq_lens, query_start_loc = seq_lens.to(torch.int32), query_start_loc.to(torch.int32)
    out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    dim_p = max(16, triton.next_power_of_2(head_dim))
    if block_q is None:
        block_q = max(1, (16 if num_tokens == num_seqs else 64) // group_p)
    assert block_q * group_p >= 16 or _DOT_FP32, "tl.dot on a GPU needs at least 16 query rows"
    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(num_seqs, num_tokens, num_kv_heads,
                                             block_tables.shape[1] * block_size,
                                             _num_sms(query.device))
    split = num_kv_splits > 1
    if split:
        part = torch.empty(num_kv_splits, num_tokens, num_heads, head_dim,
                           dtype=torch.float32, device=query.device)
        lse = torch.full((num_kv_splits, num_tokens, num_heads), float("-inf"),
                         dtype=torch.float32, device=query.device)
        target, stride_os = part, part.stride(0)
    else:
        target, lse, stride_os = out, out, 0
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_kv_splits)
    _attention_kernel[grid](
        query, k_cache, v_cache, target, lse, block_tables, seq_lens, query_start_loc,
        num_seqs, scale * _LOG2E,
        query.stride(0), query.stride(1), stride_os, target.stride(-3), target.stride(-2),
        num_tokens * num_heads,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, DIM_P=dim_p,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_N=64 if dim_p <= 128 else 32,
        SPLIT=split, DOT_FP32=_DOT_FP32, num_warps=4)
    if split:
        _merge_kernel[(num_tokens, num_heads)](
            part, lse, out, num_kv_splits, part.stride(0), part.stride(1), part.stride(2),
            num_tokens * num_heads, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, DIM_P=dim_p,
            SPLITS_P=triton.next_power_of_2(num_kv_splits))
    return out
