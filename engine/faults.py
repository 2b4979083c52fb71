"""Faults: which failures belong to one sequence and which to a whole step, and what to say.

A fault of one sequence (its detokenizer raised, its row of logits is not finite) fails that
request alone; the rest of the batch goes on. A fault of the step (anything the model forward
raises: out of device memory, a kernel error) fails every request of that step's batch, whose
blocks are freed; the engine then serves the next step as usual. A CUDA error that poisons the
context (a device-side assert) cannot be survived in-process: every later step fails the same
way, which the handler reports per request while TorchServe's worker keeps answering.
"""
import logging

import torch

import kernels

log = logging.getLogger(__name__)

NONFINITE = -1      # stands for the token of a row whose logits held NaN or inf
NONFINITE_MESSAGE = "the model produced non-finite logits (NaN or inf) for this request"


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Per row of ``[rows, vocab]`` logits: True if every value is finite."""
    return kernels.finite_rows(logits).tolist()


def sequence_error(stage: str, exc: BaseException) -> str:
    """The message for a request whose own ``stage`` (detokenizer, tokenizer, ...) raised."""
    log.warning("%s failed for one request", stage, exc_info=exc)
    return f"{stage} failed: {type(exc).__name__}: {str(exc)[:200]}"


def step_error(exc: BaseException, num_requests: int, device: torch.device) -> str:
    """The message for every request of a failed step; frees what the allocator can."""
    log.error("engine step of %d requests failed", num_requests, exc_info=exc)
    if isinstance(exc, torch.OutOfMemoryError):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return (f"out of device memory in an engine step of {num_requests} requests; "
                f"retry, or lower max_num_seqs / max_num_batched_tokens")
    return f"engine step failed: {type(exc).__name__}: {str(exc)[:200]}"
