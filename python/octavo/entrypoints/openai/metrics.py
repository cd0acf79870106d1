"""The server's /metrics: engine counters and request latencies in Prometheus' text format.

Names follow vLLM's (`vllm:num_requests_running` is `octavo:num_requests_running`, ...), so
dashboards built for vLLM need only the prefix changed. Engine gauges and counters are read from
the engine's stats snapshot at scrape time; latency histograms are observed by the serving code
as requests produce tokens and finish.
"""

from __future__ import annotations

import bisect
import math
import threading

# Seconds. TTFT spans a decode-only GPU step (a few ms) to a long queue under load (minutes).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
# Seconds per output token: from a large GPU batch (~1 ms) to a CPU reference run.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count); observe() is thread-safe."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name = name
        self.help = help_text
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def render(self, labels: dict[str, str]) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets + (math.inf,), counts):
            cumulative += count
            lines.append(f"{self.name}_bucket{_label_text({**labels, 'le': _number(bound)})} "
                         f"{cumulative}")
        lines.append(f"{self.name}_sum{_label_text(labels)} {_number(total)}")
        lines.append(f"{self.name}_count{_label_text(labels)} {cumulative}")
        return lines


class ServerMetrics:
    """Request-level metrics the serving code records, and the /metrics page."""

    def __init__(self, model_name: str):
        self.labels = {"model_name": model_name}
        self.time_to_first_token = Histogram(
            "octavo:time_to_first_token_seconds",
            "Seconds from a request's arrival to its first output token.", TTFT_BUCKETS)
        self.time_per_output_token = Histogram(
            "octavo:time_per_output_token_seconds",
            "Mean seconds between output tokens after the first, per finished request.",
            TPOT_BUCKETS)
        self.e2e_request_latency = Histogram(
            "octavo:e2e_request_latency_seconds",
            "Seconds from a request's arrival to its last output.", E2E_BUCKETS)
        self._finished: dict[str, int] = {}
        self._lock = threading.Lock()

    def observe_first_token(self, metrics) -> None:
        """metrics: the RequestMetrics of a request's first output that carries tokens."""
        if metrics is not None and metrics.first_token_time is not None:
            self.time_to_first_token.observe(metrics.first_token_time - metrics.arrival_time)

    def observe_finished(self, metrics, finish_reason: str, end_time: float,
                         num_tokens_longest: int) -> None:
        """A request ended (finish_reason "stop", "length" or "abort"); num_tokens_longest is
        the output length of its longest sequence (the one that set the pace)."""
        with self._lock:
            self._finished[finish_reason] = self._finished.get(finish_reason, 0) + 1
        if metrics is None:
            return
        self.e2e_request_latency.observe(end_time - metrics.arrival_time)
        if (metrics.first_token_time is not None and metrics.last_token_time is not None
                and num_tokens_longest > 1):
            self.time_per_output_token.observe(
                (metrics.last_token_time - metrics.first_token_time) / (num_tokens_longest - 1))

    def render(self, stats) -> str:
        """The Prometheus text page: the engine's stats snapshot, then the request metrics."""
        labels = self.labels
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                          f"{name}{_label_text(labels)} {_number(value)}"])

        used = stats.num_kv_blocks - stats.num_free_kv_blocks
        metric("octavo:num_requests_running", "gauge",
               "Sequences in the running batch.", stats.num_running)
        metric("octavo:num_requests_waiting", "gauge",
               "Sequences waiting to be scheduled (new or preempted).", stats.num_waiting)
        metric("octavo:num_preemptions_total", "counter",
               "Sequences preempted (KV blocks taken back) so far.", stats.num_preemptions)
        metric("octavo:kv_cache_blocks_total", "gauge", "Blocks in the KV pool.",
               stats.num_kv_blocks)
        metric("octavo:kv_cache_blocks_used", "gauge",
               "KV blocks held by requests.", used)
        metric("octavo:kv_cache_blocks_cached", "gauge",
               "KV blocks that hold a cached prefix and no request holds (reusable, evictable).",
               stats.num_evictable_kv_blocks)
        metric("octavo:kv_cache_usage_perc", "gauge",
               "KV-cache usage: blocks held by requests over all blocks (1 = full).",
               used / stats.num_kv_blocks if stats.num_kv_blocks else 0.0)
        metric("octavo:prefix_cache_queries_total", "counter",
               "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries)
        metric("octavo:prefix_cache_hits_total", "counter",
               "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        metric("octavo:prefix_cache_hit_rate", "gauge",
               "Prefix-cache hits over queries, in tokens, since start.",
               stats.prefix_cache_hits / stats.prefix_cache_queries
               if stats.prefix_cache_queries else 0.0)
        metric("octavo:prompt_tokens_total", "counter",
               "Prompt tokens computed (prefix-cache hits excluded).", stats.prompt_tokens)
        metric("octavo:generation_tokens_total", "counter",
               "Output tokens generated.", stats.generation_tokens)
        metric("octavo:engine_steps_total", "counter", "Engine steps that ran a batch.",
               stats.num_steps)

        with self._lock:
            finished = dict(self._finished)
        name = "octavo:request_success_total"
        lines.extend([f"# HELP {name} Requests finished, by finish reason.",
                      f"# TYPE {name} counter"])
        for reason in sorted(set(finished) | {"stop", "length", "abort"}):
            lines.append(f"{name}{_label_text({**labels, 'finished_reason': reason})} "
                         f"{finished.get(reason, 0)}")

        for histogram in (self.time_to_first_token, self.time_per_output_token,
                          self.e2e_request_latency):
            lines.extend(histogram.render(labels))
        return "\n".join(lines) + "\n"
