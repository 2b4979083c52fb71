"""Briefly pretrains a generated model on the tokenizer's prose corpus so it writes words.

Owns the token stream (each document wrapped in bos/eos, all concatenated), batch sampling and
the optimisation loop. It must stay deterministic: a fixed seed, a fixed thread count and a
fixed number of steps give the same weights on the same machine. It never saves files.
"""
import math

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from scripts.train_tokenizer import corpus_documents

NUM_THREADS = 2


def token_stream(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Every corpus document as `<s> text </s>`, concatenated into one 1-D tensor of ids."""
    encoded = tokenizer(list(corpus_documents()), add_special_tokens=False)["input_ids"]
    ids = []
    for document in encoded:
        ids += [tokenizer.bos_token_id, *document, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _learning_rate(step: int, steps: int, peak_lr: float) -> float:
    warmup_steps = max(1, steps // 10)
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, steps: int, seed: int,
          batch_size: int = 8, seq_len: int = 128, peak_lr: float = 2e-3) -> list[float]:
    """Runs `steps` AdamW steps of next-token prediction in place; returns the loss per step."""
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)  # the thread count changes float sums, so it is fixed
    try:
        return _train(model, tokenizer, steps, seed, batch_size, seq_len, peak_lr)
    finally:
        torch.set_num_threads(caller_threads)


def _train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, steps: int, seed: int,
           batch_size: int, seq_len: int, peak_lr: float) -> list[float]:
    stream = token_stream(tokenizer)
    assert len(stream) > seq_len + 1, "corpus shorter than one training sequence"
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    model.train()
    losses = []
    progress = tqdm(range(steps), desc="pretraining", unit="step")
    for step in progress:
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
        batch = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, peak_lr)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
