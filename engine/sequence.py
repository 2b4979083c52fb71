"""Sequence: the engine's state for one request, from admission to its last token."""
import time
from enum import Enum
from typing import TYPE_CHECKING, Hashable

import torch

from engine.detokenizer import Detokenizer
from engine.logprobs import PositionLogprobs
from engine.sampling_params import SamplingParams
from engine.structured_output import GrammarState

if TYPE_CHECKING:
    from engine.parallel_sampling import ParentRequest


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt then output), how many of them the KV cache holds, and the request.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; a preempted sequence
    drops back to 0 and recomputes prompt and output together. ``seq_id`` keys its block
    table: the request id for a request's first sequence, ``(request_id, index)`` for the
    others (the other choices of an ``n`` > 1 request, the other prompts of a prompt array;
    ``parent`` ties them together). ``index`` is the choice's, prompt-major over the prompts.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, detokenizer: Detokenizer, index: int = 0,
                 parent: "ParentRequest | None" = None, prompt_index: int = 0) -> None:
        self.request_id = request_id
        self.index = index
        self.prompt_index = prompt_index
        self.seq_id: Hashable = request_id if index == 0 else (request_id, index)
        self.parent = parent
        self.to_fork = 0                  # choices still to be forked from this prompt's head
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
        self.logprobs: list[PositionLogprobs] = []          # one per output token, if asked
        self.prompt_logprobs: list[PositionLogprobs | None] = [None]    # filled during prefill
        self.prompt_logprobs_sent = False
        self.cumulative_logprob = 0.0
        self.grammar: GrammarState | None = None     # set for structured_outputs requests

    @property
    def scores_tokens(self) -> bool:
        """Whether each sampled token's logprob is needed (asked for, or to rank best_of)."""
        return self.params.logprobs is not None or (self.parent is not None
                                                    and self.parent.ranks)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return (self.params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    @property
    def width(self) -> int:
        """Scheduler slots it takes: all its choices while they are still to be forked."""
        return 1 + self.to_fork

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
