"""LLMEngine: the public face of the engine; requests in, per-step output deltas out.

``add_request`` and ``abort`` may be called from any thread: they only queue work, which
``step`` takes up at its start. Everything else runs on the thread that calls ``step``.
A request may carry several prompts, and each prompt with ``n`` or ``best_of`` > 1 is forked
into its choices when its last chunk is scheduled (engine/parallel_sampling.py); every
choice of every prompt is a sequence of its own and reports its own deltas.
With ``tensor_parallel_size`` N > 1 this process is rank 0 of N (engine/tensor_parallel.py):
the engine is unchanged, the runner's forward runs on every rank; a lost rank ends every
sequence with an error and the engine refuses new requests (``failed``).
"""
import os
import threading
import weakref
from pathlib import Path

from tqdm import tqdm

from engine import tensor_parallel
from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.faults import NONFINITE, NONFINITE_MESSAGE, sequence_error, step_error
from engine.logprobs import TokenTexts
from engine.model_runner import ModelRunner
from engine.models import read_config, read_eos_ids, read_spec, read_tokenizer, sharding
from engine.models.gguf_file import is_gguf
from engine.outputs import EngineStats, RequestOutput
from engine.parallel_sampling import ParentRequest
from engine.sampling_params import SamplingParams
from engine.scheduler import Batch, Scheduler
from engine.sequence import Sequence, Status
from engine.structured_output import GrammarCompiler, wait_any

Prompt = str | list[int]
GRAMMAR_DEAD_END = ("structured_outputs: the grammar allows no token here (min_tokens or "
                    "stop_token_ids left nothing to sample)")


