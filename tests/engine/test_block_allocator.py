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


class _Cache:
    """A model of the KV tensors: what token each slot holds, with the allocator's copies."""

    def __init__(self, a: BlockAllocator) -> None:
        self.a = a
        self.slots = [[None] * a.block_size for _ in range(a.num_blocks)]

    def write(self, seq_id, tokens: list[int], start: int) -> None:
        for (src, dst) in self.a.take_copies():
            self.slots[dst] = list(self.slots[src])
        table, bs = self.a.table(seq_id), self.a.block_size
        for pos in range(start, len(tokens)):
            self.slots[table[pos // bs]][pos % bs] = tokens[pos]

    def read(self, seq_id, length: int) -> list[int]:
        table, bs = self.a.table(seq_id), self.a.block_size
        return [self.slots[table[pos // bs]][pos % bs] for pos in range(length)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "fork", "free"]), st.integers(0, 5),
                          st.integers(0, 5), st.integers(1, 9)), max_size=60),
       st.booleans())
def test_forks_and_copy_on_write_isolate_tables(ops, prefix_caching):
    """Tables forked from one another share blocks; whatever each then appends, every table
    still reads back exactly its own tokens, and counts and free list stay consistent."""
    a = BlockAllocator(num_blocks=14, block_size=4, prefix_caching=prefix_caching)
    cache = _Cache(a)
    tokens: dict[int, list[int]] = {}
    next_token = iter(range(10**6))
    for op, x, y, k in ops:
        if op == "grow":
            seq = tokens.get(x, [])
            new = seq + [next(next_token) for _ in range(k)]
            if not a.can_allocate(x, len(new)):
                with pytest.raises(MemoryError):
                    a.allocate(x, len(new))
                continue
            if x not in tokens:
                a.match_prefix(x, new)       # fresh tokens: never a hit, but exercised
            a.allocate(x, len(new))
            cache.write(x, new, len(seq))
            a.register(x, new, len(new))
            tokens[x] = new
        elif op == "fork" and x in tokens and y not in tokens:
            a.fork(x, y)
            tokens[y] = list(tokens[x])
        elif op == "free" and x in tokens:
            a.free(x)
            del tokens[x]
        _check(a)
        for seq_id, seq in tokens.items():
            assert cache.read(seq_id, len(seq)) == seq, f"table {seq_id} sees another's tokens"
    for seq_id in list(a.tables):
        a.free(seq_id)
    assert a.num_free == a.num_blocks and a.tokens_stored == 0 and not any(a.ref_counts)


def test_fork_shares_full_blocks_and_copies_the_partial_one_once():
    a = BlockAllocator(num_blocks=8, block_size=4)
    a.allocate("p", 6)                       # one full block and 2 tokens of the second
    for child in ("c1", "c2"):
        a.fork("p", child)
    full, partial = a.tables["p"]
    assert a.ref_counts[full] == a.ref_counts[partial] == 3 and a.num_used == 2
    assert a.tokens_stored == 6, "shared blocks count once"
    a.allocate("c1", 7)
    (src, dst), = a.take_copies()
    assert src == partial and a.tables["c1"] == [full, dst] and a.ref_counts[partial] == 2
    a.allocate("p", 7)
    assert a.take_copies()[0][0] == partial
    a.allocate("c2", 7)                       # the last holder writes in place
    assert a.take_copies() == [] and a.tables["c2"] == [full, partial]
    assert a.num_used == 4 and a.tokens_stored == 4 + 3 * 3
    a.allocate("c2", 9)                       # past the partial block: a new block, no copy
    assert a.take_copies() == [] and len(a.tables["c2"]) == 3


def test_copy_on_write_counts_the_copy_against_the_pool():
    a = BlockAllocator(num_blocks=2, block_size=4)
    a.allocate("p", 6)
    a.fork("p", "c")
    assert not a.can_allocate("c", 7), "needs a block for the copy and none is free"
    a.free("p")
    assert a.can_allocate("c", 7) and a.allocate("c", 7) and a.take_copies() == []
