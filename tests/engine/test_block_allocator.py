"""BlockAllocator invariants under random allocate/free sequences."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_allocator import BlockAllocator


def _check(a: BlockAllocator) -> None:
    held = [b for t in a.tables.values() for b in t]
    assert all(a.ref_counts[b] == held.count(b) for b in range(a.num_blocks)), "ref counts"
    assert len(set(held)) + a.num_free == a.num_blocks, "blocks were lost or created"
    assert set(held).isdisjoint(a.free_blocks)
    for seq_id, table in a.tables.items():
        assert len(table) == a.blocks_for(a.num_tokens[seq_id])
    assert all(a.block_key[b] == k for k, b in a.cached.items()), "cache index"
    assert a.tokens_stored == sum(a.fill[b] for b in set(held))


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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(1, 40), st.integers(0, 3),
                          st.booleans()), max_size=60))
def test_prefix_sharing_conserves_blocks(ops):
    """Sequences whose tokens are prefixes of a few streams share cached blocks."""
    a = BlockAllocator(num_blocks=16, block_size=4)
    streams = [list(range(100)), list(range(100)), [7] * 100, list(range(50, 150))]
    for seq_id, length, stream, free in ops:
        tokens = streams[stream][:length]
        if free or seq_id in a.tables:
            a.free(seq_id)
        else:
            cached = a.match_prefix(seq_id, tokens)
            assert cached % 4 == 0 and cached < length
            assert all(a.block_key[b] is not None for b in a.table(seq_id))
            if a.can_allocate(seq_id, length):
                a.allocate(seq_id, length)
                a.register(seq_id, tokens, length)
            else:
                a.free(seq_id)
        _check(a)
    for seq_id in list(a.tables):
        a.free(seq_id)
    _check(a)
    assert a.num_free == a.num_blocks and a.tokens_stored == 0


def test_prefix_hit_shares_blocks_and_evicts_lru():
    a = BlockAllocator(num_blocks=6, block_size=4)
    prompt = list(range(10))
    a.allocate("first", 10)
    a.register("first", prompt, 10)
    assert a.match_prefix("second", prompt + [99]) == 8
    assert a.tables["second"] == a.tables["first"][:2]
    assert a.tokens_stored == 10, "shared blocks count once"
    a.free("first")
    a.free("second")
    assert a.match_prefix("third", prompt) == 8, "freed blocks stay cached until reused"
    a.free("third")
    a.allocate("big", 24)                  # needs every block: the cached ones are evicted
    assert not a.cached
    a.free("big")
    assert a.match_prefix("fourth", prompt) == 0
