"""HandlerSettings: the ``handler:`` section of an LLM's model-config.yaml, validated once.

Engine knobs are handed to ``LLMEngine`` unchanged; request limits and streaming knobs stay
in the handler. This file must never touch TorchServe's wire protocol or the engine's state.
Where the worker runs comes from TorchServe: on CUDA the GPU it assigned (``gpu_id``), on CPU
an equal share of the cores for each of the model's ``maxWorkers`` (and each torchrun rank of
a worker) unless ``num_threads`` or ``OMP_NUM_THREADS`` is set, with one core of a share of
several left to TorchServe's frontend in steps of few tokens (``few_rows_threads``:
engine/model_runner.py). ``parallelType: tp`` sets ``tensor_parallel_size`` to the ranks
torchrun started (``WORLD_SIZE``).
"""
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine import EngineConfig

ENGINE_KEYS = tuple(f.name for f in fields(EngineConfig))


class HandlerSettings(BaseModel):
    """Every key the LLM handlers read from ``handler:``; unknown keys are an error.

    Engine keys (``ENGINE_KEYS``: block_size, num_blocks, kv_cache_bytes, max_num_seqs, ...)
    pass through to ``EngineConfig``, which owns their defaults and checks their values.
    """
    model_config = ConfigDict(extra="allow")

    model_path: str
    # request limits and streaming
    max_tokens_limit: int | None = Field(None, ge=1)   # cap on a request's max_tokens
    default_max_tokens: int = Field(16, ge=1)          # when a request gives none
    lease_s: float = Field(3.0, gt=0)                  # abort a stream no call renewed this long
    step_wait_s: float = Field(0.02, gt=0)             # longest a handle() call waits for tokens
    hold_wait_s: float = Field(0.02, gt=0)             # a call with only the hold request (keeper.py)
    metrics_interval_s: float = Field(0.5, gt=0)       # engine gauges at most this often
    # reliability (handlers/limits.py): beyond these a request is a 400 naming the field
    request_timeout_s: float = Field(300.0, gt=0)      # deadline from arrival; may be lowered
    max_stop_strings: int = Field(16, ge=0)            # stop strings in one request
    max_stop_chars: int = Field(256, ge=1)             # characters in one stop string
    max_prompts: int = Field(64, ge=1)                 # prompts in one completions request
    max_request_tokens: int = Field(262144, ge=1)      # prompt tokens + max_tokens x choices

    @model_validator(mode="after")
    def _known_keys(self) -> "HandlerSettings":
        unknown = sorted(set(self.model_extra or {}) - set(ENGINE_KEYS))
        if unknown:
            raise ValueError(f"unknown handler keys {unknown}; engine keys are {ENGINE_KEYS}")
        return self

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
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        if len(ggufs) == 1 and not (path / "config.json").exists():
            path = ggufs[0]     # a bundled GGUF file (build_archives.py --bundle)
        settings.model_path = str(path)
        settings.place(context.model_yaml_config or {}, context.system_properties)
        return settings

    @property
    def tensor_parallel_rank(self) -> int:
        """This process's rank among the worker's tensor-parallel ranks (0 without them)."""
        if int((self.model_extra or {}).get("tensor_parallel_size") or 1) == 1:
            return 0
        return int(os.environ.get("RANK", 0))

    def place(self, model_config: dict[str, Any], system_properties: dict[str, Any]) -> None:
        """Pin this worker's engine to TorchServe's GPU for it, or to its share of the cores."""
        extra = self.model_extra
        if model_config.get("parallelType") == "tp":
            world = int(os.environ.get("WORLD_SIZE", 0))
            if not world:
                raise ValueError("parallelType: tp needs a torchrun: block (nproc-per-node) in "
                                 "model-config.yaml: this worker was not started by torchrun")
            extra["tensor_parallel_size"] = world
        device = str(extra.get("device", "cpu"))
        gpu_id = system_properties.get("gpu_id")
        if device == "cuda" and gpu_id is not None:     # cuda:N in the config wins
            extra["device"] = f"cuda:{gpu_id}"
        elif device == "cpu" and extra.get("num_threads") is None \
                and "OMP_NUM_THREADS" not in os.environ:        # set by the operator: kept
            workers = max(1, int(model_config.get("maxWorkers") or 1))
            workers *= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            share = max(1, len(os.sched_getaffinity(0)) // workers)
            extra["num_threads"] = share
            if share > 1 and extra.get("few_rows_threads") is None:   # a core for the frontend
                extra["few_rows_threads"] = share - 1

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for ``LLMEngine(model_path, **engine_args)``."""
        return dict(self.model_extra or {})