class LLMEngine:
    def __init__(self, model_path: str | Path, **engine_args) -> None:
        self.config = EngineConfig(**engine_args)
        model_path = str(model_path)
        config = read_config(model_path)        # first: a broken file's error names it
        self.tokenizer = read_tokenizer(model_path)
        if is_gguf(model_path) and self.config.quantization is not None:
            raise ValueError(f"quantization {self.config.quantization!r} is for dense "
                             "checkpoints; a GGUF file is served in its own types")
        spec = read_spec(config)
        self.max_model_len = self.config.model_len(spec.max_position_embeddings)
        self.eos_token_ids = read_eos_ids(model_path, self.tokenizer)
        self.ranks = self._start_ranks(spec, model_path)
        self.failed: str | None = None      # a lost rank's message: the engine is over
        self.runner = ModelRunner(self.config, model_path, self.max_model_len, self.eos_token_ids,
                                  self.ranks)
        self.allocator = BlockAllocator(self.runner.num_blocks, self.config.block_size,
                                        self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.allocator)
        self.grammars = GrammarCompiler(self.tokenizer, spec.vocab_size, self.eos_token_ids)
        self._compiling: list[Sequence] = []    # admitted once their grammar is compiled
        self.token_texts = TokenTexts(self.tokenizer)
        self.seqs: dict[str, Sequence] = {}           # by request id: its first choice
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._live: set[str] = set()
        self.peak_running = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _start_ranks(self, spec, model_path: str) -> tensor_parallel.Ranks | None:
        """The other ranks, for tensor parallelism; on CPU each rank takes its share of the
        cores unless ``num_threads`` is set."""
        c = self.config
        if c.tensor_parallel_size == 1:
            return None
        sharding.check(spec, c.tensor_parallel_size)    # before any process starts
        if c.device == "cpu" and c.num_threads is None:
            c.num_threads = max(1, len(os.sched_getaffinity(0)) // c.tensor_parallel_size)
        ranks = tensor_parallel.start(c, model_path, self.max_model_len)
        weakref.finalize(self, ranks.close)     # at close(), collection or interpreter exit
        return ranks

    def close(self) -> None:
        """Stop the other ranks (tensor parallelism); a no-op otherwise."""
        if self.ranks is not None:
            self.ranks.close()

    def add_request(self, request_id: str, prompt: Prompt | list[Prompt],
                    params: SamplingParams | None = None) -> None:
        """Queue a request: one prompt (text or token ids) or a list of them, each with its
        own ``n`` choices; raises ValueError if it is malformed or can never fit, and
        RuntimeError once a lost rank has ended the engine."""
        if self.failed is not None:
            raise RuntimeError(self.failed)
        params = params or SamplingParams()
        prompts = _prompts(prompt)
        vocab = self.runner.model.spec.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias: token id {max(params.logit_bias)} is not in the "
                             f"vocabulary [0, {vocab})")
        if params.num_children > self.config.max_num_seqs:
            raise ValueError(f"n/best_of ({params.num_children}) exceeds max_num_seqs "
                             f"({self.config.max_num_seqs}): its choices run side by side")
        heads = []
        for p, one in enumerate(prompts):
            where = f"prompt {p}: " if len(prompts) > 1 else ""
            try:
                ids, max_tokens = self._fit(self._tokenize(one), params)
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
            seq = Sequence(request_id, ids, params, max_tokens,
                           Detokenizer(self.tokenizer, ids, params.stop),
                           index=p * params.num_children, prompt_index=p)
            if params.structured_outputs is not None:
                seq.grammar = self.grammars.start(params.structured_outputs)
            heads.append(seq)
        if len(heads) > 1 or params.num_children > 1:
            ParentRequest(params, heads)
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already running")
            self._live.add(request_id)
            self._inbox.extend(heads)

    def _fit(self, ids: list[int], params: SamplingParams) -> tuple[list[int], int]:
        """The prompt and its resolved max_tokens, if they fit a sequence."""
        room = min(self.max_model_len, self.allocator.num_blocks * self.config.block_size)
        if len(ids) >= room:
            raise ValueError(f"prompt has {len(ids)} tokens; this engine fits at most {room - 1} "
                             f"(max_model_len {self.max_model_len}, KV pool "
                             f"{self.allocator.num_blocks * self.config.block_size} tokens)")
        max_tokens = room - len(ids) if params.max_tokens is None else params.max_tokens
        if len(ids) + max_tokens > room:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"the {room} tokens a sequence may hold")
        return ids, max_tokens

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        else:
            ids = list(prompt)
            vocab = self.runner.model.spec.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids must be ints in [0, {vocab}); got {bad[:3]}")
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def abort(self, request_id: str) -> None:
        """Stop a request; its final output (finish_reason "abort") comes from the next step."""
        with self._lock:
            if request_id in self._live:
                self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    def step(self) -> list[RequestOutput]:
        """Admit queued requests, run one batch, and return every request's new output."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for seq in inbox:
            self.seqs.setdefault(seq.request_id, seq)
            self._compiling.append(seq)
            self.prompt_tokens_total += seq.num_prompt_tokens
        outputs = [out for rid in aborts if rid in self.seqs for out in self._abort(rid)]
        outputs += self._admit()
        batch = self.scheduler.schedule()
        self._fork(batch)
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        if not batch.seqs:
            if self._compiling:     # nothing to run until a grammar is ready: do not spin
                wait_any([s.grammar for s in self._compiling], timeout_s=0.01)
            return outputs
        children = [child for _, child in batch.forks]
        try:
            tokens = self.runner.run(batch, self.allocator)
        except tensor_parallel.RanksLost as exc:    # every request, and every later one
            self.failed = f"{exc}; this engine stopped"
            return outputs + [out for rid in list(self.seqs)
                              for out in self._abort(rid, "error", self.failed)]
        except Exception as exc:    # the step's fault (OOM, kernel error): fail its requests
            message = step_error(exc, len(batch.seqs), self.runner.device)
            return outputs + [out for seq in batch.seqs + children
                              for out in self._finish(seq, "error", error=message)]
        for seq, num_new, token in zip(batch.seqs, batch.num_new_tokens, tokens):
            if token == NONFINITE:      # one row's fault: its K/V is garbage, never register it
                outputs += self._finish(seq, "error", error=NONFINITE_MESSAGE)
                continue
            seq.num_computed_tokens += num_new
            self.allocator.register(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if token is not None:
                outputs += self._append(seq, token)
        for child, token in zip(children, tokens[len(batch.seqs):]):
            if token == NONFINITE:      # its parent's row: the shared prompt K/V is garbage
                outputs += self._finish(child, "error", error=NONFINITE_MESSAGE)
            else:
                outputs += self._append(child, token)
        return outputs

    def _admit(self) -> list[RequestOutput]:
        """Hand the scheduler each new sequence whose grammar (if any) has compiled."""
        compiling, self._compiling = self._compiling, []
        outputs = []
        for seq in compiling:
            if seq.grammar is None:
                self.scheduler.add(seq)
            elif not seq.grammar.ready:
                self._compiling.append(seq)
            elif seq.grammar.error:
                outputs += self._finish(seq, "error", error=seq.grammar.error)
            else:
                seq.grammar.start()
                self.scheduler.add(seq)
        return outputs

    def _fork(self, batch: Batch) -> None:
        """Fork the other choices of prompts whose last chunk is scheduled this step."""
        for row, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.to_fork == 0 or seq.num_computed_tokens + num_new < seq.num_tokens:
                continue
            assert seq.num_output_tokens == 0, "a prompt forks before its first token"
            parent = seq.parent
            for choice in range(1, seq.to_fork + 1):
                params = parent.child_params(seq.params, choice)
                child = Sequence(seq.request_id, seq.token_ids, params, seq.max_tokens,
                                 Detokenizer(self.tokenizer, seq.token_ids, params.stop),
                                 seq.index + choice, parent, seq.prompt_index)
                child.arrival_time, child.queue_time_s = seq.arrival_time, seq.queue_time_s
                child.num_computed_tokens = seq.num_computed_tokens + num_new
                if seq.grammar is not None:
                    child.grammar = seq.grammar.fork()
                self.allocator.fork(seq.seq_id, child.seq_id)
                self.scheduler.add_running(child)
                parent.seqs.append(child)
                batch.forks.append((row, child))
            seq.to_fork = 0

    def _abort(self, request_id: str, reason: str = "abort",
               error: str | None = None) -> list[RequestOutput]:
        head = self.seqs[request_id]
        choices = head.parent.seqs if head.parent else [head]
        return [out for seq in list(choices) if seq.status is not Status.FINISHED
                for out in self._finish(seq, reason, error=error)]

    def _append(self, seq: Sequence, token: int) -> list[RequestOutput]:
        if seq.max_tokens == 0:         # prompt scoring only: the sampled token is dropped
            return self._finish(seq, "length")
        if seq.grammar is not None and not seq.grammar.accept(token):
            return self._finish(seq, "error", error=GRAMMAR_DEAD_END)
        seq.token_ids.append(token)
        self.generation_tokens_total += 1
        try:
            text, stopped = seq.detokenizer.add(token)
        except Exception as exc:    # this sequence's fault only
            return self._finish(seq, "error", token_ids=[token],
                                error=sequence_error("detokenizer", exc))
        p = seq.params
        n = seq.num_output_tokens
        reason = None
        if stopped or (seq.grammar is not None and seq.grammar.ended):
            reason = "stop"
        elif n >= p.min_tokens and (token in p.stop_token_ids
                                    or (not p.ignore_eos and token in self.eos_token_ids)):
            reason = "stop"
        elif n >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is None:
            if seq.parent is not None and seq.parent.ranks:
                return []                # best_of: reported once every choice has finished
            return [self._output(seq, text, [token])]
        return self._finish(seq, reason, text, [token])

    def _finish(self, seq: Sequence, reason: str, text: str = "",
                token_ids: list[int] | None = None,
                error: str | None = None) -> list[RequestOutput]:
        self.scheduler.finish(seq, reason)
        if seq in self._compiling:
            self._compiling.remove(seq)
        parent = seq.parent
        if parent is not None:
            parent.num_seqs -= seq.to_fork   # ended before its fork: those never start
            seq.to_fork = 0
            parent.num_finished += 1
        text += seq.detokenizer.flush()
        if parent is None or parent.choices_running == 0:
            del self.seqs[seq.request_id]
            with self._lock:
                self._live.discard(seq.request_id)
        if parent is None or not parent.ranks:
            return [self._output(seq, text, token_ids or [], reason, error)]
        if parent.prompt_running(seq.prompt_index):
            return []
        winners = parent.winners(seq.prompt_index)
        first = seq.prompt_index * parent.n
        return [self._output(w, w.detokenizer.text, w.output_token_ids, w.finish_reason,
                             error if w is seq else None, index=first + i,
                             choices_running=parent.choices_running + len(winners) - 1 - i)
                for i, w in enumerate(winners)]

    def _output(self, seq: Sequence, text: str, token_ids: list[int],
                reason: str | None = None, error: str | None = None, index: int | None = None,
                choices_running: int | None = None) -> RequestOutput:
        """A delta of ``seq``'s choice; ``index`` and ``choices_running`` are given for best_of."""
        parent = seq.parent
        if choices_running is None:
            choices_running = parent.choices_running if parent else 0
        prompt_tokens = parent.prompt_tokens if parent else seq.num_prompt_tokens
        out = RequestOutput(seq.request_id, text, token_ids, reason, prompt_tokens,
                            seq.num_output_tokens, error, seq.queue_time_s,
                            index=seq.index if index is None else index,
                            choices_running=choices_running)
        if seq.params.logprobs is not None:
            out.logprobs = self.token_texts.fill(seq.logprobs[len(seq.logprobs) - len(token_ids):])
        if seq.scores_tokens:
            out.cumulative_logprob = seq.cumulative_logprob
        head = parent.heads[seq.prompt_index] if parent else seq
        if head.params.prompt_logprobs is not None and not head.needs_prompt_logprobs:
            if not head.prompt_logprobs_sent:
                head.prompt_logprobs_sent = True
                out.prompt_logprobs = self.token_texts.fill(head.prompt_logprobs)
        return out

    def stats(self) -> EngineStats:
        a, s = self.allocator, self.scheduler
        used = a.num_used
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_blocks=a.num_blocks,
            num_blocks_used=used, tokens_stored=a.tokens_stored,
            kv_utilization=a.tokens_stored / (used * a.block_size) if used else 0.0,
            num_preemptions=s.num_preemptions, num_chunked_prefills=s.num_chunked_prefills,
            prefix_cache_hit_tokens=s.num_cached_tokens,
            peak_running=self.peak_running, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total)

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Offline: run every prompt to completion; full results in the prompts' order, one
        per choice (``index`` 0..n-1) for a prompt that asks for ``n`` > 1.

        A prompt that cannot be served gets finish_reason "error" and the reason in ``error``.
        """
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{i}" for i in range(len(prompts))]
        slots = [(rid, j) for rid, p in zip(ids, params_list)
                 for j in range((p or SamplingParams()).n)]
        results = {(rid, j): RequestOutput(rid, index=j) for rid, j in slots}
        pending = len(ids)
        for rid, prompt, p in zip(ids, prompts, params_list):
            try:
                self.add_request(rid, prompt, p)
            except ValueError as e:
                pending -= 1
                for j in range((p or SamplingParams()).n):
                    results[rid, j].finish_reason, results[rid, j].error = "error", str(e)
        with tqdm(total=pending, desc="generate", disable=not use_tqdm) as bar:
            while self.has_unfinished():
                for out in self.step():
                    r = results.get((out.request_id, out.index))
                    if r is None:
                        continue
                    r.text += out.text
                    r.token_ids += out.token_ids
                    r.prompt_tokens, r.completion_tokens = out.prompt_tokens, out.completion_tokens
                    r.queue_time_s = out.queue_time_s
                    r.cumulative_logprob = out.cumulative_logprob
                    if out.logprobs is not None:
                        r.logprobs = (r.logprobs or []) + out.logprobs
                    if out.prompt_logprobs is not None:
                        for rid, j in slots:
                            if rid == out.request_id:
                                results[rid, j].prompt_logprobs = out.prompt_logprobs
                    r.finish_reason = out.finish_reason
                    r.error = out.error or r.error
                    bar.update(out.finished)
        if self.failed is not None:
            raise RuntimeError(self.failed)
        return [results[slot] for slot in slots]


def _prompts(prompt: Prompt | list[Prompt]) -> list[Prompt]:
    """A request's prompts: a list of texts or of token-id lists is many, else one."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return prompt
    return [prompt]
