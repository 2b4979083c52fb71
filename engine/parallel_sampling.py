"""ParentRequest: one request's choices (``n``, ``best_of``) forked from a single prefill.

The request starts as one sequence (choice 0). When its prompt's last chunk is scheduled, the
engine forks the other choices from it: each gets a block table sharing the prompt's blocks
(the allocator copies a shared partial last block on first write), its own detokenizer and,
for a seeded request, its own generator seeded ``seed + index`` (choice 0 keeps ``seed``), so
choice i is token-identical to a separate request with seed ``seed + index``. All choices
sample their first token from the prompt's last logits in the same step.

With ``best_of`` > ``n`` every choice runs to its end and only the ``n`` with the highest
cumulative logprob are reported, best first, once all have finished.
"""
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


class ParentRequest:
    """The choices of one request and how many have finished; the engine drives them."""

    def __init__(self, params: SamplingParams) -> None:
        self.n = params.n
        self.num_children = params.num_children
        self.ranks = self.num_children > self.n       # best_of: report only the n best
        self.seqs: list[Sequence] = []                # every choice, by index
        self.forked = False
        self.num_finished = 0

    def child_params(self, params: SamplingParams, index: int) -> SamplingParams:
        """Choice ``index``'s SamplingParams: its derived seed; prompt logprobs are the
        request's, computed by choice 0 alone."""
        seed = None if params.seed is None else params.seed + index
        return params.model_copy(update={"seed": seed, "prompt_logprobs": None})

    @property
    def choices_running(self) -> int:
        """Choices not yet finished (all of them until the fork)."""
        return self.num_children - self.num_finished

    def winners(self) -> list[Sequence]:
        """The n choices with the highest cumulative logprob, best first."""
        return sorted(self.seqs, key=lambda s: -s.cumulative_logprob)[:self.n]
