"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per server."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class Metrics:
    """Requests by endpoint and status, tokens, time to first token and inter-token latency;
    the engine's queue length, running sequences and KV bytes, read when scraped."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("xllm_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("xllm_prompt_tokens", "prompt tokens of finished requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("xllm_completion_tokens", "tokens generated",
                                         registry=self.registry)
        self.time_to_first_token = Histogram(
            "xllm_time_to_first_token_seconds", "from a request's arrival to its first token",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "xllm_inter_token_latency_seconds", "between two tokens of one sequence",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        queue = Gauge("xllm_queue_length", "requests waiting to run", registry=self.registry)
        queue.set_function(lambda: engine.waiting)
        running = Gauge("xllm_running_sequences", "sequences in the running batch",
                        registry=self.registry)
        running.set_function(lambda: engine.running)
        kv_bytes = Gauge("xllm_kv_cache_bytes",
                         "KV cache bytes held (running sequences and the prefix cache)",
                         registry=self.registry)
        kv_bytes.set_function(lambda: engine.kv_bytes)
        prefix_bytes = Gauge("xllm_prefix_cache_bytes", "KV cache bytes of the prefix cache",
                             registry=self.registry)
        prefix_bytes.set_function(lambda: engine.prefix_cache.nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
