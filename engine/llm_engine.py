"""LLMEngine: the public face of the engine; requests in, per-step output deltas out.

``add_request`` and ``abort`` may be called from any thread: they only queue work, which
``step`` takes up at its start. Everything else runs on the thread that calls ``step``.
"""
import threading
from pathlib import Path

from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.faults import NONFINITE, NONFINITE_MESSAGE, sequence_error, step_error
from engine.model_runner import ModelRunner
from engine.models import read_spec
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status


class LLMEngine:
    def __init__(self, model_path: str | Path, **engine_args) -> None:
        self.config = EngineConfig(**engine_args)
        model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        spec = read_spec(AutoConfig.from_pretrained(model_path))
        limit = spec.max_position_embeddings
        self.max_model_len = min(self.config.max_model_len or limit, limit)
        self.eos_token_ids = _eos_ids(model_path, self.tokenizer)
        self.runner = ModelRunner(self.config, model_path, self.max_model_len, self.eos_token_ids)
        self.allocator = BlockAllocator(self.runner.num_blocks, self.config.block_size,
                                        self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.allocator)
        self.seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._live: set[str] = set()
        self.peak_running = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request; raises ValueError if it is malformed or can never fit."""
        params = params or SamplingParams()
        ids = self._tokenize(prompt)
        room = min(self.max_model_len, self.allocator.num_blocks * self.config.block_size)
        if len(ids) >= room:
            raise ValueError(f"prompt has {len(ids)} tokens; this engine fits at most {room - 1} "
                             f"(max_model_len {self.max_model_len}, KV pool "
                             f"{self.allocator.num_blocks * self.config.block_size} tokens)")
        max_tokens = params.max_tokens or room - len(ids)
        if len(ids) + max_tokens > room:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"the {room} tokens a sequence may hold")
        seq = Sequence(request_id, ids, params, max_tokens,
                       Detokenizer(self.tokenizer, ids, params.stop))
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already running")
            self._live.add(request_id)
            self._inbox.append(seq)

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
            self.seqs[seq.request_id] = seq
            self.scheduler.add(seq)
            self.prompt_tokens_total += seq.num_prompt_tokens
        outputs = [self._finish(self.seqs[rid], "abort") for rid in aborts if rid in self.seqs]
        batch = self.scheduler.schedule()
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        if not batch.seqs:
            return outputs
        try:
            tokens = self.runner.run(batch, self.allocator)
        except Exception as exc:    # the step's fault (OOM, kernel error): fail its requests
            message = step_error(exc, len(batch.seqs), self.runner.device)
            return outputs + [self._finish(seq, "error", error=message) for seq in batch.seqs]
        for seq, num_new, token in zip(batch.seqs, batch.num_new_tokens, tokens):
            if token == NONFINITE:      # one row's fault: its K/V is garbage, never register it
                outputs.append(self._finish(seq, "error", error=NONFINITE_MESSAGE))
                continue
            seq.num_computed_tokens += num_new
            self.allocator.register(seq.request_id, seq.token_ids, seq.num_computed_tokens)
            if token is not None:
                outputs.append(self._append(seq, token))
        return outputs

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
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
        if stopped:
            reason = "stop"
        elif n >= p.min_tokens and (token in p.stop_token_ids
                                    or (not p.ignore_eos and token in self.eos_token_ids)):
            reason = "stop"
        elif n >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is None:
            return self._output(seq, text, [token])
        return self._finish(seq, reason, text, [token])

    def _finish(self, seq: Sequence, reason: str, text: str = "",
                token_ids: list[int] | None = None, error: str | None = None) -> RequestOutput:
        self.scheduler.finish(seq, reason)
        del self.seqs[seq.request_id]
        with self._lock:
            self._live.discard(seq.request_id)
        return self._output(seq, text + seq.detokenizer.flush(), token_ids or [], reason, error)

    def _output(self, seq: Sequence, text: str, token_ids: list[int],
                reason: str | None = None, error: str | None = None) -> RequestOutput:
        return RequestOutput(seq.request_id, text, token_ids, reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, error, seq.queue_time_s)

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
        """Offline: run every prompt to completion; full results in the prompts' order.

        A prompt that cannot be served gets finish_reason "error" and the reason in ``error``.
        """
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{i}" for i in range(len(prompts))]
        results = {rid: RequestOutput(rid) for rid in ids}
        for rid, prompt, p in zip(ids, prompts, params_list):
            try:
                self.add_request(rid, prompt, p)
            except ValueError as e:
                results[rid].finish_reason, results[rid].error = "error", str(e)
        pending = sum(1 for r in results.values() if not r.finished)
        with tqdm(total=pending, desc="generate", disable=not use_tqdm) as bar:
            while self.has_unfinished():
                for out in self.step():
                    if out.request_id not in results:
                        continue
                    r = results[out.request_id]
                    r.text += out.text
                    r.token_ids += out.token_ids
                    r.prompt_tokens, r.completion_tokens = out.prompt_tokens, out.completion_tokens
                    r.queue_time_s = out.queue_time_s
                    if out.finished:
                        r.finish_reason, r.error = out.finish_reason, out.error
                        bar.update(1)
        return [results[rid] for rid in ids]


def _eos_ids(model_path: str, tokenizer) -> list[int]:
    """EOS ids from the checkpoint's generation config, else the tokenizer's."""
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
