"""Logprobs: per-position log-probabilities of chosen tokens and their top-N alternatives.

They are the log-softmax of the model's raw logits (vLLM's default, ``raw_logprobs``): taken
before penalties, temperature, top-k/top-p/min-p, min_tokens bans or any logits mask, so they
score the model itself, not the sampling recipe. The model runner calls ``gather`` on the
logits it computed; the engine fills in each token's text with ``TokenTexts`` when it reports.
Everything is computed in bulk on the logits' device and copied to the host once per call.
"""
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20     # largest top-N a request may ask for (OpenAI's limit)


@dataclass(slots=True)
class Logprob:
    token_id: int
    logprob: float
    rank: int             # 1 = the most likely token at this position
    text: str = ""        # the token decoded alone; filled in by the engine


@dataclass(slots=True)
class PositionLogprobs:
    """The token that sits at one position (sampled or prompt) and the N most likely there."""
    token: Logprob
    top: list[Logprob]    # most likely first; empty when N is 0


def gather(logits: torch.Tensor, token_ids: list[int],
           top_n: list[int]) -> list[PositionLogprobs]:
    """Row ``i`` of ``logits`` ``[rows, vocab]`` scores ``token_ids[i]`` and its ``top_n[i]``
    most likely tokens."""
    if not token_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(token_ids, device=logits.device)
    chosen = logprobs.gather(1, ids[:, None])
    rank = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    k = max(top_n)
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    # one copy to the host: ids and ranks are exact in fp32 (below 2**24)
    rows = torch.cat([chosen, rank.float(), top_lp, top_ids.float()], dim=1).tolist()
    out = []
    for t, n, row in zip(token_ids, top_n, rows):
        top = [Logprob(int(i), v, j + 1)
               for j, (v, i) in enumerate(zip(row[2:2 + n], row[2 + k:2 + k + n]))]
        out.append(PositionLogprobs(Logprob(t, row[0], int(row[1])), top))
    return out


class TokenTexts:
    """Each token decoded on its own (special tokens included), cached by id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def fill(self, positions: list[PositionLogprobs | None]) -> list[PositionLogprobs | None]:
        for pos in positions:
            if pos is not None:
                for entry in (pos.token, *pos.top):
                    entry.text = self.text(entry.token_id)
        return positions

    def text(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
            self.cache[token_id] = text
        return text
