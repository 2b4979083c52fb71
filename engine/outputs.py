"""What the engine reports: per-request outputs and engine-wide statistics."""
from dataclasses import dataclass, field

from engine.logprobs import PositionLogprobs


@dataclass
class RequestOutput:
    """A delta from ``LLMEngine.step`` (new text and ids), or a whole result from ``generate``.

    ``finish_reason`` is None while the request runs, then one of stop, length, abort, error.

    A request with ``n`` > 1 reports each choice separately: ``index`` says which, its
    ``finish_reason`` ends that choice, and ``choices_running`` counts the request's choices
    still running after this delta, so ``finished`` is true on the request's last delta only.
    ``completion_tokens`` counts the choice's own tokens. ``logprobs`` has one entry per
    token in ``token_ids``; ``prompt_logprobs`` comes once, on the request's first delta.
    """
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    queue_time_s: float | None = None
    index: int = 0
    choices_running: int = 0
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None and self.choices_running == 0


@dataclass
class EngineStats:
    """A snapshot for metrics; counters (``*_total``, preemptions) are cumulative."""
    num_running: int
    num_waiting: int
    num_blocks: int
    num_blocks_used: int
    tokens_stored: int
    kv_utilization: float          # tokens stored / (blocks used * block_size)
    num_preemptions: int
    num_chunked_prefills: int
    prefix_cache_hit_tokens: int
    peak_running: int
    prompt_tokens_total: int
    generation_tokens_total: int
