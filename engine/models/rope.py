"""Rotary position embeddings: inverse frequencies (plain, and linear-, llama3- and yarn-scaled)
with yarn's attention factor, the llama3 settings behind a GGUF file's per-pair frequency
divisors, and their application."""
import math

import numpy as np
import torch

SCALINGS = ("default", "linear", "llama3", "yarn")


def _kind(scaling: dict | None) -> str:
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in SCALINGS:
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: "
                         f"{', '.join(SCALINGS)}")
    return kind


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair rotation frequencies; ``scaling`` is the checkpoint's ``rope_scaling`` dict."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = _kind(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":        # positions divided by the factor
        return inv_freq / scaling["factor"]
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling)
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by ``factor``, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(middle, blended, scaled)


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN: pairs that turn fewer than ``beta_slow`` times over the original context are
    divided by the factor, those turning more than ``beta_fast`` times kept, a linear ramp over
    the pair index between (its ends rounded outwards unless ``truncate`` is false)."""
    old_len = scaling["original_max_position_embeddings"]

    def pair_at(turns: float) -> float:     # the (fractional) pair index turning ``turns`` times
        return head_dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))
    start, stop = pair_at(scaling.get("beta_fast") or 32), pair_at(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        start, stop = math.floor(start), math.ceil(stop)
    start, stop = max(start, 0), min(stop, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - start) /
            (stop - start if stop != start else 1e-3)).clamp(0, 1)
    return inv_freq / scaling["factor"] * ramp + inv_freq * (1 - ramp)


def attention_factor(scaling: dict | None) -> float:
    """What cos and sin are multiplied by: yarn's attention scaling, 1 for the other kinds."""
    if _kind(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(factor: float, weight: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0
    factor = scaling["factor"]
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)


def llama3_from_divisors(divisors: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """llama3 ``rope_scaling`` settings that divide each pair's frequency by ``divisors``, as
    llama.cpp stores the scaling (``rope_freqs.weight``); None when every divisor is 1.

    Long wavelengths are divided by the factor, short ones by 1, and those between by
    1 / ((1 - s) / factor + s), with s linear in 1 / wavelength. Only the wavelength band and
    that line are determined, so ``low_freq_factor`` is taken as 1: the band's long end is then
    ``original_max_position_embeddings``. The result is checked against ``divisors``."""
    divisors = np.asarray(divisors, dtype=np.float64)
    if divisors.shape != (head_dim // 2,):
        raise ValueError(f"{divisors.size} rope frequency divisors for head size {head_dim}")
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0, rtol=0, atol=1e-6):
        return None
    wavelength = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    kept, slowed = divisors <= 1 + 1e-6, divisors >= factor * (1 - 1e-6)
    middle = ~kept & ~slowed
    share = (1 / divisors[middle] - 1 / factor) / (1 - 1 / factor)    # s of each middle pair
    if middle.sum() >= 2:       # s = a / wavelength + b: the band follows from the line
        a, b = np.polyfit(1 / wavelength[middle], share, 1)
        long_end, high = _whole(-a / b), float(_whole(1 - 1 / b))
    else:                       # any band around the middle pair (if one) that keeps the rest
        below = wavelength[kept].max() if kept.any() else wavelength.min() / 2
        above = wavelength[slowed].min() if slowed.any() else wavelength.max() * 2
        if middle.any():        # the band [long_end / high, long_end] holds it, s stays
            at, s = float(wavelength[middle][0]), float(share[0])
            room = below / at       # the band's short end must stay above ``below``
            grow = 0.5 * min(above / at - 1, (1 - room) / (room / s - 1) if room > s else 1.0)
            long_end, high = at * (1 + grow), 1 + grow / s
        else:
            step = (above / below) ** (1 / 3)
            long_end, high = above / step, above / below / step
    settings = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": float(high),
                "original_max_position_embeddings": _whole(float(long_end))}
    plain = inverse_frequencies(head_dim, theta, None).double()
    got = inverse_frequencies(head_dim, theta, settings).double()
    if not torch.allclose(got, plain / torch.from_numpy(divisors), rtol=1e-4, atol=0):
        raise ValueError("the rope frequency divisors (rope_freqs.weight) are not a llama3 "
                         "scaling")
    return settings


def _whole(x: float) -> int | float:
    """``x`` as the integer it is up to fp32 rounding (8191.999 -> 8192), else as it is."""
    return round(x) if abs(x - round(x)) <= 1e-6 * abs(x) else float(x)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin for every position up to ``max_positions``, looked up per token."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict | None) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        gain = attention_factor(scaling)
        self.register_buffer("cos", angles.cos() * gain, persistent=False)
        self.register_buffer("sin", angles.sin() * gain, persistent=False)

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows ``[tokens, 1, dim]`` of a step's positions, looked up once a step."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def forward(self, rot: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[tokens, heads, dim]``, k ``[tokens, kv_heads, dim]``, ``rot`` from ``table``;
        rotate-half convention."""
        cos, sin = rot
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
