"""Quantized weight matrices as integer lanes: one mechanism for every quantized format.

A ``Lanes`` holds a weight ``[n, k]`` as small integers (``values``, int8: 0..15 for
``bits`` 4, -128..127 for ``bits`` 8) with an fp32 scale and an optional fp32 min per group of
``group`` consecutive inputs of a row: ``w = values * scale + min``, rounded once. The compiled
kernels pack 4-bit lanes two to a byte and 8-bit lanes one to a byte (``kernels/cpu_linear.py``)
and decode them in registers; ``dequantize`` is the reference.

GGUF's block types map onto lanes without loss (``from_gguf``): the block's scale and min are
read from its header, the integers recovered from gguf's own dequantization, and the round
trip is checked to be bit-exact, so the kernels compute on exactly the weights that gguf's
reader (and transformers, which uses it) produces:

| GGUF type | bits | group | scale | min |
|---|---|---|---|---|
| Q8_0 | 8 | 32 | d | - |
| Q4_0 | 4 | 32 | d | -8 d |
| Q4_1 | 4 | 32 | d | m |
| Q5_0 | 8 | 32 | d | - (values -16..15) |
| Q5_1 | 8 | 32 | d | m |
| Q4_K | 4 | 32 | d sc | -dmin mn (6-bit sc, mn per 32) |
| Q5_K | 8 | 32 | d sc | -dmin mn |
| Q6_K | 8 | 16 | d sc | - (values -32..31) |

``quantize`` makes lanes from a dense weight at load: symmetric per-group int8 (scale
max|w| / 127) or int4 (as GGUF's Q4_0: the group's largest-magnitude weight w* maps to -8, scale
w* / -8 with its sign, so all 16 levels are used; values stored as q + 8 with min -8 scale).
On SmolLM2 it rounds better than scale max|w| / 7 with 15 levels (perplexity 17.0 against 20.5,
dense 12.8: docs/benchmarks.md, "Quality of quantized weights").
"""
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GGUF_LANE_TYPES", "Lanes", "from_gguf", "quantize"]

