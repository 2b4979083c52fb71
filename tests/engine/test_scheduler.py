"""Scheduler properties under random add/step/abort, with a fake model that samples token 7."""
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status


class _NoText:
    def add(self, token_id):
        return "", False

    def flush(self):
        return ""


def _seq(rid: str, prompt_len: int, max_tokens: int) -> Sequence:
    # Prompts are prefixes of one another, so the prefix cache is exercised hard.
    return Sequence(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens),
                    max_tokens, _NoText())


def _step(s: Scheduler, config: EngineConfig) -> list[Sequence]:
    """One scheduling round plus what the engine does after the forward pass."""
    batch = s.schedule()
    assert len(batch.seqs) <= config.max_num_seqs
    assert sum(batch.num_new_tokens) <= config.max_num_batched_tokens
    assert len({q.request_id for q in batch.seqs}) == len(batch.seqs)
    done = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert n >= 1 and seq.status is Status.RUNNING
        table = s.allocator.table(seq.request_id)
        assert len(table) == s.allocator.blocks_for(seq.num_computed_tokens + n)
        seq.num_computed_tokens += n
        s.allocator.register(seq.request_id, seq.token_ids, seq.num_computed_tokens)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.max_tokens:
                s.finish(seq, "length")
                done.append(seq)
    return done


def _conserved(s: Scheduler) -> None:
    a = s.allocator
    held = [b for t in a.tables.values() for b in t]
    assert all(a.ref_counts[b] == held.count(b) for b in set(held)), "reference counts"
    assert len(set(held)) + a.num_free == a.num_blocks, "blocks were lost or created"
    assert set(a.tables) <= {q.request_id for q in s.running}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12)),
    st.tuples(st.just("step"), st.just(0), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 30), st.just(0))), max_size=80))
def test_random_add_step_abort(ops):
    config = EngineConfig(block_size=4, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=12)
    s = Scheduler(config, BlockAllocator(16, 4))
    live: dict[str, Sequence] = {}
    for i, (op, a, b) in enumerate(ops):
        if op == "add":
            live[str(i)] = _seq(str(i), a, b)      # at most 52 tokens = 13 blocks: always fits
            s.add(live[str(i)])
        elif op == "step":
            for seq in _step(s, config):
                del live[seq.request_id]
        elif live:
            seq = list(live.values())[a % len(live)]
            s.finish(seq, "abort")
            del live[seq.request_id]
        _conserved(s)
    for _ in range(2000):
        if not s.has_unfinished():
            break
        for seq in _step(s, config):
            del live[seq.request_id]
        _conserved(s)
    assert not live and not s.has_unfinished()
    assert s.allocator.num_free == s.allocator.num_blocks and s.allocator.tokens_stored == 0


def test_preempts_most_recent_and_requeues_at_head():
    config = EngineConfig(block_size=4, num_blocks=4, max_num_seqs=4, max_num_batched_tokens=16)
    s = Scheduler(config, BlockAllocator(4, 4))
    first, second = _seq("first", 8, 20), _seq("second", 8, 20)
    s.add(first)
    s.add(second)
    _step(s, config)                      # both prefilled: 4 blocks in use
    assert [q.request_id for q in s.running] == ["first", "second"]
    _step(s, config)                      # first needs a 3rd block: second is preempted
    assert s.num_preemptions == 1
    assert [q.request_id for q in s.running] == ["first"]
    assert s.waiting[0] is second and second.num_computed_tokens == 0
    assert second.num_output_tokens == 1, "generated tokens survive preemption"


def test_long_prompt_is_chunked_alongside_decodes():
    config = EngineConfig(block_size=4, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=8)
    s = Scheduler(config, BlockAllocator(64, 4))
    s.add(_seq("short", 3, 10))
    _step(s, config)
    s.add(_seq("long", 30, 2))
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["short", "long"]
    assert batch.num_new_tokens == [1, 7]
    assert s.num_chunked_prefills == 1
