"""SamplingParams: vLLM's per-request generation knobs, validated by pydantic."""
import math

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.logprobs import MAX_LOGPROBS
from engine.structured_output_params import StructuredOutputsParams


class SamplingParams(BaseModel):
    """How one request samples and when it stops; invalid values raise a ValidationError.

    ``max_tokens=None`` means "up to max_model_len"; ``top_k`` of 0 or -1 and ``top_p`` of 1
    disable those filters; ``temperature`` 0 is greedy. ``logit_bias`` adds a value in
    [-100, 100] to a token id's logit (OpenAI's rule; -100 all but bans it).

    ``logprobs=N`` reports each new token's logprob and the N most likely alternatives;
    ``prompt_logprobs=N`` the same for every prompt token (the first is None). ``n`` answers
    come from one prefill; ``best_of`` (>= n) runs that many and keeps the n with the highest
    cumulative logprob. ``max_tokens=0`` only scores the prompt (needs ``prompt_logprobs``).
    """
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    structured_outputs: StructuredOutputsParams | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (value or {}).items():
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"token {token}: a bias must be in [-100, 100] for a token id "
                                 f">= 0, got {bias}")
        return value or None

    @field_validator("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _min_le_max(self) -> "SamplingParams":
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                             f"({self.max_tokens})")
        return self

    @model_validator(mode="after")
    def _choices_and_scoring(self) -> "SamplingParams":
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens: 0 generates nothing; it only scores the prompt, "
                             "so it needs prompt_logprobs")
        if self.max_tokens == 0 and self.num_children > 1:
            raise ValueError("max_tokens: 0 scores the prompt once; n and best_of must be 1")
        return self

    @property
    def num_children(self) -> int:
        """Sequences this request runs: best_of if given, else n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
