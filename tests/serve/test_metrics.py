"""The Prometheus histogram: per-bucket counts rendered cumulatively, as the exposition format asks."""

from __future__ import annotations

from gpt2kit.serve.metrics import Histogram


def test_histogram_renders_cumulative_buckets():
    h = Histogram("lat", "latency", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.1, 3.0):
        h.observe(v)
    lines = h.render()
    assert 'lat_bucket{le="0.1"} 2' in lines  # 0.05 and 0.1 (le is inclusive)
    assert 'lat_bucket{le="1"} 3' in lines
    assert 'lat_bucket{le="+Inf"} 4' in lines
    assert "lat_sum 3.650000" in lines and "lat_count 4" in lines
