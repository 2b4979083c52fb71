"""Seeded benchmark workloads: requests with long-tail prompt and output lengths.

Owns how a benchmark's requests are drawn (prompt token ids, output lengths, arrival times) so
that every system a benchmark compares, offline or served, sees exactly the same requests. It
never talks to an engine. Lengths are lognormal (a few long requests dominate the work, as in
real traffic), scaled by ``scale`` and clipped so prompt + output fits ``max_model_len``.
Outputs are meant to be forced to their length (ignore EOS), so token counts are exact.
"""
import math
from dataclasses import dataclass

import numpy as np

NUM_SPECIAL_TOKENS = 4      # ids below this (unk/bos/eos/pad in our tokenizers) never appear


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    output_len: int           # tokens to generate, exactly
    arrival_s: float = 0.0    # seconds after the benchmark starts; 0 for offline runs

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float,
                      low: int, high: int) -> np.ndarray:
    """``n`` integer lengths with the given mean (before clipping to [low, high])."""
    mu = math.log(mean) - sigma ** 2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), low, high).astype(int)


def make_workload(num_requests: int, vocab_size: int, max_model_len: int, seed: int = 0,
                  scale: float = 1.0, prompt_mean: float = 128, output_mean: float = 256,
                  sigma: float = 0.8, request_rate: float = math.inf) -> list[Request]:
    """Draw ``num_requests`` requests; the same arguments always give the same requests.

    ``request_rate`` (requests/s) spaces arrivals as a Poisson process; ``inf`` means all at 0.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    rng = np.random.default_rng(seed)
    prompt_lens = lognormal_lengths(rng, num_requests, prompt_mean * scale, sigma,
                                    1, max_model_len // 2)
    output_lens = lognormal_lengths(rng, num_requests, output_mean * scale, sigma,
                                    1, max_model_len - 1)
    output_lens = np.minimum(output_lens, max_model_len - prompt_lens)
    if math.isinf(request_rate):
        arrivals = np.zeros(num_requests)
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / request_rate, num_requests))
    return [Request(f"req-{i}",
                    rng.integers(NUM_SPECIAL_TOKENS, vocab_size, int(p)).tolist(),
                    int(o), float(t))
            for i, (p, o, t) in enumerate(zip(prompt_lens, output_lens, arrivals))]
