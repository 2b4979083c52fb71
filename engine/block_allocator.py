"""BlockAllocator: the paged KV cache's free list, reference counts, block tables and prefix cache.

It hands out block ids only; the cache tensors live in the model runner. A sequence covering
n tokens holds exactly ceil(n / block_size) blocks.

Prefix caching: once a block is full, its contents are final, so it is registered under a key
made of its tokens and its predecessor's key (the whole prefix, in effect). A new sequence
whose leading full blocks match registered keys shares those blocks (reference count + 1)
and skips computing them. A block whose count drops to 0 goes to the tail of the free list
but keeps its key, so it can still be matched until it is handed out again: eviction is LRU.

Forks (parallel sampling, ``n`` > 1): a child table shares every block of its parent
(reference count + 1). Full blocks are final, so sharing them is free; a shared partial last
block is copied on write: the first table to append to it gets a fresh block and the copy
``(src, dst)`` is queued for the model runner (``take_copies``), which copies the K/V before
the step's forward writes anything. A block is written in place only while one table holds it.
"""
from typing import Hashable


class BlockAllocator:
    """Fixed pool of ``num_blocks`` blocks of ``block_size`` tokens, tables keyed by sequence id."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free_blocks: dict[int, None] = dict.fromkeys(range(num_blocks))   # LRU order
        self.ref_counts = [0] * num_blocks
        self.fill = [0] * num_blocks               # tokens written into each block
        self.block_key: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}           # key -> block id
        self.tables: dict[Hashable, list[int]] = {}
        self.keys: dict[Hashable, list[int]] = {}  # keys of each table's registered blocks
        self.num_tokens: dict[Hashable, int] = {}  # tokens each table covers
        self.tokens_stored = 0                     # tokens in blocks in use, shared ones once
        self.copies: list[tuple[int, int]] = []    # (src, dst) block copies not yet done

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: Hashable) -> list[int]:
        return self.tables.get(seq_id, [])

    def can_allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Whether the table of ``seq_id`` can grow to cover ``num_tokens`` tokens."""
        needed = self.blocks_for(num_tokens) - len(self.table(seq_id))
        return needed + self._shared_tail(seq_id, num_tokens) <= len(self.free_blocks)

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Grow (never shrink) the table of ``seq_id`` to cover ``num_tokens`` tokens; a shared
        partial last block it is about to write is copied first."""
        if not self.can_allocate(seq_id, num_tokens):
            raise MemoryError(f"{seq_id} needs {self.blocks_for(num_tokens)} KV blocks in all, "
                              f"{len(self.free_blocks)} free")
        table = self.tables.setdefault(seq_id, [])
        covered = self.num_tokens.get(seq_id, 0)
        if self._shared_tail(seq_id, num_tokens):
            self._copy_on_write(table, covered // self.block_size)
        while len(table) < self.blocks_for(num_tokens):
            table.append(self._fresh())
        for i in range(covered // self.block_size, self.blocks_for(num_tokens)):
            filled = min(self.block_size, num_tokens - i * self.block_size)
            if filled > self.fill[table[i]]:
                self.tokens_stored += filled - self.fill[table[i]]
                self.fill[table[i]] = filled
        self.num_tokens[seq_id] = max(covered, num_tokens)
        return table

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Give ``child_id`` a table sharing every block of ``parent_id``'s."""
        assert child_id not in self.tables, f"{child_id} already has a table"
        table = self.tables[parent_id]
        for block in table:
            self._take(block)
        self.tables[child_id] = list(table)
        self.keys[child_id] = list(self.keys.get(parent_id, []))
        self.num_tokens[child_id] = self.num_tokens[parent_id]

    def take_copies(self) -> list[tuple[int, int]]:
        """The queued (src, dst) block copies, to be done before this step's forward."""
        copies, self.copies = self.copies, []
        return copies

    def match_prefix(self, seq_id: Hashable, token_ids: list[int]) -> int:
        """Share the cached blocks that hold a prefix of ``token_ids`` with the new table of
        ``seq_id``; returns how many tokens they cover (never all: one is left to compute)."""
        assert seq_id not in self.tables
        if not self.prefix_caching:
            return 0
        table, keys = self.tables.setdefault(seq_id, []), self.keys.setdefault(seq_id, [])
        for i in range((len(token_ids) - 1) // self.block_size):
            key = self._key(keys, token_ids, i)
            block = self.cached.get(key)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                self.tokens_stored += self.fill[block]
            self._take(block)
            table.append(block)
            keys.append(key)
        self.num_tokens[seq_id] = len(table) * self.block_size
        return len(table) * self.block_size

    def register(self, seq_id: Hashable, token_ids: list[int], num_computed: int) -> None:
        """Offer every block of ``seq_id`` that ``num_computed`` tokens fill to the cache."""
        if not self.prefix_caching:
            return
        table, keys = self.tables[seq_id], self.keys.setdefault(seq_id, [])
        for i in range(len(keys), num_computed // self.block_size):
            key = self._key(keys, token_ids, i)
            keys.append(key)
            if key not in self.cached:        # else an identical block is already cached
                self.cached[key] = table[i]
                self.block_key[table[i]] = key

    def free(self, seq_id: Hashable) -> None:
        """Release every block of ``seq_id``; a block returns to the pool when unreferenced."""
        for block in reversed(self.tables.pop(seq_id, [])):    # tail blocks evicted first
            assert self.ref_counts[block] > 0, f"block {block} freed twice"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                self.tokens_stored -= self.fill[block]
                if self.block_key[block] is None:
                    self.fill[block] = 0
        self.keys.pop(seq_id, None)
        self.num_tokens.pop(seq_id, None)

    def _shared_tail(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Whether growing to ``num_tokens`` writes into a partial block another table holds."""
        covered = self.num_tokens.get(seq_id, 0)
        if covered % self.block_size == 0 or num_tokens <= covered:
            return False
        return self.ref_counts[self.tables[seq_id][covered // self.block_size]] > 1

    def _copy_on_write(self, table: list[int], i: int) -> None:
        src = table[i]
        dst = self._fresh()
        self.ref_counts[src] -= 1               # still held by another table
        self.fill[dst] = self.fill[src]
        self.tokens_stored += self.fill[dst]
        self.copies.append((src, dst))
        table[i] = dst

    def _fresh(self) -> int:
        """The least recently freed block, taken, with whatever it cached evicted."""
        block = next(iter(self.free_blocks))
        self._take(block)
        if self.block_key[block] is not None:
            del self.cached[self.block_key[block]]
            self.block_key[block] = None
        self.fill[block] = 0
        return block

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _key(self, keys: list[int], token_ids: list[int], i: int) -> int:
        parent = keys[i - 1] if i else 0
        return hash((parent, tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])))
