"""Model definitions for the supported checkpoint families and their safetensors loader."""
from engine.models.attention import AttentionMetadata
from engine.models.decoder import CausalLM, DecoderSpec
from engine.models.loader import SUPPORTED, load_model, read_spec

__all__ = ["AttentionMetadata", "CausalLM", "DecoderSpec", "SUPPORTED", "load_model", "read_spec"]
