"""ModelRunner: owns the model and its paged KV cache, and runs one flat batch per step.

Each step's sequences are laid end to end: every token gets its position and its cache slot
(``block * block_size + offset``), every sequence its block table, cached length and query
offset. Logits are computed only at the last position of sequences that finish their
uncomputed tokens this step; a prefill chunk that stops short samples nothing. Choices forked
this step sample from their parent's row. Block copies the allocator queued (copy on write)
are done before the forward. Logprobs (engine/logprobs.py) are taken from the raw logits,
before the sampler touches them: of sampled tokens for sequences that score them, and of every
prompt position for sequences that still owe prompt logprobs.

With tensor parallelism (``ranks``: engine/tensor_parallel.py) the model is this rank's shard
and its cache holds this rank's KV heads; rank 0 sends each step's flat array and block copies
to the other ranks, which ``replay`` it, so every rank runs the same forward and logits calls.

``few_rows_threads`` (set by the TorchServe handler on CPU: one core less than the worker's)
runs steps of fewer than ``FEW_ROWS`` tokens on fewer threads. Such a step is a few
milliseconds of short parallel regions, and when TorchServe's frontend and the handler run on
one of the same cores every region waits for the thread that lost it: served at 2 threads one
stream got 56 tok/s against 71 on one thread, while 64 streams got 144 against 110
(docs/benchmarks.md, "All threads").
"""
import itertools
import logging

import numpy as np
import psutil
import torch

import kernels
from engine import logprobs
from engine.block_allocator import BlockAllocator
from engine.config import QUANTIZATIONS, EngineConfig
from engine.faults import NONFINITE, finite_rows
from engine.models import AttentionMetadata, CausalLM, Quantization, load_model, sharding
from engine.sampler import Sampler
from engine.scheduler import Batch
from engine.sequence import Sequence
from engine.tensor_parallel import LOGITS, STEP, Ranks, RanksLost

log = logging.getLogger(__name__)

