"""Kernels for the paged KV cache and linear layers: one dispatch point for Triton, the
compiled CPU kernels and the reference.

``store_kv`` and ``paged_attention`` keep the signatures documented in ``kernels/reference.py``.
The backend is ``auto`` (Triton for CUDA tensors when triton is installed; for CPU tensors the
compiled CPU kernels of ``kernels/cpu/`` when they build, else the PyTorch reference), ``triton``
or ``reference`` (pure PyTorch); it comes from ``KERNELS_BACKEND`` or ``set_backend``.
``pack_linear`` packs a linear layer's weight once, in its format, for the kernels of its
device: on CPU under ``auto`` the compiled CPU kernels (dense fp32 / bf16 / fp16, or quantized
``Lanes``: GGUF block types, int8 / int4 at load, ``kernels/lanes.py``) into huge pages
(``HugePageArena``, which the KV cache uses too); under Triton (CUDA tensors, or the backend
forced) quantized ``Lanes`` for the weight-only GEMM of ``kernels/triton_linear.py``.
``linear_packed`` runs the layer on it and ``embedding_packed`` looks embedding rows up in it
(a tied head's table is the head's packed weight); elsewhere, and for dense weights under
Triton, the model keeps dense weights (``Lanes.dequantize``) and
``torch.nn.functional.linear``. ``bind_decoder`` binds a decoder's CPU-packed weights once
into a compiled object that runs a step's embedding lookup, layers and final norm in one call
(the model's CPU path); ``argmax_rows`` and ``finite_rows`` scan logits rows in one pass each.
Triton is imported only when first used, so this package imports where triton is missing.
The choice is logged once, at first use; the hot path reads only cached module state.
"""
import importlib.util
import logging
import os

import torch

from kernels import cpu_build
from kernels.huge_pages import HugePageArena, release_freed_heap
from kernels.lanes import GGUF_LANE_TYPES, Lanes, from_gguf, quantize
from kernels.reference import paged_attention_reference, store_kv_reference

__all__ = ["BACKENDS", "GGUF_LANE_TYPES", "HugePageArena", "Lanes", "argmax_rows",
           "bind_decoder", "embedding_packed", "finite_rows", "from_gguf", "get_backend",
           "linear_packed", "pack_linear", "paged_attention", "quantize", "release_freed_heap",
           "set_backend",
           "store_kv"]

BACKENDS = ("auto", "triton", "reference")
_log = logging.getLogger("kernels")
_has_triton = importlib.util.find_spec("triton") is not None
_backend = "auto"
_triton_fns = None      # (store_kv, paged_attention, pack, linear, rows_of) of Triton, imported
_cpu_fns = None     # (paged_attention_cpu, linear_packed_cpu, store_kv_cpu) once built; () if not
_logged: set[bool] = set()      # choices (use triton or not) already logged since set_backend


