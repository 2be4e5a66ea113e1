"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters and gauges are plain numbers behind one lock; histograms keep a count per bucket, a sum and a
count, and render the cumulative bucket counts Prometheus expects (`_bucket{le="..."}`, `_sum`, `_count`).
"""

from __future__ import annotations

import bisect
import itertools
import threading

_LOCK = threading.Lock()

# seconds: from a few milliseconds (one decode step of a small model) to a long queue wait
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self.value = 0.0

    def inc(self, n: float = 1.0) -> None:
        with _LOCK:
            self.value += n

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {self.value:g}"]


class Gauge(Counter):
    kind = "gauge"

    def set(self, v: float) -> None:
        self.value = float(v)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets=LATENCY_BUCKETS):
        super().__init__(name, help_text)
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        # per bucket, not cumulative (one bisect per token; render() sums them up)
        i = bisect.bisect_left(self.buckets, v)
        with _LOCK:
            if i < len(self.counts):
                self.counts[i] += 1
            self.sum += v
            self.count += 1

    def render(self) -> list[str]:
        lines = self.header()
        with _LOCK:
            for b, c in zip(self.buckets, itertools.accumulate(self.counts)):
                lines.append(f'{self.name}_bucket{{le="{b:g}"}} {c}')
            lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                      f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self):
        self.requests = Counter("gpt2kit_requests_total", "HTTP requests to the generation endpoints")
        self.request_errors = Counter("gpt2kit_request_errors_total", "requests answered with an error status")
        self.prompt_tokens = Counter("gpt2kit_prompt_tokens_total", "prompt tokens prefilled")
        self.completion_tokens = Counter("gpt2kit_completion_tokens_total", "tokens generated")
        self.queue_depth = Gauge("gpt2kit_queue_depth", "sequences waiting for a slot in the batch")
        self.running = Gauge("gpt2kit_running_batch_size", "sequences in the running batch")
        self.ttft = Histogram("gpt2kit_time_to_first_token_seconds", "from submission to the first token")
        self.inter_token = Histogram("gpt2kit_inter_token_latency_seconds", "between consecutive tokens of a sequence")

    def render(self) -> str:
        parts = [self.requests, self.request_errors, self.prompt_tokens, self.completion_tokens,
                 self.queue_depth, self.running, self.ttft, self.inter_token]
        return "\n".join(line for m in parts for line in m.render()) + "\n"
