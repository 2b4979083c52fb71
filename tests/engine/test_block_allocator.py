"""BlockAllocator invariants under random allocate/free sequences."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_allocator import BlockAllocator


def _check(a: BlockAllocator) -> None:
    held = [b for t in a.tables.values() for b in t]
    assert len(held) == len(set(held)), "a block is in two tables"
    assert len(held) + a.num_free == a.num_blocks, "blocks were lost or created"
    assert set(held).isdisjoint(a.free_blocks)
    assert all(a.ref_counts[b] == 1 for b in held)
    for seq_id, table in a.tables.items():
        assert len(table) == a.blocks_for(a.num_tokens[seq_id])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 80), st.booleans()),
                max_size=60))
def test_random_allocate_free_conserves_blocks(ops):
    a = BlockAllocator(num_blocks=12, block_size=4)
    for seq_id, tokens, free in ops:
        if free:
            a.free(seq_id)
        elif a.can_allocate(seq_id, tokens):
            a.allocate(seq_id, tokens)
        else:
            with pytest.raises(MemoryError):
                a.allocate(seq_id, tokens)
        _check(a)
    for seq_id in list(a.tables):
        a.free(seq_id)
    assert a.num_free == a.num_blocks and a.tokens_stored == 0


def test_ceil_blocks_and_growth():
    a = BlockAllocator(num_blocks=8, block_size=16)
    assert len(a.allocate("s", 16)) == 1
    assert len(a.allocate("s", 17)) == 2
    assert len(a.allocate("s", 5)) == 2, "tables never shrink"
    assert a.tokens_stored == 17


def test_double_free_is_caught():
    a = BlockAllocator(num_blocks=4, block_size=4)
    a.allocate("s", 8)
    block = a.tables["s"][0]
    a.free("s")
    a.tables["t"] = [block]
    with pytest.raises(AssertionError, match="freed twice"):
        a.free("t")
