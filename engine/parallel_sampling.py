"""ParentRequest: one request's sequences, its prompts' choices (``n``, ``best_of``).

A request has one or more prompts. Each prompt starts as one sequence (its first choice).
When that prompt's last chunk is scheduled, the engine forks its other choices from it: each
gets a block table sharing the prompt's blocks (the allocator copies a shared partial last
block on first write), its own detokenizer and, for a seeded request, its own generator
seeded ``seed + j`` for choice ``j`` of the prompt (choice 0 keeps ``seed``), so that choice
is token-identical to a separate one-prompt request with seed ``seed + j``. All choices of a
prompt sample their first token from the prompt's last logits in the same step. Choices are
indexed prompt-major: choice ``j`` of prompt ``p`` has index ``p * n + j``.

With ``best_of`` > ``n`` every choice runs to its end and only the ``n`` with the highest
cumulative logprob are reported per prompt, best first, once all of its choices finished.
"""
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, Status


class ParentRequest:
    """The sequences of one request and how many have finished; the engine drives them."""

    def __init__(self, params: SamplingParams, heads: list[Sequence]) -> None:
        self.n = params.n
        self.num_children = params.num_children       # choices per prompt
        self.ranks = self.num_children > self.n       # best_of: report only the n best
        self.heads = heads                            # each prompt's first choice
        self.seqs: list[Sequence] = list(heads)       # every choice forked so far
        self.num_seqs = len(heads) * self.num_children    # less if a prompt ends unforked
        self.num_finished = 0
        self.prompt_tokens = sum(h.num_prompt_tokens for h in heads)
        for head in heads:
            head.parent, head.to_fork = self, self.num_children - 1

    def child_params(self, params: SamplingParams, choice: int) -> SamplingParams:
        """The SamplingParams of a prompt's choice ``choice``: its derived seed; prompt
        logprobs are the prompt's, computed by its first choice alone."""
        seed = None if params.seed is None else params.seed + choice
        return params.model_copy(update={"seed": seed, "prompt_logprobs": None})

    @property
    def choices_running(self) -> int:
        """Sequences not yet finished (a prompt's unforked choices included)."""
        return self.num_seqs - self.num_finished

    def prompt_running(self, prompt: int) -> bool:
        return any(s.prompt_index == prompt and s.status is not Status.FINISHED
                   for s in self.seqs)

    def winners(self, prompt: int) -> list[Sequence]:
        """The prompt's n choices with the highest cumulative logprob, best first."""
        mine = [s for s in self.seqs if s.prompt_index == prompt]
        return sorted(mine, key=lambda s: -s.cumulative_logprob)[:self.n]
