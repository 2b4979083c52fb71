"""StreamMetrics: LLM serving metrics through TorchServe's metrics API (context.metrics).

Every name here is declared in config/metrics.yaml (``model_metrics``): in Prometheus mode
TorchServe 0.12's frontend only exports backend metrics it finds in that file (unless
``model_metrics_auto_detect=true``). Latencies are histograms in seconds, one observation
per request; engine state is sampled into gauges; token and preemption totals are counters.
"""
import logging
import threading
from typing import Any

from ts.metrics.metric_type_enum import MetricTypes

logger = logging.getLogger(__name__)

TTFT = "llm_time_to_first_token_seconds"
ITL = "llm_inter_token_latency_seconds"          # a request's mean gap between tokens
QUEUE = "llm_queue_time_seconds"
E2E = "llm_e2e_latency_seconds"
RUNNING = "llm_requests_running"
WAITING = "llm_requests_waiting"
BLOCKS_USED = "llm_kv_blocks_used"
BLOCKS_TOTAL = "llm_kv_blocks_total"
KV_UTIL = "llm_kv_utilization"
PEAK_RUNNING = "llm_peak_running"
PREEMPTIONS = "llm_preemptions_total"
PROMPT_TOKENS = "llm_prompt_tokens_total"
GENERATION_TOKENS = "llm_generation_tokens_total"
PREFIX_HITS = "llm_prefix_cache_hit_tokens_total"

KINDS = {TTFT: MetricTypes.HISTOGRAM, ITL: MetricTypes.HISTOGRAM, QUEUE: MetricTypes.HISTOGRAM,
         E2E: MetricTypes.HISTOGRAM, RUNNING: MetricTypes.GAUGE, WAITING: MetricTypes.GAUGE,
         BLOCKS_USED: MetricTypes.GAUGE, BLOCKS_TOTAL: MetricTypes.GAUGE,
         KV_UTIL: MetricTypes.GAUGE, PEAK_RUNNING: MetricTypes.GAUGE,
         PREEMPTIONS: MetricTypes.COUNTER, PROMPT_TOKENS: MetricTypes.COUNTER,
         GENERATION_TOKENS: MetricTypes.COUNTER, PREFIX_HITS: MetricTypes.COUNTER}
UNITS = {MetricTypes.HISTOGRAM: "s", MetricTypes.GAUGE: "count", MetricTypes.COUNTER: "count"}


class StreamMetrics:
    """Thin typed front over ``context.metrics`` with the model name as the one dimension."""

    def __init__(self, metrics_cache: Any, model_name: str) -> None:
        self._cache = metrics_cache
        self._model_name = model_name
        self._lock = threading.Lock()
        self._totals = {PREEMPTIONS: 0, PROMPT_TOKENS: 0, GENERATION_TOKENS: 0, PREFIX_HITS: 0}
        self._metrics: dict[str, Any] = {}
        for name, kind in KINDS.items():
            try:
                self._metrics[name] = self._cache.get_metric(name, kind)
            except Exception:  # not declared in the yaml: create it (logged, not exported)
                logger.warning("metric %s is not declared in the metrics yaml", name)
                self._metrics[name] = self._cache.add_metric_to_cache(
                    name, UNITS[kind], ["ModelName"], kind)

    def _put(self, name: str, value: float) -> None:
        with self._lock:
            self._metrics[name].add_or_update(value, [self._model_name])

    def first_token(self, ttft_s: float, queue_time_s: float | None) -> None:
        self._put(TTFT, ttft_s)
        if queue_time_s is not None:
            self._put(QUEUE, queue_time_s)

    def finished(self, stream: Any, now_s: float) -> None:
        self._put(E2E, now_s - stream.arrival_s)
        tokens = max(stream.choice_tokens.values(), default=0)   # n > 1: choices run abreast
        if stream.first_token_s is not None and tokens > 1:
            self._put(ITL, (stream.last_token_s - stream.first_token_s) / (tokens - 1))

    def engine(self, stats: Any) -> None:
        """Sample the engine's gauges and turn its cumulative totals into counter increments."""
        self._put(RUNNING, stats.num_running)
        self._put(WAITING, stats.num_waiting)
        self._put(BLOCKS_USED, stats.num_blocks_used)
        self._put(BLOCKS_TOTAL, stats.num_blocks)
        self._put(KV_UTIL, stats.kv_utilization)
        self._put(PEAK_RUNNING, stats.peak_running)
        for name, total in ((PREEMPTIONS, stats.num_preemptions),
                            (PROMPT_TOKENS, stats.prompt_tokens_total),
                            (GENERATION_TOKENS, stats.generation_tokens_total),
                            (PREFIX_HITS, stats.prefix_cache_hit_tokens)):
            increment = total - self._totals[name]
            if increment > 0:
                self._totals[name] = total
                self._put(name, increment)
