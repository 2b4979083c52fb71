"""Triton paged attention over one flat batch of prefill chunks and decode rows, with GQA.

Same signature and semantics as ``paged_attention_reference`` in ``kernels/reference.py``.
One program computes a tile of ``ROWS`` rows: ``block_q`` query tokens of one sequence times
the query heads that share one KV head (the group, padded to a power of two), so decode rows
with small groups still give ``tl.dot`` at least 16 rows. Programs find their sequence by
binary search over ``query_start_loc``, so the launch needs no device-to-host copy. Long
decode contexts may be split across programs (flash-decoding) and merged by log-sum-exp in a
second kernel. Only the tile shape and dtypes are compiled in; group, block size, head size and
split count are runtime values, so the binaries are few and all checked by
``kernels/triton_variants.py`` (``plan_attention`` is the one place that picks them).
An fp8 (e4m3) cache comes as bytes (``kernels/triton_fp8.py``), widened exactly to the query's
16-bit dtype for ``tl.dot``; its scales (and e4m3's 2^8) fold into the score scale and the
output.
Importing this module imports triton; ``kernels/__init__.py`` only does so when it is used.
"""
import math
import os

import torch
import triton
import triton.language as tl

from kernels.reference import FP8
from kernels.triton_fp8 import E4M3_UNIT, from_e4m3
from kernels.triton_launch import Launch, check_aligned, check_head_dim, device_sms

# The interpreter's tl.dot is wrong on bf16 inputs; on a GPU the cache dtype feeds the tensor cores.
_DOT_FP32 = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 32


