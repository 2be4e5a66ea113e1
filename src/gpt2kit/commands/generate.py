"""Generate text from a checkpoint, streamed as it is produced.

  gpt2kit generate CKPT --prompt "Once upon a time" --max-new-tokens 100
  gpt2kit generate CKPT --prompt-file prompt.txt --num-samples 3 --temperature 0.8 --top-k 200 --seed 1
  gpt2kit generate CKPT --prompt "Q: 2+2?\\nA:" --temperature 0 --stop "\\n"
  gpt2kit generate CKPT --draft DRAFT --draft-tokens 4 --prompt "To be" --temperature 0   (speculative)
  gpt2kit generate CKPT -i          (interactive: read a prompt per line, stream the answer, repeat)

CKPT is a gpt2kit checkpoint directory or a local Hugging Face GPT-2 directory (config.json, weights,
vocab.json + merges.txt). The prompt is printed first, then the continuation as it is generated;
generation ends at <|endoftext|>, a --stop string (not printed) or --max-new-tokens. No prompt (or an
empty one) starts a new document from <|endoftext|>. See docs/generate.md.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="DIR", help="checkpoint directory (gpt2kit or Hugging Face GPT-2) or a hub id (gpt2, owner/repo@rev)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="the prompt (default: empty, start a new document)")
    src.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 text file")
    src.add_argument("-i", "--interactive", action="store_true",
                     help="read prompts from stdin, one per line, and stream each answer (EOF ends)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="continuations per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="at most N new tokens (default 200)")

    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; default 1.0")
    g.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None,
                   help="sample among the smallest set of tokens with total probability >= P (0 < P <= 1)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 discourages tokens already present (CTRL rule; 1 = off)")
    g.add_argument("--stop", nargs="+", action="extend", default=None, metavar="STR",
                   help="stop when the text contains STR (not printed); backslash escapes like \\n work")
    g.add_argument("--ignore-eos", action="store_true", help="keep going after <|endoftext|>")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")

    g = p.add_argument_group("context")
    g.add_argument("--truncate", choices=["error", "left"], default="error",
                   help="a prompt longer than the context: error (default) or drop its oldest tokens")
    g.add_argument("--slide", action="store_true",
                   help="keep generating past the context on a sliding window (default: stop there)")

    g = p.add_argument_group("speculative decoding (docs/generate.md)")
    g.add_argument("--draft", metavar="DRAFT_DIR", default=None,
                   help="a small model with the same tokenizer proposes tokens the model checks in one step; "
                        "the output distribution is the model's own")
    g.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes per step (default 4)")
    g.add_argument("--draft-adaptive", action="store_true",
                   help="grow K after a fully accepted step, shrink it after an early rejection")

    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "float32", "bfloat16"], default="fp32",
                   help="weights and activations (default fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    g.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory (default: DIR itself)")
    g.add_argument("--no-prompt", action="store_true", help="print only the continuation, not the prompt")
    g.add_argument("--chat", action="store_true",
                   help="the prompt is a user message, rendered with the checkpoint's chat template (ChatML if it "
                        "has none); prints the reply only, which ends at <|im_end|> (docs/align.md)")


def _unescape(s: str) -> str:
    """'\\n' typed on a command line -> a newline (any Python string escape)."""
    if "\\" not in s:
        return s
    try:
        return s.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return s


def _check_args(args) -> None:
    from ..errors import UserError
    from ..sampling import validate_sampling

    try:
        validate_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except UserError as e:  # name the flag, not the Python argument
        msg = str(e)
        for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
            msg = msg.replace(name, "--" + name.replace("_", "-"), 1) if msg.startswith(name) else msg
        raise UserError(msg) from None
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.stop is not None and not all(args.stop):
        raise UserError("--stop strings must not be empty")
    if args.draft is not None:
        if not 1 <= args.draft_tokens <= 16:
            raise UserError(f"--draft-tokens must be in [1, 16], got {args.draft_tokens}")
        if args.repetition_penalty not in (None, 1.0):
            raise UserError("--repetition-penalty cannot be combined with --draft")
        if args.slide or args.compile:
            raise UserError("--slide and --compile cannot be combined with --draft")


class _Out:
    """UTF-8 to stdout whatever the terminal's locale, flushed piece by piece."""

    def __init__(self):
        self.buffer = getattr(sys.stdout, "buffer", None)

    def write(self, text: str) -> None:
        if not text:
            return
        if self.buffer is not None:
            sys.stdout.flush()
            self.buffer.write(text.encode("utf-8", errors="replace"))
            self.buffer.flush()
        else:
            sys.stdout.write(text)
            sys.stdout.flush()


