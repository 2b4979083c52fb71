"""TorchServe face of the project: request parsing, streaming, errors and metrics.

The handler modules know TorchServe and the engine's public API (``engine.LLMEngine``), never
kernels. Archive entry points (one class per file, as TorchServe requires):
``continuous_batching.py`` (LLM, continuous batching + streaming), ``static_llm.py`` (the same
LLM with TorchServe's classic static batching) and ``text_classifier.py`` (a non-LLM model).
"""
