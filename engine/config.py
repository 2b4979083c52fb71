"""EngineConfig: every knob of the engine in one dataclass, checked once at start."""
from dataclasses import dataclass

DTYPES = ("float32", "float16", "bfloat16")
# KV cache element types (vLLM's names): auto = the model's dtype; fp8 = e4m3 with a
# per-tensor scale (kernels/reference.py), on CUDA only; fp8_e4m3 is vLLM's alias for it.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3")
QUANTIZATIONS = {"int8": 8, "int4": 4}      # weight-only, at load: name -> bits
BACKENDS = ("auto", "triton", "reference")


@dataclass(slots=True)
class EngineConfig:
    """Engine settings; the handler maps the model-config.yaml ``handler:`` section onto these.

    The KV pool is sized by ``num_blocks`` if given, else by ``kv_cache_bytes``, else by
    ``kv_cache_memory_fraction`` of free device memory (CUDA) or of available RAM (CPU).
    """
    block_size: int = 16                     # tokens per KV block
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.3
    max_num_seqs: int = 64                   # sequences in one step
    max_num_batched_tokens: int = 512        # tokens (prefill + decode) in one step
    max_model_len: int | None = None         # default: the checkpoint's max_position_embeddings
    dtype: str = "float32"
    kv_cache_dtype: str = "auto"             # see KV_CACHE_DTYPES
    device: str = "cpu"
    attention_backend: str = "auto"
    enable_prefix_caching: bool = True       # share KV blocks of identical prompt prefixes
    seed: int = 0
    num_threads: int | None = None           # torch intra-op threads, set at engine start
    few_rows_threads: int | None = None      # threads for steps of few tokens (model_runner)
    quantization: str | None = None          # int8 | int4 weights at load (HF checkpoints)
    quantization_group_size: int = 32        # inputs sharing one scale
    tensor_parallel_size: int = 1            # ranks sharing each layer (engine/tensor_parallel.py)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"invalid engine config: {message}")
        need(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
             f"block_size must be a power of two, got {self.block_size}")
        need(self.num_blocks is None or self.num_blocks > 0,
             f"num_blocks must be positive, got {self.num_blocks}")
        need(self.kv_cache_bytes is None or self.kv_cache_bytes > 0,
             f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        need(0 < self.kv_cache_memory_fraction <= 1,
             f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        need(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        need(self.max_num_batched_tokens >= self.max_num_seqs,
             f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
             f"({self.max_num_seqs}) so every running sequence can decode in one step")
        need(self.max_model_len is None or self.max_model_len > 0,
             f"max_model_len must be positive, got {self.max_model_len}")
        need(self.tensor_parallel_size > 0,
             f"tensor_parallel_size must be positive, got {self.tensor_parallel_size}")
        need(self.num_threads is None or self.num_threads > 0,
             f"num_threads must be positive, got {self.num_threads}")
        need(self.few_rows_threads is None or self.few_rows_threads > 0,
             f"few_rows_threads must be positive, got {self.few_rows_threads}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.kv_cache_dtype in KV_CACHE_DTYPES,
             f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        need(self.device != "cpu" or not self.kv_cache_dtype.startswith("fp8"),
             f"kv_cache_dtype {self.kv_cache_dtype} is served on CUDA only; on CPU use auto, "
             f"float32, bfloat16 or float16")
        cache = self.cache_dtype
        need(self.device == "cpu" or cache == self.dtype or
             (cache == "fp8" and self.dtype != "float32"),
             f"on CUDA kv_cache_dtype must be auto (the model's {self.dtype}) or fp8 with a "
             f"float16/bfloat16 model, got {self.kv_cache_dtype!r}")
        need(self.quantization is None or self.quantization in QUANTIZATIONS,
             f"quantization must be one of {tuple(QUANTIZATIONS)} or None, got "
             f"{self.quantization!r}")
        need(self.quantization_group_size == 16 or (self.quantization_group_size > 0 and
                                                     self.quantization_group_size % 32 == 0),
             f"quantization_group_size must be 16 or a positive multiple of 32, got "
             f"{self.quantization_group_size}")
        need(self.quantization is None or self.dtype == "float32",
             f"quantization {self.quantization} quantizes fp32 weights: dtype must be float32, "
             f"got {self.dtype!r}")
        need(self.attention_backend in BACKENDS,
             f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        need(self.device == "cpu" or self.device.startswith("cuda"),
             f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def model_len(self, limit: int) -> int:
        """Prompt + output tokens per sequence: ``max_model_len`` within the checkpoint's
        ``limit`` (its max_position_embeddings)."""
        return min(self.max_model_len or limit, limit)

    @property
    def cache_dtype(self) -> str:
        """The KV cache's element type: a DTYPES name, or fp8 (e4m3)."""
        if self.kv_cache_dtype == "auto":
            return self.dtype
        return "fp8" if self.kv_cache_dtype.startswith("fp8") else self.kv_cache_dtype