GGUF_LANE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class Lanes:
    values: torch.Tensor                # int8 [n, k]
    scales: torch.Tensor                # fp32 [n, k / group]
    mins: torch.Tensor | None           # fp32 [n, k / group], or None: all zero
    bits: int                           # 4 or 8: how the kernels store the values

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def group(self) -> int:
        return self.values.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The weight in fp32, ``values * scale + min`` rounded once (as the kernels' FMA)."""
        expand = self.group
        w = self.values.double() * self.scales.double().repeat_interleave(expand, dim=1)
        if self.mins is not None:
            w += self.mins.double().repeat_interleave(expand, dim=1)
        return w.float()

    def to(self, device: torch.device | str) -> "Lanes":
        """The same lanes on ``device``."""
        mins = None if self.mins is None else self.mins.to(device)
        return Lanes(self.values.to(device), self.scales.to(device), mins, self.bits)

    def rows(self, index: torch.Tensor | slice) -> "Lanes":
        """The lanes of some rows (a permutation, a shard)."""
        mins = None if self.mins is None else self.mins[index]
        return Lanes(self.values[index], self.scales[index], mins, self.bits)

    def columns(self, start: int, stop: int) -> "Lanes":
        """The lanes of inputs ``start:stop`` of every row (a row-parallel shard); the cut
        must fall on group boundaries, where the scales and mins split with the values."""
        group = self.group
        if start % group or stop % group:
            raise ValueError(f"inputs {start}:{stop} of a weight quantized in groups of {group} "
                             "do not fall on group boundaries")
        cut = slice(start // group, stop // group)
        mins = None if self.mins is None else self.mins[:, cut].contiguous()
        return Lanes(self.values[:, start:stop].contiguous(), self.scales[:, cut].contiguous(),
                     mins, self.bits)

    @staticmethod
    def concat(parts: list["Lanes"]) -> "Lanes":
        """Row-wise concatenation (fused q/k/v, gate/up) in a common form: the widest bits,
        the smallest group (scales repeated), zero mins where a part has none. Lossless."""
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError(f"cannot stack weights of {[p.shape for p in parts]}")
        group = min(p.group for p in parts)
        if any(p.group % group for p in parts):
            raise ValueError(f"groups {[p.group for p in parts]} do not nest")
        with_mins = any(p.mins is not None for p in parts)

        def spread(t: torch.Tensor, p: Lanes) -> torch.Tensor:
            return t.repeat_interleave(p.group // group, dim=1)
        values = torch.cat([p.values for p in parts])
        scales = torch.cat([spread(p.scales, p) for p in parts])
        mins = torch.cat([spread(p.mins if p.mins is not None else torch.zeros_like(p.scales), p)
                          for p in parts]) if with_mins else None
        return Lanes(values, scales, mins, max(p.bits for p in parts))


def quantize(weight: torch.Tensor, bits: int, group: int) -> Lanes:
    """Symmetric per-group quantization of ``weight [n, k]`` (``k`` a multiple of ``group``)."""
    n, k = weight.shape
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
    if group <= 0 or not (group == 16 or group % 32 == 0) or k % group:
        raise ValueError(f"group size {group} must be 16 or a multiple of 32 dividing the "
                         f"{k} inputs")
    w = weight.detach().float().reshape(n, k // group, group)
    if bits == 8:
        scales = w.abs().amax(dim=-1) / 127
    else:   # the group's largest magnitude lands on -8, its sign in the scale: 16 levels
        scales = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))[..., 0] / -8
    safe = torch.where(scales != 0, scales, torch.ones_like(scales))
    q = torch.round(w / safe[..., None]).clamp(-128 if bits == 8 else -8, 127 if bits == 8 else 7)
    q = q.to(torch.int8)
    if bits == 8:
        return Lanes(q.reshape(n, k), scales, None, 8)
    return Lanes((q + 8).reshape(n, k), scales, -8 * scales, 4)


def from_gguf(type_name: str, blocks: np.ndarray, shape: tuple[int, int]) -> Lanes:
    """The lanes of a GGUF tensor of ``type_name`` (one of ``GGUF_LANE_TYPES``) whose raw
    blocks are ``blocks`` (uint8 ``[n, bytes per row]``, as gguf's reader gives them)."""
    import gguf
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n, k = shape
    raw = np.ascontiguousarray(blocks).reshape(-1, size)
    if raw.shape[0] * block != n * k:
        raise ValueError(f"{type_name} blocks hold {raw.shape[0] * block} weights, not {n}x{k}")
    bits, group, scales, mins = _header(type_name, raw)
    # its block decoder on all blocks at once (gguf.quants.dequantize goes 16 rows a call)
    w = getattr(gguf.quants, type_name).dequantize_blocks(raw).reshape(n, k).astype(np.float64)
    per = k // group
    s = scales.reshape(n, per).astype(np.float64)
    m = None if mins is None else mins.reshape(n, per).astype(np.float64)
    ws = w.reshape(n, per, group)
    off = ws if m is None else ws - m[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s[..., None] != 0, np.rint(off / s[..., None]), 0.0)
    lo, hi = (0, 15) if bits == 4 else (-128, 127)
    back = q * s[..., None] + (0.0 if m is None else m[..., None])
    if q.min() < lo or q.max() > hi or not np.array_equal(back.astype(np.float32),
                                                          ws.astype(np.float32)):
        raise ValueError(f"{type_name} tensor [{n}, {k}]: blocks do not decode as {type_name} "
                         "(corrupt data)")
    return Lanes(torch.from_numpy(q.reshape(n, k).astype(np.int8)),
                 torch.from_numpy(s.astype(np.float32)),
                 None if m is None else torch.from_numpy(m.astype(np.float32)), bits)


def _header(type_name: str, raw: np.ndarray
            ) -> tuple[int, int, np.ndarray, np.ndarray | None]:
    """(bits, group, scale per group, min per group or None) from each block's header."""
    def half(lo: int) -> np.ndarray:
        return raw[:, lo:lo + 2].copy().view(np.float16).astype(np.float32)     # [blocks, 1]
    if type_name in ("Q8_0", "Q5_0"):
        return 8, 32, half(0), None
    if type_name == "Q4_0":
        d = half(0)
        return 4, 32, d, -8 * d
    if type_name in ("Q4_1", "Q5_1"):
        return (4 if type_name == "Q4_1" else 8), 32, half(0), half(2)
    if type_name in ("Q4_K", "Q5_K"):
        from gguf.quants import Q4_K
        sc, mn = Q4_K.get_scale_min(raw[:, 4:16].copy())
        d, dmin = half(0), half(2)
        return (4 if type_name == "Q4_K" else 8), 32, d * sc, -(dmin * mn)
    if type_name == "Q6_K":
        sc = raw[:, 192:208].copy().view(np.int8).astype(np.float32)
        return 8, 16, half(208) * sc, None
    raise ValueError(f"GGUF type {type_name} is not served as lanes")