FEW_ROWS = 4        # tokens in a step below which ``few_rows_threads`` applies


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int,
                 eos_token_ids: list[int], ranks: Ranks | None = None) -> None:
        self.config = config
        self.ranks = ranks
        self.hidden: torch.Tensor | None = None     # a follower: the last step's, for LOGITS
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.cache_dtype = (torch.float8_e4m3fn if config.cache_dtype == "fp8"
                            else getattr(torch, config.cache_dtype))
        if config.attention_backend != "auto":      # "auto" leaves KERNELS_BACKEND in force
            kernels.set_backend(config.attention_backend)
        if config.num_threads is not None:          # process-wide: threads started later follow
            torch.set_num_threads(config.num_threads)
        self.model: CausalLM = load_model(model_path, self.dtype, config.device, max_model_len)
        if ranks is not None:
            sharding.shard(self.model, ranks.rank, ranks.size, ranks.group)
        quantization = None if config.quantization is None else Quantization(
            QUANTIZATIONS[config.quantization], config.quantization_group_size)
        self.model.pack(quantization)
        kernels.release_freed_heap()    # the loader's transient copies (~2x the weights)
        self.sampler = Sampler(eos_token_ids)
        self.num_blocks = self._size_pool()
        assert self.num_blocks * config.block_size < 2**31, "cache slots are sent as int32"
        spec = self.model.spec
        shape = (spec.num_layers, self.num_blocks, config.block_size, self.model.kv_heads,
                 spec.head_dim)
        arena = kernels.HugePageArena()     # on CPU the cache's blocks sit in huge pages
        self.k_cache = arena.zeros(shape, self.cache_dtype, self.device)
        self.v_cache = arena.zeros(shape, self.cache_dtype, self.device)
        self.model.set_caches(self.k_cache, self.v_cache)

    @property
    def block_bytes(self) -> int:
        spec = self.model.spec
        per_token = 2 * spec.num_layers * self.model.kv_heads * spec.head_dim
        return per_token * self.config.block_size * self.cache_dtype.itemsize

    def _size_pool(self) -> int:
        c = self.config
        if c.num_blocks is not None:
            return c.num_blocks
        if c.kv_cache_bytes is not None:
            budget = c.kv_cache_bytes
        elif self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * c.kv_cache_memory_fraction)
        else:   # the ranks of one host share its memory
            budget = int(psutil.virtual_memory().available * c.kv_cache_memory_fraction
                         / c.tensor_parallel_size)
        num_blocks = budget // self.block_bytes
        if self.ranks is not None:      # every rank's pool has the same blocks
            num_blocks = self.ranks.min(num_blocks)
        if num_blocks < 1:
            raise ValueError(f"KV budget of {budget} bytes holds no block of {self.block_bytes}")
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, c.block_size,
                 num_blocks * self.block_bytes / 2**20)
        return num_blocks

    def run(self, batch: Batch, allocator: BlockAllocator) -> list[int | None]:
        """Forward ``batch``; the sampled token per sequence (None: partial chunk, NONFINITE:
        that row's logits were not finite), then one per forked choice. With other ranks any
        failure is ``RanksLost``: they may be stopped mid-step, out of step for good."""
        if self.ranks is None:
            return self._run(batch, allocator)
        try:
            return self._run(batch, allocator)
        except Exception as exc:
            raise RanksLost(f"tensor parallel step failed (a rank died or stopped "
                            f"answering?): {type(exc).__name__}: {str(exc)[:300]}") from exc

    @torch.inference_mode()
    def _run(self, batch: Batch, allocator: BlockAllocator) -> list[int | None]:
        copies = allocator.take_copies()
        self.copy_blocks(copies)
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
        rows = sample_rows + [r for r, _ in batch.forks]
        last = [q_starts[r + 1] - 1 for r in rows]
        flat, sizes, width = self._flat(batch, allocator, ids, starts, seq_lens, q_starts, last)
        self._pick_threads(len(ids))
        if self.ranks is not None:
            copied = np.asarray(copies, dtype=np.int32).reshape(-1)
            self.ranks.send(STEP, np.concatenate([[len(copies)], copied, sizes, [width], flat]))
        input_ids, pos, meta, last_rows = self._views(flat, sizes, width)
        hidden = self.model(input_ids, pos, meta)
        # on every rank: the logits of the sampled rows first, then any prompt rows
        logits = self.model.logits(hidden.index_select(0, last_rows)) if rows else None
        self._score_prompts(batch, hidden, starts, q_starts)
        tokens: list[int | None] = [None] * (len(batch.seqs) + len(batch.forks))
        if rows:
            seqs = [batch.seqs[r] for r in sample_rows] + [child for _, child in batch.forks]
            slots = sample_rows + list(range(len(batch.seqs), len(tokens)))   # where tokens go
            finite = finite_rows(logits)
            if not all(finite):     # those rows fail alone (NONFINITE); the rest are sampled
                for slot, ok in zip(slots, finite):
                    tokens[slot] = None if ok else NONFINITE
                logits = logits[torch.tensor(finite, device=logits.device)]
                seqs = [seq for seq, ok in zip(seqs, finite) if ok]
                slots = [slot for slot, ok in zip(slots, finite) if ok]
            if seqs:
                scored = [i for i, seq in enumerate(seqs) if seq.scores_tokens]
                raw = logits[scored] if scored else None  # the sampler may edit logits in place
                sampled = self.sampler(logits, seqs)
                if scored:
                    self._score_samples(raw, [seqs[i] for i in scored],
                                        [sampled[i] for i in scored])
                for slot, token in zip(slots, sampled):
                    tokens[slot] = token
        return tokens

    @torch.inference_mode()
    def replay(self, message: np.ndarray) -> None:
        """A follower: run the step rank 0 sent (``run``'s block copies, forward and logits
        of the sampled rows), keeping its hidden states for ``replay_logits``."""
        n = int(message[0])
        copies = message[1:1 + 2 * n].reshape(-1, 2).tolist()
        rest = message[1 + 2 * n:]
        self.copy_blocks([tuple(c) for c in copies])
        input_ids, pos, meta, last_rows = self._views(rest[8:].copy(), rest[:7].tolist(),
                                                      int(rest[7]))
        self._pick_threads(int(input_ids.numel()))
        self.hidden = self.model(input_ids, pos, meta)
        if last_rows.numel():
            self.model.logits(self.hidden.index_select(0, last_rows))

    @torch.inference_mode()
    def replay_logits(self, rows: np.ndarray) -> None:
        """A follower: the logits of more rows of the last step (prompt logprobs)."""
        self.model.logits(self.hidden[torch.from_numpy(rows.astype(np.int64))])

    def _pick_threads(self, tokens: int) -> None:
        """This thread's intra-op threads for a step of ``tokens`` tokens."""
        few, full = self.config.few_rows_threads, self.config.num_threads
        if few is None or full is None:
            return
        want = few if tokens < FEW_ROWS else full
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def _logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Logits of some rows of this step's hidden states, on every rank."""
        if self.ranks is not None:
            self.ranks.send(LOGITS, np.asarray(rows, dtype=np.int32))
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)])

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks ``src -> dst`` in every layer (copy on write of shared blocks)."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (self.k_cache, self.v_cache):     # every layer at once
            if cache.element_size() == 1:      # fp8: index ops are not implemented for it
                cache = cache.view(torch.uint8)
            cache.index_copy_(1, dst, cache.index_select(1, src))

    def _score_samples(self, logits: torch.Tensor, seqs: list[Sequence],
                       tokens: list[int]) -> None:
        top_n = [seq.params.logprobs or 0 for seq in seqs]
        for seq, entry in zip(seqs, logprobs.gather(logits, tokens, top_n)):
            seq.cumulative_logprob += entry.token.logprob
            if seq.params.logprobs is not None:
                seq.logprobs.append(entry)

    def _score_prompts(self, batch: Batch, hidden: torch.Tensor, starts: list[int],
                       q_starts: list[int], rows_per_call: int = 256) -> None:
        """Logprobs of the prompt tokens this step's positions predict, for those who owe them."""
        rows, targets, owners = [], [], []
        for r, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if not seq.needs_prompt_logprobs:
                continue
            # position p predicts token p + 1; after a preemption skip what is already known
            first = max(starts[r], len(seq.prompt_logprobs) - 1)
            end = min(starts[r] + num_new, seq.num_prompt_tokens - 1)
            for p in range(first, end):
                rows.append(q_starts[r] + p - starts[r])
                targets.append(seq.token_ids[p + 1])
                owners.append(seq)
        for i in range(0, len(rows), rows_per_call):
            part = slice(i, i + rows_per_call)
            entries = logprobs.gather(self._logits(hidden, rows[part]), targets[part],
                                      [seq.params.prompt_logprobs for seq in owners[part]])
            for seq, entry in zip(owners[part], entries):
                seq.prompt_logprobs.append(entry)

    def _flat(self, batch: Batch, allocator: BlockAllocator, ids: list[int],
              starts: list[int], seq_lens: list[int], q_starts: list[int], last: list[int]
              ) -> tuple[np.ndarray, list[int], int]:
        """Input ids, positions, slots, sequence lengths, query starts, the rows to sample and
        the block tables in one int32 array (with each part's size and the tables' width)."""
        tables = [allocator.table(seq.seq_id) for seq in batch.seqs]
        width = max(len(t) for t in tables)
        block_tables = np.full((len(tables), width), -1, dtype=np.int32)
        for r, table in enumerate(tables):
            block_tables[r, :len(table)] = table
        # numpy, not torch: these arrays are tiny and a torch op costs ~5-10 us of dispatch
        row = np.repeat(np.arange(len(tables)), batch.num_new_tokens)
        # Token j of sequence r sits at position starts[r] + (j - q_starts[r]).
        pos = (np.asarray(starts) - np.asarray(q_starts[:-1]))[row] + np.arange(len(row))
        bs = self.config.block_size
        slots = block_tables[row, pos // bs] * bs + pos % bs
        parts = [ids, pos, slots, seq_lens, q_starts, last, block_tables.ravel()]
        # Every part starts on a 16-byte boundary, as the compiled Triton variants expect.
        sizes = [len(part) for part in parts]
        ends = list(itertools.accumulate(-(-n // 4) * 4 for n in sizes))
        flat = np.zeros(ends[-1], dtype=np.int32)
        for part, end, n in zip(parts, [0] + ends, sizes):
            flat[end:end + n] = part
        return flat, sizes, width

    def _views(self, flat: np.ndarray, sizes: list[int], width: int
               ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """``_flat``'s array sent to the device in one non-blocking copy (from pinned memory
        on CUDA), as input ids, positions, attention metadata and the rows to sample: the
        layers then read only device tensors, with no host-device sync per layer."""
        ends = list(itertools.accumulate(-(-n // 4) * 4 for n in sizes))
        host = torch.from_numpy(flat)
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        ids_d, pos_d, slots_d, seq_lens_d, q_starts_d, last_d, tables_d = (
            dev[end:end + n] for end, n in zip([0] + ends, sizes))
        meta = AttentionMetadata(slot_mapping=slots_d, block_tables=tables_d.view(-1, width),
                                 seq_lens=seq_lens_d, query_start_loc=q_starts_d)
        return ids_d, pos_d, meta, last_d
