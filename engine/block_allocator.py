"""BlockAllocator: the paged KV cache's free list, reference counts and block tables.

It hands out block ids only; the cache tensors live in the model runner. A sequence covering
n tokens holds exactly ceil(n / block_size) blocks.
"""
from collections import deque


class BlockAllocator:
    """Fixed pool of ``num_blocks`` blocks of ``block_size`` tokens, tables keyed by sequence id."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.tables: dict[str, list[int]] = {}
        self.num_tokens: dict[str, int] = {}     # tokens each table covers

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def tokens_stored(self) -> int:
        return sum(self.num_tokens.values())

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self.tables.get(seq_id, [])

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        """Whether the table of ``seq_id`` can grow to cover ``num_tokens`` tokens."""
        return self.blocks_for(num_tokens) - len(self.table(seq_id)) <= len(self.free_blocks)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow (never shrink) the table of ``seq_id`` to cover ``num_tokens`` tokens."""
        if not self.can_allocate(seq_id, num_tokens):
            raise MemoryError(f"{seq_id} needs {self.blocks_for(num_tokens)} KV blocks in all, "
                              f"{len(self.free_blocks)} free")
        table = self.tables.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        for _ in range(need):
            block = self.free_blocks.popleft()
            assert self.ref_counts[block] == 0
            self.ref_counts[block] = 1
            table.append(block)
        self.num_tokens[seq_id] = max(self.num_tokens.get(seq_id, 0), num_tokens)
        return table

    def free(self, seq_id: str) -> None:
        """Release every block of ``seq_id``; a block returns to the pool when unreferenced."""
        for block in self.tables.pop(seq_id, []):
            assert self.ref_counts[block] > 0, f"block {block} freed twice"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        self.num_tokens.pop(seq_id, None)