def set_backend(name: str) -> None:
    """Force ``triton`` or ``reference``, or go back to ``auto``; raises if triton is missing."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; expected one of {BACKENDS}")
    if name == "triton":
        _load_triton()
    _backend = name
    _logged.clear()


def get_backend() -> str:
    """The requested backend name (``auto`` resolves per call from the tensors' device)."""
    return _backend


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
             v_scale: float = 1.0) -> None:
    """Write each token's K/V into its cache slot, rounded to the cache's dtype (fp8: scaled
    by ``1 / k_scale``, ``1 / v_scale``); slots of -1 are skipped."""
    args = (key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if _use_triton(key):
        _triton_fns[0](*args)
    elif _use_cpu(key):
        _cpu_fns[2](*args)
    else:
        store_kv_reference(*args)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged K/V (fp8 entries times
    ``k_scale``, ``v_scale``); returns query's shape."""
    args = (query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale,
            v_scale)
    if _use_triton(query):
        return _triton_fns[1](*args)
    if _use_cpu(query):
        return _cpu_fns[0](*args)
    return paged_attention_reference(*args)


def pack_linear(weight: torch.Tensor | Lanes, arena: HugePageArena | None = None):
    """``weight [out, in]`` (a dense tensor or quantized ``Lanes``) packed for
    ``linear_packed``: quantized lanes under Triton as a ``triton_linear.TritonLanes`` on
    their device; on CPU under ``auto`` a ``cpu_linear.PackedWeight`` in ``arena`` (a fresh
    one if None); None where neither applies (dense weights under Triton, the reference
    forced, or the CPU kernels did not build)."""
    lanes = isinstance(weight, Lanes)
    if _use_triton(weight.values if lanes else weight):
        return _triton_fns[2](weight) if lanes else None
    if not _use_cpu(weight.values if lanes else weight):
        return None
    from kernels.cpu_linear import pack
    return pack(weight, arena or HugePageArena())


def linear_packed(x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x [..., in]`` (fp32 on CPU; fp16 / bf16 / fp32 under
    Triton) and ``packed = pack_linear(weight)`` on ``x``'s device and backend."""
    if _use_triton(x):
        return _triton_fns[3](x, packed, bias)
    return _cpu_fns[1](x, packed, bias)


def embedding_packed(ids: torch.Tensor, packed) -> torch.Tensor:
    """Rows ``ids`` of ``packed = pack_linear(table)`` in fp32 (the embedding lookup in the
    table's own format), on ``ids``' device and backend."""
    if _use_triton(ids):
        return _triton_fns[4](ids, packed)
    from kernels.cpu_linear import embedding_packed_cpu
    return embedding_packed_cpu(ids, packed)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum of ``x [rows, n]`` (NaN counts as the maximum),
    as ``x.argmax(dim=-1)``: one vectorized pass for fp32 on CPU (torch's is ~9x slower)."""
    if _scannable(x):
        return torch.ops.tsllm_cpu.argmax_rows(x.contiguous())
    return x.argmax(dim=-1)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x [rows, n]``: whether every value is finite (a bool tensor), in one
    vectorized pass for fp32 on CPU; elsewhere a row's max and min, which propagate NaN and
    show +-inf."""
    if _scannable(x):
        return torch.ops.tsllm_cpu.finite_rows(x.contiguous())
    return torch.isfinite(x.amax(dim=-1)) & torch.isfinite(x.amin(dim=-1))


def _scannable(x: torch.Tensor) -> bool:
    """Rows the compiled logits scans take: non-empty fp32 ``[rows, n]`` on CPU."""
    return x.dtype == torch.float32 and x.dim() == 2 and x.numel() > 0 and _use_cpu(x)


def bind_decoder(embed, weights: list, extras: list[torch.Tensor | None],
                 final_norm: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 eps: float, scale: float, heads: tuple[int, int, int]
                 ) -> torch.ScriptObject | None:
    """A decoder's weights bound once into a compiled ``Decoder`` (``cpu/decoder.cpp``
    lists them: the packed embedding table, six weights and six extras per layer, linears
    as ``pack_linear`` gave them; ``rope`` is the cos and sin tables; ``heads`` is (query
    heads, KV heads, head dim)). Its ``forward(input_ids,
    positions, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc)``
    (int32 step inputs; caches ``[layers, blocks, block_size, kv_heads, head_dim]``) runs the
    embedding lookup, every layer and the final norm in one call and returns the normed
    hidden states. ``shard(group_name, vocab_start, vocab)`` then makes it a tensor-parallel
    shard: its partial rows are summed over that torch.distributed group after the
    embedding lookup (its table holds rows from ``vocab_start`` of ``vocab``), the output
    projection and the down projection. None where the weights are not packed for the CPU
    (Triton's)."""
    from kernels.cpu_linear import PackedWeight
    linears = [w for w in weights if not isinstance(w, torch.Tensor)]
    if not all(isinstance(w, PackedWeight) for w in [embed, *linears]):
        return None
    plain = [w if isinstance(w, torch.Tensor) else w.values for w in weights]
    quant = [t for w in linears for t in w.tensors[1:]]
    sizes = [w.out_features for w in linears[:4]]
    return torch.classes.tsllm_cpu.Decoder(embed.tensors, embed.out_features, plain, extras,
                                           quant, final_norm, *rope, sizes, eps, scale,
                                           list(heads))


def _use_cpu(t: torch.Tensor) -> bool:
    """The compiled CPU kernels (built at first use; a warning and False if they cannot be)."""
    global _cpu_fns
    if _backend != "auto" or t.device.type != "cpu":
        return False
    if _cpu_fns is None:
        _cpu_fns = ()
        if cpu_build.load():
            from kernels.cpu_attention import paged_attention_cpu, store_kv_cpu
            from kernels.cpu_linear import linear_packed_cpu
            _cpu_fns = (paged_attention_cpu, linear_packed_cpu, store_kv_cpu)
            _log.info("kernels backend: compiled CPU kernels (requested auto, device cpu)")
    return bool(_cpu_fns)


def _use_triton(t: torch.Tensor) -> bool:
    use = _backend == "triton" or (_backend == "auto" and _has_triton and t.is_cuda)
    if use not in _logged:
        _first_use(use, t)
    return use


def _first_use(use: bool, t: torch.Tensor) -> None:
    if use:
        _load_triton()
    _logged.add(use)
    _log.info("kernels backend: %s (requested %s, device %s)",
              "triton" if use else "reference", _backend, t.device.type)


def _load_triton() -> None:
    global _triton_fns
    if _triton_fns is not None:
        return
    if not _has_triton:
        raise RuntimeError("kernels backend 'triton' requested but triton is not installed "
                           "(pip install triton, or use backend 'reference' / 'auto')")
    from kernels.triton_linear import linear_triton, pack, rows_of
    from kernels.triton_paged_attention import paged_attention_triton
    from kernels.triton_store_kv import store_kv_triton
    _triton_fns = (store_kv_triton, paged_attention_triton, pack, linear_triton, rows_of)


def _backend_from_env() -> str:
    name = os.environ.get("KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"KERNELS_BACKEND={name!r}; expected one of {BACKENDS}")
    return name


_backend = _backend_from_env()
