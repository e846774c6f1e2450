"""Prometheus metrics under vLLM's names with the `orca:` prefix, so dashboards and routers built
for vLLM read them unchanged. Engine-wide numbers are sampled on the model loop after every
iteration; per-request latencies are observed by the request handlers."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from ..llm_engine import LLMEngine
from ..output_processor import TokenUpdate

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Metrics:
    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # no `*_created` series: dashboards built for vLLM do not expect them
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"orca:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"orca:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"orca:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be admitted")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")
        self.preemptions = counter("num_preemptions", "Requests preempted for recomputation")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self._success = Counter("orca:request_success", "Finished requests by finish reason",
                                ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", _LATENCY)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens", _LATENCY)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token", _LATENCY)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduling", _LATENCY)
        self.iteration_tokens = histogram("iteration_tokens", "Tokens computed per iteration", _TOKENS)
        self._seen = {"preemptions": 0, "queries": 0, "hits": 0}

    def request_finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def on_step(self, engine: LLMEngine, updates: list[TokenUpdate]) -> None:
        """Runs on the model loop after each iteration (and when it goes idle)."""
        sched, bm = engine.scheduler, engine.block_manager
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_usage.set(1 - bm.num_free_blocks / bm.num_blocks)
        if updates:
            self.generation_tokens.inc(len(updates))
            self.iteration_tokens.observe(engine.last_iteration_tokens)
        for key, now, metric in (("preemptions", sched.num_preemptions, self.preemptions),
                                 ("queries", bm.prefix_queries, self.prefix_queries),
                                 ("hits", bm.prefix_hits, self.prefix_hits)):
            if now > self._seen[key]:
                metric.inc(now - self._seen[key])
                self._seen[key] = now
