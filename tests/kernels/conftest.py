"""Kernel test setup: the Triton interpreter must be on before any @triton.jit decorator runs."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
