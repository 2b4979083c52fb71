"""Scheduler: picks, every step, which sequences run and how many tokens each computes.

Running sequences go first (a decode token each, or the next chunk of an unfinished prefill),
then waiting ones are admitted within ``max_num_seqs`` and the token budget; a prompt longer
than the remaining budget is prefilled in chunks over several steps. An admitted sequence
first takes whatever prefix of its tokens the allocator's prefix cache already holds. When a running sequence
needs a block and none is free, the most recently admitted sequence is preempted: its blocks
are freed and it goes back to the head of the waiting queue, to be recomputed later.

Every choice of an ``n`` > 1 request is a sequence of its own here (preempted, recomputed and
finished alone); a request not yet forked into its choices counts as all of them against
``max_num_seqs``, so the fork never overfills the batch. A sequence that still owes prompt
logprobs skips the prefix cache: logprobs need the logits of every prompt position.
"""
from collections import deque
from dataclasses import dataclass, field

from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig
from engine.sequence import Sequence, Status


@dataclass
class Batch:
    """One step's work: ``seqs[i]`` computes ``num_new_tokens[i]`` tokens from its first uncached.

    ``forks`` are ``(row, child)``: a choice forked this step from ``seqs[row]`` that samples
    its first token from that row's logits.
    """
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    forks: list[tuple[int, Sequence]] = field(default_factory=list)

    def add(self, seq: Sequence, num_new: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)


class Scheduler:
    """Waiting and running queues over one BlockAllocator."""

    def __init__(self, config: EngineConfig, allocator: BlockAllocator) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_chunked_prefills = 0     # steps in which a prompt got less than all it needed
        self.num_cached_tokens = 0        # tokens whose K/V a prefix-cache hit supplied

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A choice forked from a running sequence: it already holds (shared) blocks."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + num_new
            while not self.allocator.can_allocate(seq.seq_id, target):
                self.preempt(self.running.pop())
                preempted = True
                if i == len(self.running):    # the victim was ``seq`` itself
                    break
            else:
                self._take(batch, seq, num_new)
                budget -= num_new
                i += 1
        # After a preemption the pool is short: admitting new work would only thrash.
        slots = sum(seq.width for seq in self.running)
        while (self.waiting and budget > 0 and slots + self.waiting[0].width <= self.max_num_seqs
               and not preempted):
            seq = self.waiting[0]
            cached = (0 if seq.needs_prompt_logprobs
                      else self.allocator.match_prefix(seq.seq_id, seq.token_ids))
            num_new = min(seq.num_uncomputed_tokens - cached, budget)
            if not self.allocator.can_allocate(seq.seq_id, cached + num_new):
                self.allocator.free(seq.seq_id)
                break
            slots += seq.width
            seq.num_computed_tokens = cached
            self.num_cached_tokens += cached
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._take(batch, seq, num_new)
            budget -= num_new
        return batch

    def _take(self, batch: Batch, seq: Sequence, num_new: int) -> None:
        self.allocator.allocate(seq.seq_id, seq.num_computed_tokens + num_new)
        if num_new < seq.num_uncomputed_tokens:
            self.num_chunked_prefills += 1
        seq.mark_scheduled()
        batch.add(seq, num_new)

    def preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Drop ``seq`` from whichever queue holds it and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:         # not there while its grammar compiles
            self.waiting.remove(seq)
        self.allocator.free(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
