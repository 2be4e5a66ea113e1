"""Checkpoint directory <-> Hugging Face GPT-2 layout.

A gpt2kit checkpoint directory *is* a Hugging Face GPT-2 directory:
  config.json        transformers.GPT2Config keys (model_type "gpt2")
  model.safetensors  HF parameter names; the four projection matrices in Conv1D layout (in x out);
                     the tied head stored once, as `transformer.wte.weight`
  vocab.json, merges.txt, ...   the tokenizer (written by Tokenizer.save)
  gpt2kit.json       what HF has no key for (tokenizer pre-processing, training arguments, ...)
Loading also accepts a local HF GPT-2 directory with `pytorch_model.bin`, read through
`torch.load(weights_only=True)` only: a pickle that would run code is refused.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserError, require_dir
from ..fileio import atomic_write_json, read_json, update_json
from . import hugepages
from .config import GPT2Config
from .gpt2 import GPT2Network
from .meta import on_meta

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
GPT2KIT_FILE = "gpt2kit.json"
FORMAT_VERSION = 1

# HF's GPT-2 uses Conv1D (weight [in, out]) where we use nn.Linear (weight [out, in])
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# non-parameter buffers some HF checkpoints carry (the causal mask); they hold no learned values
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_TIED_HEAD = "lm_head.weight"


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D_SUFFIXES)


# ----- state dicts ---------------------------------------------------------------------------------------


def to_hf_state_dict(model: GPT2Network) -> dict[str, torch.Tensor]:
    """Our parameters under HF names, Conv1D weights transposed, the tied head left out (HF re-ties it)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == _TIED_HEAD:
            continue
        tensor = tensor.detach()
        out[name] = (tensor.t() if _is_conv1d(name) else tensor).contiguous()
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], config: GPT2Config, source: str = "checkpoint") -> dict:
    """HF-named tensors (with or without the `transformer.` prefix) -> our state dict (without the head).

    Every expected tensor must be present with the right shape, and nothing unknown may be left over:
    a UserError names the first offending tensor.
    """
    expected = _expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    head = None
    for name, tensor in sd.items():
        if name.endswith(_HF_BUFFER_SUFFIXES):
            continue
        if name == _TIED_HEAD:
            head = tensor
            continue
        ours = name if name.startswith("transformer.") else "transformer." + name
        if ours not in expected:
            raise UserError(f"{source}: unexpected tensor {name!r} (not part of a GPT-2 model with this config)")
        if _is_conv1d(ours):
            tensor = tensor.t()
        if tuple(tensor.shape) != expected[ours]:
            got = tuple(tensor.shape[::-1]) if _is_conv1d(ours) else tuple(tensor.shape)
            want = expected[ours][::-1] if _is_conv1d(ours) else expected[ours]
            raise UserError(f"{source}: tensor {name!r} has shape {list(got)}, expected {list(want)}")
        out[ours] = tensor
    missing = [n for n in expected if n not in out]
    if missing:
        raise UserError(f"{source}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if head is not None:
        wte = out["transformer.wte.weight"]
        if head.shape != wte.shape or not torch.equal(head, wte):
            raise UserError(f"{source}: {_TIED_HEAD!r} differs from transformer.wte.weight; "
                            "only GPT-2 with a tied output head is supported")
    return out


def _expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    with on_meta():
        model = GPT2Network(config)
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n != _TIED_HEAD}