def _read_prompt_file(path: str) -> str:
    from ..errors import UserError, require_file

    p = require_file(path, "--prompt-file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte {e.start})") from None


def _load(args):
    """(model, tokenizer) from the checkpoint directory, on the requested device and dtype."""
    import torch

    from ..errors import UserError, require_dir
    from ..hub import resolve_checkpoint
    from ..model import GPT2, check_tokenizer_fits
    from ..tokenizer import Tokenizer

    ckpt = require_dir(resolve_checkpoint(args.checkpoint), "checkpoint directory")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: unknown device {args.device!r} (expected cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    dtype = torch.bfloat16 if args.dtype in ("bf16", "bfloat16") else torch.float32
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or ckpt)
    model = GPT2.from_pretrained(ckpt, device=device, dtype=dtype).eval()
    check_tokenizer_fits(model.config, tokenizer)
    return model, tokenizer


def _load_draft(args, model, tokenizer):
    """The --draft model, on the model's device and dtype; UserError unless it shares the tokenizer."""
    from ..errors import UserError, require_dir
    from ..hub import resolve_checkpoint
    from ..model import GPT2
    from ..tokenizer import Tokenizer

    path = require_dir(resolve_checkpoint(args.draft, "--draft"), "--draft")
    if Tokenizer.from_pretrained(path).fingerprint != tokenizer.fingerprint:
        raise UserError(f"--draft {path}: its tokenizer differs from the model's; draft and model must share it")
    draft = GPT2.from_pretrained(path, device=model.device, dtype=model.dtype).eval()
    from ..speculative import check_draft

    check_draft(model, draft)
    return draft


def run(args) -> int:
    _check_args(args)
    import torch

    from ..errors import UserError
    from ..generate import TextStream

    prompt = _read_prompt_file(args.prompt_file) if args.prompt_file else (args.prompt or "")
    model, tokenizer = _load(args)
    draft = _load_draft(args, model, tokenizer) if args.draft else None
    forward_model = model
    if args.compile:
        forward_model = torch.compile(model, dynamic=True)  # forwards .config/.device/.dtype to model
    stops = [_unescape(s) for s in args.stop] if args.stop else None
    chat_template = None
    if args.chat:
        from ..align.chat import CHAT_STOP_STRINGS, DEFAULT_CHAT_TEMPLATE, load_chat_template
        from ..hub import resolve_checkpoint

        chat_template = load_chat_template(resolve_checkpoint(args.checkpoint, "checkpoint")) or DEFAULT_CHAT_TEMPLATE
        stops = (stops or []) + list(CHAT_STOP_STRINGS)
    generator = torch.Generator(device=model.device).manual_seed(args.seed) if args.seed is not None else None
    out = _Out()

    stream_class, extra = TextStream, {}
    if draft is not None:
        from ..speculative import SpeculativeTextStream

        stream_class = SpeculativeTextStream
        extra = {"draft": draft, "draft_tokens": args.draft_tokens, "adaptive": args.draft_adaptive}

    def one(prompt_text: str, echo: bool) -> None:
        if chat_template is not None:
            from ..align.chat import apply_chat_template

            prompt_text, echo = apply_chat_template([{"role": "user", "content": prompt_text}], chat_template), False
        text = stream_class(
            forward_model, tokenizer, prompt_text, args.max_new_tokens, stop=stops, eos=not args.ignore_eos,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=generator, truncate=args.truncate,
            on_overflow="slide" if args.slide else "stop", fast=not args.compile and "auto", **extra,
        )  # built before anything is printed: a prompt that does not fit fails with nothing written
        if echo:
            out.write(prompt_text)
        for piece in text:
            out.write(piece)
        out.write("\n")
        if text.stop_reason == "context":
            n_ctx = model.config.n_ctx
            print(f"[stopped: the text filled the model's context window ({n_ctx} tokens); "
                  "--slide continues on a sliding window]", file=sys.stderr)

    if not args.interactive:
        for i in range(args.num_samples):
            if i:
                out.write("---\n")
            one(prompt, echo=not args.no_prompt)
        return 0

    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.rstrip("\n")
        try:
            for i in range(args.num_samples):
                if i:
                    out.write("---\n")
                one(line, echo=False)
        except UserError as e:  # a bad prompt ends that prompt, not the session
            print(f"gpt2kit generate: error: {e}", file=sys.stderr)
            if not interactive:
                return 2
        except KeyboardInterrupt:
            out.write("\n")
            if not interactive:
                raise
