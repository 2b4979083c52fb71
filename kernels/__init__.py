"""Attention kernels for the paged KV cache: one dispatch point for Triton and the reference.

``store_kv`` and ``paged_attention`` keep the signatures documented in ``kernels/reference.py``.
The backend is ``auto`` (Triton for CUDA tensors when triton is installed, the PyTorch reference
otherwise), ``triton`` or ``reference``; it comes from ``KERNELS_BACKEND`` or ``set_backend``.
Triton is imported only when first used, so this package imports where triton is missing.
The choice is logged once, at first use; the hot path reads only cached module state.
"""
import importlib.util
import logging
import os

import torch

from kernels.reference import paged_attention_reference, store_kv_reference

__all__ = ["BACKENDS", "get_backend", "paged_attention", "set_backend", "store_kv"]

BACKENDS = ("auto", "triton", "reference")
_log = logging.getLogger("kernels")
_has_triton = importlib.util.find_spec("triton") is not None
_backend = "auto"
_triton_fns = None      # (store_kv_triton, paged_attention_triton) once imported
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
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write each token's K/V into its cache slot; slots of -1 are skipped."""
    if _use_triton(key):
        _triton_fns[0](key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_reference(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged K/V; returns query's shape."""
    if _use_triton(query):
        return _triton_fns[1](query, k_cache, v_cache, block_tables, seq_lens,
                              query_start_loc, scale)
    return paged_attention_reference(query, k_cache, v_cache, block_tables, seq_lens,
                                     query_start_loc, scale)


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
    from kernels.triton_paged_attention import paged_attention_triton
    from kernels.triton_store_kv import store_kv_triton
    _triton_fns = (store_kv_triton, paged_attention_triton)


def _backend_from_env() -> str:
    name = os.environ.get("KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"KERNELS_BACKEND={name!r}; expected one of {BACKENDS}")
    return name


_backend = _backend_from_env()
