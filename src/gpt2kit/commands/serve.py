"""Serve a checkpoint over an OpenAI-compatible HTTP API, with continuous batching and a playground.

  gpt2kit serve CKPT                               (http://127.0.0.1:8000, playground at /)
  gpt2kit serve CKPT --port 8080 --max-batch 16 --api-key secret
  gpt2kit serve CKPT --port 0                      (any free port; the URL is printed when ready)

Endpoints: POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize; GET /v1/models, /health,
/metrics (Prometheus), / (playground). The official `openai` client works as-is:
OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret"). Binds 127.0.0.1 unless --host says
otherwise. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="DIR",
                   help="checkpoint directory (gpt2kit, quantized, Hugging Face GPT-2, chat-tuned) or a hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="sequences that may wait for a slot; more get 429 at once (default 64)")
    p.add_argument("--prefill-tokens", type=int, default=512, metavar="N",
                   help="padded prompt tokens prefilled between two decode steps: new prompts are prefilled "
                        "together in chunks of about this size (default 512)")
    p.add_argument("--api-key", default=None, metavar="K", help="require 'Authorization: Bearer K' (default: none)")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the directory's name)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "float32", "bfloat16"], default="fp32",
                   help="weights and activations (default fp32)")
    p.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory (default: DIR itself)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model (default: torch's); on a machine shared with other busy "
                        "processes fewer threads than cores can be much faster (docs/serve.md)")


def _check_args(args) -> None:
    from ..errors import UserError

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 1:
        raise UserError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.prefill_tokens < 1:
        raise UserError(f"--prefill-tokens must be >= 1, got {args.prefill_tokens}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.api_key is not None and not args.api_key:
        raise UserError("--api-key must not be empty")


def run(args) -> int:
    _check_args(args)
    from pathlib import Path

    try:
        import uvicorn

        from ..serve.app import Server, create_app
    except ImportError as e:
        from ..errors import UserError

        raise UserError(f"gpt2kit serve needs the 'serve' extra: pip install 'gpt2kit[serve]' ({e.name} missing)") from None
    from ..align.chat import load_chat_template
    from ..hub import resolve_checkpoint
    from .generate import _load

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = _load(args)
    ckpt = Path(resolve_checkpoint(args.checkpoint))
    name = args.model_name or ckpt.resolve().name
    server = Server(model, tokenizer, name, chat_template=load_chat_template(ckpt), max_batch=args.max_batch,
                    max_queue=args.max_queue, api_key=args.api_key, prefill_tokens=args.prefill_tokens)
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=5)
    http = uvicorn.Server(config)

    def announce() -> None:
        while not http.started and not http.should_exit:
            threading.Event().wait(0.05)
        if http.started:
            host, port = http.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"gpt2kit serve: {name} on http://{host}:{port} (playground at /, API at /v1)", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    http.run()
    return 0 if http.started else 1
