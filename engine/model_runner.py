"""ModelRunner: owns the model and its paged KV cache, and runs one flat batch per step.

Each step's sequences are laid end to end: every token gets its position and its cache slot
(``block * block_size + offset``), every sequence its block table, cached length and query
offset. Logits are computed only at the last position of sequences that finish their
uncomputed tokens this step; a prefill chunk that stops short samples nothing.
"""
import logging

import psutil
import torch

import kernels
from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig
from engine.faults import NONFINITE, finite_rows
from engine.models import AttentionMetadata, CausalLM, load_model
from engine.sampler import Sampler
from engine.scheduler import Batch

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int,
                 eos_token_ids: list[int]) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        if config.attention_backend != "auto":      # "auto" leaves KERNELS_BACKEND in force
            kernels.set_backend(config.attention_backend)
        if config.num_threads is not None:          # process-wide: threads started later follow
            torch.set_num_threads(config.num_threads)
        self.model: CausalLM = load_model(model_path, self.dtype, config.device, max_model_len)
        self.sampler = Sampler(eos_token_ids)
        self.num_blocks = self._size_pool()
        spec = self.model.spec
        shape = (self.num_blocks, config.block_size, spec.num_kv_heads, spec.head_dim)
        for attn in self.model.attention_layers():
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def block_bytes(self) -> int:
        spec = self.model.spec
        per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
        return per_token * self.config.block_size * self.dtype.itemsize

    def _size_pool(self) -> int:
        c = self.config
        if c.num_blocks is not None:
            return c.num_blocks
        if c.kv_cache_bytes is not None:
            budget = c.kv_cache_bytes
        elif self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * c.kv_cache_memory_fraction)
        else:
            budget = int(psutil.virtual_memory().available * c.kv_cache_memory_fraction)
        num_blocks = budget // self.block_bytes
        if num_blocks < 1:
            raise ValueError(f"KV budget of {budget} bytes holds no block of {self.block_bytes}")
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, c.block_size,
                 num_blocks * self.block_bytes / 2**20)
        return num_blocks

    @torch.inference_mode()
    def run(self, batch: Batch, allocator: BlockAllocator) -> list[int | None]:
        """Forward ``batch``; the sampled token per sequence (None: partial chunk, NONFINITE:
        that row's logits were not finite)."""
        ids, starts, sample_rows = [], [], []
        seq_lens, q_starts = [], [0]
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + num_new])
            starts.append(start)
            seq_lens.append(start + num_new)
            q_starts.append(q_starts[-1] + num_new)
            if start + num_new == seq.num_tokens:
                sample_rows.append(len(seq_lens) - 1)
        meta, pos = self._metadata(batch, allocator, starts, seq_lens, q_starts)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, meta)
        tokens: list[int | None] = [None] * len(batch.seqs)
        if sample_rows:
            last = torch.tensor([q_starts[r + 1] - 1 for r in sample_rows], device=self.device)
            logits = self.model.logits(hidden[last])
            finite = finite_rows(logits)
            if not all(finite):     # those rows fail alone (NONFINITE); the rest are sampled
                for r, ok in zip(sample_rows, finite):
                    tokens[r] = None if ok else NONFINITE
                logits = logits[torch.tensor(finite, device=logits.device)]
                sample_rows = [r for r, ok in zip(sample_rows, finite) if ok]
            if sample_rows:
                sampled = self.sampler(logits, [batch.seqs[r] for r in sample_rows])
                for r, token in zip(sample_rows, sampled):
                    tokens[r] = token
        return tokens

    def _metadata(self, batch: Batch, allocator: BlockAllocator, starts: list[int],
                  seq_lens: list[int], q_starts: list[int]
                  ) -> tuple[AttentionMetadata, torch.Tensor]:
        tables = [allocator.table(seq.request_id) for seq in batch.seqs]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables],
                                    dtype=torch.int32)
        q_lens = torch.tensor(batch.num_new_tokens)
        row = torch.repeat_interleave(torch.arange(len(tables)), q_lens)
        # Token j of sequence r sits at position starts[r] + (j - q_starts[r]).
        offsets = torch.tensor(starts) - torch.tensor(q_starts[:-1])
        pos = offsets[row] + torch.arange(len(row))
        bs = self.config.block_size
        slots = block_tables[row, pos // bs].long() * bs + pos % bs
        to = dict(device=self.device, non_blocking=True)
        meta = AttentionMetadata(
            slot_mapping=slots.to(**to),
            block_tables=block_tables.to(**to),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(**to),
            query_start_loc=torch.tensor(q_starts, dtype=torch.int32).to(**to),
        )
        return meta, pos.to(**to)
