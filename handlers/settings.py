"""HandlerSettings: the ``handler:`` section of an LLM's model-config.yaml, validated once.

Engine knobs are handed to ``LLMEngine`` unchanged; request limits and streaming knobs stay
in the handler. This file must never touch TorchServe's wire protocol or the engine's state.
"""
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENGINE_KEYS = ("block_size", "num_blocks", "kv_cache_bytes", "kv_cache_memory_fraction",
               "max_num_seqs", "max_num_batched_tokens", "max_model_len", "dtype", "device",
               "attention_backend", "seed")


class HandlerSettings(BaseModel):
    """Every key the LLM handlers read from ``handler:``; unknown keys are an error."""
    model_config = ConfigDict(extra="forbid")

    model_path: str
    # engine (see engine.config.EngineConfig for meaning and defaults)
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.3
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    attention_backend: str = "auto"
    seed: int = 0
    # request limits and streaming
    max_tokens_limit: int | None = Field(None, ge=1)   # cap on a request's max_tokens
    default_max_tokens: int = Field(16, ge=1)          # when a request gives none
    lease_s: float = Field(3.0, gt=0)                  # abort a stream no call renewed this long
    step_wait_s: float = Field(0.02, gt=0)             # longest a handle() call waits for tokens
    metrics_interval_s: float = Field(0.5, gt=0)       # engine gauges at most this often

    @classmethod
    def from_context(cls, context: Any) -> "HandlerSettings":
        """Read and validate ``context.model_yaml_config['handler']``; resolve model_path."""
        section = dict((context.model_yaml_config or {}).get("handler") or {})
        try:
            settings = cls.model_validate(section)
        except ValidationError as exc:
            raise ValueError(f"invalid handler: section in model-config.yaml: {exc}") from exc
        model_dir = Path(context.system_properties.get("model_dir") or ".")
        path = Path(settings.model_path).expanduser()
        if not path.is_absolute():
            path = model_dir / path
        if not path.exists():
            raise ValueError(f"handler.model_path {settings.model_path!r} not found "
                             f"(resolved to {path})")
        settings.model_path = str(path)
        return settings

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for ``LLMEngine(model_path, **engine_args)``."""
        return {key: getattr(self, key) for key in ENGINE_KEYS}
