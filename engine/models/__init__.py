"""Model definitions for the supported checkpoint families and their loaders (safetensors
directories, GGUF files)."""
from engine.models.attention import AttentionMetadata
from engine.models.decoder import CausalLM, DecoderSpec, Quantization
from engine.models.loader import (SUPPORTED, load_model, read_config, read_eos_ids,
                                  read_spec, read_tokenizer)

__all__ = ["AttentionMetadata", "CausalLM", "DecoderSpec", "Quantization", "SUPPORTED",
           "load_model", "read_config", "read_eos_ids", "read_spec", "read_tokenizer"]
