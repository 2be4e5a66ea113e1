"""A tiny checkpoint and a live server on a free loopback port (uvicorn in a thread of this process)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CORPUS = "the cat sat on the mat. the dog sat on the log. a bird sang in the tree! " * 20
N_CTX = 128


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from more threads, and on a busy machine OpenMP threads that wait on each
    other made a decode step many times slower (docs/serve.md, Threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("serve_ckpt")
    tok = Tokenizer.train([CORPUS], 300, progress=False)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, n_ctx=N_CTX, n_layer=2, n_head=2, n_embd=32)
    GPT2(cfg).save_pretrained(d, tokenizer=tok)
    return d


@pytest.fixture(scope="session")
def loaded(checkpoint):
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer import Tokenizer

    return GPT2.from_pretrained(checkpoint).eval(), Tokenizer.from_pretrained(checkpoint)


class LiveServer:
    """uvicorn serving `server` on 127.0.0.1 with port 0 (a free one), in a daemon thread."""

    def __init__(self, server):
        import uvicorn

        from gpt2kit.serve.app import create_app

        self.server = server
        self.http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=0,
                                                  log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.http.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.http.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.port = self.http.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_idle(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        s = self.server.scheduler
        while time.monotonic() < deadline:
            if s.active == 0 and s.waiting == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.http.should_exit = True
        self.thread.join(timeout=15)


def start_server(loaded, **kwargs) -> LiveServer:
    from gpt2kit.serve.app import Server

    model, tok = loaded
    kwargs.setdefault("max_batch", 4)
    kwargs.setdefault("max_queue", 8)
    return LiveServer(Server(model, tok, "tiny", **kwargs))


@pytest.fixture(scope="session")
def live(loaded):
    s = start_server(loaded)
    yield s
    s.close()


@pytest.fixture(scope="session")
def client(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
