"""Sampler: one next token per sequence from its logits row and its SamplingParams.

Everything runs batched over the rows except the random draw of seeded requests, which uses
each request's own generator (on the logits' device) so its tokens do not depend on what else
is in the batch. Per-row values reach the device through pinned, non-blocking copies; the one
host-device sync of a step is reading the sampled tokens back.
"""
import torch

import kernels
from engine.sequence import Sequence
from engine.structured_output import mask


class Sampler:
    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = eos_token_ids

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits ``[len(seqs), vocab]`` (fp32, any device) -> one token id per sequence."""
        logits = logits.float()
        self._ban_early_stops(logits, seqs)
        if any(s.params.penalized for s in seqs):
            logits = self._penalize(logits, seqs)
        if any(s.params.logit_bias for s in seqs):
            self._bias(logits, seqs)
        if any(s.grammar is not None for s in seqs):
            mask(logits, [s.grammar for s in seqs])
        greedy = kernels.argmax_rows(logits)
        if all(s.params.greedy for s in seqs):
            return greedy.tolist()
        device = logits.device
        params = [s.params for s in seqs]
        temperature = _column([p.temperature or 1.0 for p in params], torch.float32, device)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        probs = self._filter(probs, params)
        # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs).exponential_()
        for row, seq in enumerate(seqs):
            if seq.generator is not None and not seq.params.greedy:
                noise[row].exponential_(generator=_on_device(seq, device))
        sampled = kernels.argmax_rows(probs / noise)
        is_greedy = _column([p.greedy for p in params], torch.bool, device)
        return torch.where(is_greedy, greedy, sampled).tolist()

    def _ban_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Below min_tokens, EOS and stop_token_ids may not be sampled."""
        rows, banned = [], []
        for row, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                ids = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                rows += [row] * len(ids)
                banned += ids
        if banned:
            logits[_column(rows, torch.long, logits.device),
                   _column(banned, torch.long, logits.device)] = float("-inf")

    def _bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """In place: each row's logit_bias added to its tokens' logits."""
        rows, ids, values = [], [], []
        for row, seq in enumerate(seqs):
            for token, bias in (seq.params.logit_bias or {}).items():
                rows.append(row)
                ids.append(token)
                values.append(bias)
        device = logits.device
        logits.index_put_((_column(rows, torch.long, device), _column(ids, torch.long, device)),
                          _column(values, torch.float32, device), accumulate=True)

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Repetition penalty over prompt and output (HF rule); presence/frequency over output."""
        device = logits.device

        def flat(ids_of) -> tuple[torch.Tensor, torch.Tensor]:
            rows = [row for row, seq in enumerate(seqs) for _ in ids_of(seq)]
            ids = [t for seq in seqs for t in ids_of(seq)]
            return _column(rows, torch.long, device), _column(ids, torch.long, device)

        out_counts = torch.zeros_like(logits)
        out_rows, out_ids = flat(lambda seq: seq.output_token_ids)
        out_counts.index_put_((out_rows, out_ids), torch.ones_like(out_ids, dtype=logits.dtype),
                              accumulate=True)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[flat(lambda seq: seq.token_ids)] = True
        rep = _column([s.params.repetition_penalty for s in seqs], torch.float32, device)[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        freq = _column([s.params.frequency_penalty for s in seqs], torch.float32, device)[:, None]
        pres = _column([s.params.presence_penalty for s in seqs], torch.float32, device)[:, None]
        return logits - freq * out_counts - pres * (out_counts > 0).float()

    def _filter(self, probs: torch.Tensor, params: list) -> torch.Tensor:
        """Zero out tokens outside top-k, top-p (nucleus) and min-p; rows stay unnormalized."""
        device = probs.device
        top_k = [p.top_k if p.top_k > 0 else probs.shape[1] for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if any(k < probs.shape[1] for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            rank = torch.arange(probs.shape[1], device=device)[None, :]
            sorted_probs = sorted_probs.masked_fill(
                rank >= _column(top_k, torch.long, device)[:, None], 0.0)
            # Top-p over what top-k kept: keep a token while the mass before it is below top_p.
            kept = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
            before = kept.cumsum(dim=-1) - kept
            sorted_probs = sorted_probs.masked_fill(
                before >= _column(top_p, torch.float32, device)[:, None], 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        if any(m > 0 for m in min_p):
            floor = (_column(min_p, torch.float32, device)[:, None]
                     * probs.max(dim=-1, keepdim=True).values)
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-row values on ``device`` without a sync: pinned host memory, non-blocking copy."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _on_device(seq: Sequence, device: torch.device) -> torch.Generator:
    """The sequence's generator, moved once to the logits' device (seeded from the original)
    so its draws happen where the logits are, with nothing copied per row."""
    if seq.generator.device != device:
        seq.generator = torch.Generator(device).manual_seed(seq.generator.initial_seed())
    return seq.generator
