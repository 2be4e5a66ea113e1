"""Clients that leave mid-stream free their rows: 50 of them, and the server is idle right after."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import N_CTX


def _stream_then_leave(port: int, chunks: int = 2) -> int:
    """Open a long streaming completion over a raw socket, read a few events, then close the socket."""
    body = json.dumps({"prompt": "the", "max_tokens": N_CTX - 8, "stream": True, "temperature": 1.0}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < chunks:
        part = s.recv(4096)
        if not part:
            break
        got += part
    s.close()
    return got.count(b"data: ")


def test_fifty_disconnecting_clients_free_their_slots(live):
    before = live.server.metrics.completion_tokens.value
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda _: _stream_then_leave(live.port), range(50)))
    assert all(n >= 2 for n in seen), seen
    assert live.wait_idle(10), (live.server.scheduler.active, live.server.scheduler.waiting)
    generated = live.server.metrics.completion_tokens.value - before
    # had they run to the end, 50 x 120 tokens; leaving early stops them far sooner
    assert generated < 50 * (N_CTX - 8) / 2, generated
    assert live.server.scheduler._cache.n == 0  # no row of the batch cache is held
    assert time.monotonic() - t0 < 60