# ----- reading ----------------------------------------------------------------------------------------------


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `model.safetensors` or `pytorch_model.bin` file (weights only, never code)."""
    if path.name.endswith(".safetensors"):
        with SafetensorsReader(path) as reader:  # each tensor in memory of its own, not views of one mapping
            return {name: reader[name] for name in reader}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path}: refused to load: the file is not plain weights (torch.load weights_only=True: {_one_line(e)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable PyTorch weights file ({_one_line(e)})") from None


class SafetensorsReader(Mapping):
    """The tensors of a safetensors file by name, each read when it is asked for, into memory of its own.

    Where safetensors has it (0.8+), each tensor is read with pread(2) into a fresh buffer, so a loader that
    converts tensors one at a time holds at most one raw copy beside what it keeps. Through a memory map
    instead, every page read stays resident while the file is open, beside the loader's converted copies
    (an int8 gpt2 load peaked at 467 MB that way against 348 MB read tensor by tensor).
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path, self._errors = path, (SafetensorError, OSError, ValueError, RuntimeError)
        try:
            try:
                self._file, self._mapped = safe_open(str(path), framework="pt", device="cpu", backend="pread"), False
            except TypeError:  # safetensors before 0.8: no backend argument
                self._file, self._mapped = safe_open(str(path), framework="pt", device="cpu"), True
            self._names = list(self._file.keys())
            self._known = set(self._names)
        except self._errors as e:
            raise UserError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        try:
            t = self._file.get_tensor(name)
        except self._errors as e:
            raise UserError(f"{self.path}: tensor {name!r} is not readable ({_one_line(e)})") from None
        return t.clone() if self._mapped else t

    def __contains__(self, name: object) -> bool:  # without reading the tensor, as Mapping's would
        return name in self._known

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def close(self) -> None:
        self._file = None  # the handle (and any mapping) goes with its last reference

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def is_quantized_checkpoint(path: Path) -> bool:
    """True when `path` holds a checkpoint written by `gpt2kit quantize` (read by quantized_io.py)."""
    meta_file = path / GPT2KIT_FILE
    if not meta_file.exists():
        return False
    meta = read_json(meta_file, "gpt2kit checkpoint metadata")
    return isinstance(meta, dict) and "quantization" in meta


def load_pretrained(path, device=None, dtype=None, model_class: type[GPT2Network] = GPT2Network) -> GPT2Network:
    """A float checkpoint (ours or a local HF GPT-2 directory) as an instance of `model_class`."""
    path = require_dir(path, "model directory")
    config = GPT2Config.from_hf_dict(read_json(path / CONFIG_FILE, "model config"), source=str(path / CONFIG_FILE))
    if (path / WEIGHTS_FILE).exists():
        weights_file = path / WEIGHTS_FILE
    elif (path / TORCH_WEIGHTS_FILE).exists():
        weights_file = path / TORCH_WEIGHTS_FILE
    else:
        raise UserError(f"no weights in {path}: expected {WEIGHTS_FILE} or {TORCH_WEIGHTS_FILE}")
    raw = read_weights(weights_file)
    if not isinstance(raw, dict) or not all(isinstance(t, torch.Tensor) for t in raw.values()):
        raise UserError(f"{weights_file}: expected a mapping of tensor names to tensors")
    state = from_hf_state_dict(raw, config, source=str(weights_file))

    # build without initialising (meta device), then adopt the loaded tensors
    with on_meta():
        model = model_class(config)
    dtype = dtype or _common_float_dtype(state)
    state = {n: t.to(device=device or "cpu", dtype=dtype if t.is_floating_point() else t.dtype)
             for n, t in state.items()}
    del raw  # so that each file tensor is freed as its copy is made, below: a load holds one tensor extra
    if torch.device(device or "cpu").type == "cpu":
        state = hugepages.place(state)  # decoding streams them: in 2 MB pages where the OS allows
    for n in list(state):  # Conv1D weights are transposed views until here (placed ones are contiguous)
        state[n] = state.pop(n).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # re-tie: assign replaced the embedding parameter
    model.eval()
    return model


def _common_float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


# ----- writing ------------------------------------------------------------------------------------------------


def check_tokenizer_fits(config: GPT2Config, tokenizer) -> None:
    """Raise UserError unless every id of `tokenizer` has an embedding row and EOS ids agree."""
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}; "
            "use a model with vocab_size >= the tokenizer's"
        )
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None and eos != config.eos_token_id:
        raise UserError(f"tokenizer's end-of-text id is {eos} but the model's eos_token_id is {config.eos_token_id}")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temp file in the same folder, fsync, rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})  # HF requires format=pt
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_pretrained(model: GPT2Network, path, tokenizer=None, extra: dict | None = None) -> None:
    """Write (or refresh) a checkpoint directory. Each file is replaced atomically."""
    from .. import __version__

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"checkpoint path exists and is not a directory: {path}")
    if tokenizer is not None:
        check_tokenizer_fits(model.config, tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.to("cpu") for n, t in to_hf_state_dict(model).items()}
    save_safetensors(tensors, path / WEIGHTS_FILE)
    atomic_write_json(path / CONFIG_FILE, model.config.to_hf_dict() | {"torch_dtype": _dtype_name(model.dtype)})
    if tokenizer is not None:
        tokenizer.save(path)
    update_json(path / GPT2KIT_FILE, {"format": FORMAT_VERSION, "gpt2kit_version": __version__, **(extra or {})})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
