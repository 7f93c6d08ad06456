"""GET /metrics: the server's counters in the Prometheus text format (prometheus-client).

Names follow vLLM's and llama-server's (`vllm:num_requests_running`, `llamacpp:kv_cache_tokens`,
...) under the prefix `blendin:`; what only this server knows is the blending: interventions,
the intervention rate and alpha per request, by method. Each Server has its own registry (several
can live in one process: the tests'). The gauges are read at scrape time from the batcher's
counts, which the engine thread keeps (/health reads the same).
"""
from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds: from a few milliseconds (a GPU's token) to minutes (a long CPU prefill)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FRACTION_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, batcher, models: dict):
        """`models`: {role: Model} of the server (for their KV cells)."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("blendin:requests", "HTTP requests answered, by endpoint, blending method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.prompt_tokens = Counter("blendin:prompt_tokens", "Prompt tokens of finished generations", ["method"],
                                     registry=r)
        self.generation_tokens = Counter("blendin:generation_tokens", "Generated tokens (the end token not counted)",
                                         ["method"], registry=r)
        self.interventions = Counter("blendin:interventions", "Tokens the guide steered (intervened)", ["method"],
                                     registry=r)
        self.ttft = Histogram("blendin:time_to_first_token_seconds",
                              "From the request's arrival in the queue to its first token", ["method"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("blendin:time_per_output_token_seconds",
                              "Mean time per token after the first, per request", ["method"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.rate = Histogram("blendin:request_intervention_rate", "Share of a request's tokens the guide steered",
                              ["method"], buckets=FRACTION_BUCKETS, registry=r)
        self.alpha = Histogram("blendin:request_mean_alpha", "A request's mean mixing weight alpha where it intervened",
                               ["method"], buckets=FRACTION_BUCKETS, registry=r)

        def state(key):
            return lambda: batcher.state()[key]
        Gauge("blendin:num_requests_running", "Requests decoding in a slot, plus a job running with the models alone",
              registry=r).set_function(lambda: (lambda s: s["running"] + (s["job"] is not None))(batcher.state()))
        Gauge("blendin:num_requests_waiting", "Requests and jobs waiting for the models", registry=r
              ).set_function(state("waiting"))
        Gauge("blendin:num_jobs_running", "Jobs running with the models alone (best-of-N rewards, echo scoring)",
              registry=r).set_function(lambda: batcher.state()["job"] is not None)
        Gauge("blendin:num_slots", "Requests that can decode together (--parallel)", registry=r
              ).set_function(lambda: batcher.parallel)
        Gauge("blendin:engine_up", "1 while the engine thread runs; 0 once it stopped (see /health)", registry=r
              ).set_function(lambda: batcher.state()["failure"] is None)
        kv = Gauge("blendin:kv_cache_tokens", "Tokens the model's KV cache holds, all sequences", ["model"], registry=r)
        usage = Gauge("blendin:kv_cache_usage_ratio", "The share of the model's KV cells in use", ["model"], registry=r)
        for role, m in models.items():
            kv.labels(role).set_function(lambda role=role: batcher.kv_tokens.get(role, 0))
            usage.labels(role).set_function(lambda role=role, n=m.n_ctx: batcher.kv_tokens.get(role, 0) / n)

    def finished(self, method: str, stats: dict, prompt_tokens: int, completion_tokens: int) -> None:
        """A generation that ran to its end (its statistics as the core gives them)."""
        self.prompt_tokens.labels(method).inc(prompt_tokens)
        self.generation_tokens.labels(method).inc(completion_tokens)
        self.interventions.labels(method).inc(stats["interventions"])
        self.ttft.labels(method).observe(stats["prefill_s"])
        if stats["tokens"] > 1:
            self.tpot.labels(method).observe(stats["generate_s"] / (stats["tokens"] - 1))
        if stats["tokens"] > 0:
            self.rate.labels(method).observe(stats["intervention_rate"])
        if stats["interventions"] > 0 and math.isfinite(stats["mean_alpha"]):
            self.alpha.labels(method).observe(stats["mean_alpha"])

    def text(self) -> bytes:
        return generate_latest(self.registry)
