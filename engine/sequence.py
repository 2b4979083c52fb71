"""Sequence: the engine's state for one request, from admission to its last token."""
import time
from enum import Enum

import torch

from engine.detokenizer import Detokenizer
from engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt then output), how many of them the KV cache holds, and the request.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; a preempted sequence
    drops back to 0 and recomputes prompt and output together.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, detokenizer: Detokenizer) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed_tokens = 0
        self.params = params
        self.max_tokens = max_tokens      # params.max_tokens resolved against max_model_len
        self.detokenizer = detokenizer
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.arrival_time = time.monotonic()
        self.queue_time_s: float | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def mark_scheduled(self) -> None:
        if self.queue_time_s is None:
            self.queue_time_s = time.monotonic() - self.arrival_time
