"""The TorchServe-free LLM engine: continuous batching over a paged KV cache."""
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from engine.structured_output_params import StructuredOutputsParams

__all__ = ["EngineConfig", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams"]