# Runtime values that vary with the batch or the model but not the code stay unspecialized, so
# one compiled binary serves them all (see kernels/triton_variants.py).
@triton.jit(do_not_specialize=["num_seqs", "group", "group_shift", "block_q_shift",
                               "block_shift", "stride_ls", "stride_lt", "stride_bt"])
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, block_tables_ptr, seq_lens_ptr,
                      query_start_loc_ptr, num_seqs, group, group_shift, block_q_shift,
                      block_shift, head_dim, scale_log2, v_mult,
                      stride_qt, stride_qh, stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
                      stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                      stride_bt,
                      ROWS: tl.constexpr, DIM_P: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_FP32: tl.constexpr):
    # Row r of the tile is query token r >> group_shift of the tile, head r & (group_p - 1)
    # of the group; block_q = ROWS >> group_shift tokens per tile.
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # Sequence s owns tiles [start_loc[s] // block_q + s, start_loc[s+1] // block_q + s + 1):
    # at least cdiv(q_len, block_q) of them, and the total is known on the host.
    lo = num_seqs * 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = (tl.load(query_start_loc_ptr + mid) >> block_q_shift) + mid
        lo = tl.where(first <= tile_id, mid + 1, lo)
        hi = tl.where(first <= tile_id, hi, mid)
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile = tile_id - ((q_start >> block_q_shift) + seq)
    if tile << block_q_shift >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, ROWS)
    q_idx = (tile << block_q_shift) + (rows >> group_shift)
    in_group = rows & ((1 << group_shift) - 1)
    head = kv_head * group + in_group
    row_ok = (q_idx < q_len) & (in_group < group)
    token = (q_start + q_idx).to(tl.int64)
    q_pos = seq_len - q_len + q_idx
    dims = tl.arange(0, DIM_P)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    elif k_ptr.dtype.element_ty != tl.uint8:        # fp8 caches widen to the query's dtype
        q = q.to(k_ptr.dtype.element_ty)

    # This tile's causal horizon, cut into equal BLOCK_N-aligned parts, one per split.
    kv_end = tl.minimum(seq_len, seq_len - q_len + ((tile + 1) << block_q_shift))
    per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * per_split
    kv_hi = tl.minimum(kv_end, kv_lo + per_split)

    # A finite floor keeps fully masked rows free of (-inf) - (-inf).
    m_i = tl.full([ROWS], -1.0e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DIM_P], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    block_mask = (1 << block_shift) - 1
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + cols
        pos_ok = pos < kv_hi
        block = tl.load(table + (pos >> block_shift), mask=pos_ok, other=0).to(tl.int64)
        k_off = block * stride_kb + (pos & block_mask) * stride_ks + kv_head * stride_kh
        v_off = block * stride_vb + (pos & block_mask) * stride_vs + kv_head * stride_vh
        k_t = tl.load(k_ptr + k_off[None, :] + dims[:, None],
                      mask=pos_ok[None, :] & dim_ok[:, None], other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + dims[None, :],
                    mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)
        if k_ptr.dtype.element_ty == tl.uint8:
            k_t = from_e4m3(k_t).to(q.dtype)
            v = from_e4m3(v).to(q.dtype)
        elif DOT_FP32:
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
    if k_ptr.dtype.element_ty == tl.uint8:
        out = out * v_mult
    o_ptrs = (o_ptr + split * stride_os + token[:, None] * stride_ot + head[:, None] * stride_oh
              + dims[None, :])
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    if num_splits > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + split * stride_ls + token * stride_lt + head, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits", "stride_ls", "stride_lt"])
def _merge_kernel(part_ptr, lse_ptr, out_ptr, num_splits, head_dim,
                  stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
                  DIM_P: tl.constexpr, SPLITS_P: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P)
    dims = tl.arange(0, DIM_P)
    lse = tl.load(lse_ptr + splits * stride_ls + token * stride_lt + head,
                  mask=splits < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse - top)
    part = tl.load(part_ptr + splits[:, None] * stride_ps + token * stride_pt + head * stride_ph
                   + dims[None, :], mask=(weight[:, None] > 0) & (dims[None, :] < head_dim),
                   other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(part * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


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


def tile_config(dtype: torch.dtype, dim_p: int, decode: bool, fp8: bool = False
                ) -> tuple[int, int, dict]:
    """(ROWS, BLOCK_N, options) of one program for ``dtype`` dots (an ``fp8`` cache's are the
    query's): query rows (tokens x padded group heads) and
    K/V positions per loop step, sized so no fp16/bf16 tile spills registers (docs/kernels.md;
    fp8 decode tiles of 64 positions spilled 8 bytes on sm_80 at head size 64: 32 do not).
    Decode tiles have the 16 rows ``tl.dot`` needs at the least. fp32 has no tensor-core dot
    (``ieee`` precision runs on FMA units): its prefill and decode tiles are one small tile."""
    if dtype == torch.float32:
        return 16, 32, {"num_warps": 4 if dim_p <= 64 else 8}
    block_n = 64 if dim_p <= 128 else 32
    if decode:
        return 16, 32 if fp8 else block_n, {"num_warps": 4}
    return 64, block_n, {"num_warps": 4 if dim_p <= 64 else 8}


def plan_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   query_start_loc: torch.Tensor, scale: float, k_scale: float = 1.0,
                   v_scale: float = 1.0, *, num_kv_splits: int | None = None,
                   block_q: int | None = None, num_sms: int | None = None
                   ) -> tuple[list[Launch], torch.Tensor]:
    """The launches that compute ``paged_attention_triton`` (attention, then the merge when
    split), and the output they write. Allocates the output and split buffers only."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert num_heads % num_kv_heads == 0 and query_start_loc.shape == (num_seqs + 1,)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be dense"
    check_head_dim(head_dim)
    if query.stride(-1) != 1:
        query = query.contiguous()
    # The in-kernel binary search keeps its bounds in int32 (no-ops for the documented dtype).
    seq_lens, query_start_loc = seq_lens.to(torch.int32), query_start_loc.to(torch.int32)
    check_aligned(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return [], out
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    dim_p = triton.next_power_of_2(head_dim)
    decode = num_tokens == num_seqs
    fp8 = k_cache.dtype == FP8
    assert not fp8 or query.dtype in (torch.float16, torch.bfloat16), \
        "an fp8 cache takes fp16 or bf16 queries"
    if fp8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        scale, v_mult = scale * k_scale * E4M3_UNIT, v_scale * E4M3_UNIT
    else:
        v_mult = 1.0
    rows, block_n, options = tile_config(query.dtype if fp8 else k_cache.dtype, dim_p, decode,
                                         fp8)
    if block_q is None:
        block_q = max(1, rows // group_p)
    assert block_q & (block_q - 1) == 0, "block_q must be a power of two"
    rows = block_q * group_p
    assert rows >= 16 or _DOT_FP32, "tl.dot on a GPU needs at least 16 query rows"
    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(num_seqs, num_tokens, num_kv_heads,
                                             block_tables.shape[1] * block_size,
                                             num_sms or device_sms(query.device))
    assert 1 <= num_kv_splits <= _MAX_SPLITS
    split = num_kv_splits > 1
    if split:
        part = torch.empty(num_kv_splits, num_tokens, num_heads, head_dim,
                           dtype=torch.float32, device=query.device)
        lse = torch.full((num_kv_splits, num_tokens, num_heads), float("-inf"),
                         dtype=torch.float32, device=query.device)
        target, stride_os = part, part.stride(0)
    else:
        target, lse, stride_os = out, out, 0
    attention = Launch(_attention_kernel, (num_tokens // block_q + num_seqs, num_kv_heads,
                                           num_kv_splits), dict(
        q_ptr=query, k_ptr=k_cache, v_ptr=v_cache, o_ptr=target, lse_ptr=lse,
        block_tables_ptr=block_tables, seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc, num_seqs=num_seqs, group=group,
        group_shift=_log2(group_p), block_q_shift=_log2(block_q),
        block_shift=_log2(block_size), head_dim=head_dim, scale_log2=scale * _LOG2E,
        v_mult=v_mult,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_os=stride_os,
        stride_ot=target.stride(-3), stride_oh=target.stride(-2),
        stride_ls=num_tokens * num_heads, stride_lt=num_heads,
        stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_bt=block_tables.stride(0)),
        dict(ROWS=rows, DIM_P=dim_p, BLOCK_N=block_n, DOT_FP32=_DOT_FP32), options)
    if not split:
        return [attention], out
    merge = Launch(_merge_kernel, (num_tokens, num_heads), dict(
        part_ptr=part, lse_ptr=lse, out_ptr=out, num_splits=num_kv_splits, head_dim=head_dim,
        stride_ps=part.stride(0), stride_pt=part.stride(1), stride_ph=part.stride(2),
        stride_ls=num_tokens * num_heads, stride_lt=num_heads,
        stride_ot=out.stride(0), stride_oh=out.stride(1)),
        dict(DIM_P=dim_p, SPLITS_P=_MAX_SPLITS))
    return [attention, merge], out


def _log2(n: int) -> int:
    return n.bit_length() - 1


def paged_attention_triton(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float, k_scale: float = 1.0,
                           v_scale: float = 1.0, *, num_kv_splits: int | None = None,
                           block_q: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged K/V; returns query's shape.

    ``num_kv_splits`` and ``block_q`` override the heuristics (tests use them to force paths).
    """
    launches, out = plan_attention(query, k_cache, v_cache, block_tables, seq_lens,
                                   query_start_loc, scale, k_scale, v_scale,
                                   num_kv_splits=num_kv_splits, block_q=block_q)
    for launch in launches:
        launch()
    return out
