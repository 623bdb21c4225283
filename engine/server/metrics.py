"""Prometheus metrics with vLLM's names, buckets and `model_name` label, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]
# Engine counters that only grow: mirrored into Prometheus counters by their increase.
ENGINE_COUNTERS = {"num_preemptions": "vllm:num_preemptions",
                   "prefix_cache_queries": "vllm:prefix_cache_queries",
                   "prefix_cache_hits": "vllm:prefix_cache_hits"}


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.running = self._make(Gauge, "vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = self._make(Gauge, "vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = self._make(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.")
        self.prompt_tokens = self._make(Counter, "vllm:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = self._make(Counter, "vllm:generation_tokens", "Generated tokens.")
        self.engine_counters = {key: self._make(Counter, name, f"Engine counter {key}.")
                                for key, name in ENGINE_COUNTERS.items()}
        self._last_engine = dict.fromkeys(ENGINE_COUNTERS, 0)
        self.ttft = self._make(Histogram, "vllm:time_to_first_token_seconds", "Time to first token.",
                               buckets=TTFT_BUCKETS)
        self.itl = self._make(Histogram, "vllm:inter_token_latency_seconds", "Inter-token latency.",
                              buckets=ITL_BUCKETS)
        self.e2e = self._make(Histogram, "vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                              buckets=LATENCY_BUCKETS)
        self.queue_time = self._make(Histogram, "vllm:request_queue_time_seconds",
                                     "Time from arrival to first scheduling.", buckets=LATENCY_BUCKETS)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)

    def _make(self, kind: type, name: str, doc: str, **kw):
        return kind(name, doc, ["model_name"], registry=self.registry, **kw).labels(self.model_name)

    def record_engine(self, running: int, waiting: int, kv_usage: float, counters: dict[str, int]) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        for key, value in counters.items():
            self.engine_counters[key].inc(max(value - self._last_engine[key], 0))
            self._last_engine[key] = value

    def record_finish(self, reason: str, e2e_s: float, queue_s: float | None) -> None:
        self.success.labels(self.model_name, reason).inc()
        self.e2e.observe(e2e_s)
        if queue_s is not None:
            self.queue_time.observe(queue_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
