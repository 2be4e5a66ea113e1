"""Weight-quantized GPT-2: int8 / int4 linear and embedding modules, and loading a quantized checkpoint.

Storage (one scheme for every quantized matrix W [rows, cols], rows = output channels of a linear layer
or tokens/positions of an embedding, cols = the input dimension):
  codes   unsigned b-bit integers, round(W / s) + z clamped to [0, 2^b - 1]
  scales  float32 [rows, cols / group]  (group = cols: one scale per row, "per channel")
  zeros   uint8   [rows, cols / group]  the code that stands for 0.0
  W~ = (codes - zeros) * scales, computed in float32, so a reloaded checkpoint dequantizes bitwise-equal.
int8 codes are stored one per byte (`qweight` [rows, cols]); int4 codes two per byte (`qweight`
[rows, cols / 2], element 2j in the low nibble, 2j + 1 in the high nibble). The tied output head uses
the token embedding's codes: the head *is* the embedding matrix, quantized once.

Compute: a layer dequantizes its weight and calls F.linear -- except for a few rows at a time (decoding)
of int8 per-channel weights on CPU, where `torch._weight_int8pack_mm` multiplies bf16 activations by
the int8 codes directly (reading 1 byte per weight instead of 4; see docs/post.md for the measurements).

Only the head and the embeddings expose a `.weight` (the fused loss reads it); the block
linears deliberately have none, so code that wants raw float weights (e.g. gpt2kit.decode_fast) declines
a quantized model instead of silently dequantizing it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

# Up to this many rows a matmul is a matrix-vector-like decode step, bound by reading the weights.
INT8_KERNEL_MAX_ROWS = 16
_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")


# ----- packing and dequantization (shared with gpt2kit.post.quantize) ----------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], shape [..., 2n] -> uint8 [..., n]: even index low nibble, odd index high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., n] -> uint8 codes [..., 2n]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(codes - zeros) * scales per group; codes [R, C] uint8, scales/zeros [R, C / group]."""
    R, C = codes.shape
    G = scales.shape[-1]
    q = codes.view(R, G, C // G).to(torch.float32)
    w = (q - zeros.to(torch.float32).unsqueeze(-1)) * scales.unsqueeze(-1)
    return w.view(R, C).to(dtype)


class _QuantStore(nn.Module):
    """The buffers of one quantized matrix [rows, cols] and how to read them back."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, cols: int,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if bits not in (4, 8):
            raise UserError(f"quantized weights must have 4 or 8 bits, got {bits}")
        rows = qweight.shape[0]
        want_cols = cols // 2 if bits == 4 else cols
        if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (rows, want_cols):
            raise UserError(f"quantized weight has dtype {qweight.dtype} shape {list(qweight.shape)}, "
                            f"expected uint8 [{rows}, {want_cols}] for {bits}-bit codes of {cols} columns")
        if scales.dim() != 2 or scales.shape[0] != rows or cols % scales.shape[1] or zeros.shape != scales.shape:
            raise UserError(f"quantization scales {list(scales.shape)} / zeros {list(zeros.shape)} do not fit "
                            f"a [{rows}, {cols}] weight")
        self.bits = bits
        self.rows = rows
        self.cols = cols
        self.group_size = cols // scales.shape[1]
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(torch.float32))
        self.register_buffer("zeros", zeros.to(torch.uint8))

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        q = self.qweight if rows is None else self.qweight[rows]
        return unpack_int4(q) if self.bits == 4 else q

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return dequantize(self.codes(), self.scales, self.zeros, self.compute_dtype)
        flat = rows.reshape(-1)
        w = dequantize(self.codes(flat), self.scales[flat], self.zeros[flat], self.compute_dtype)
        return w.view(*rows.shape, self.cols)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales, f"{prefix}.zeros": self.zeros}


class QuantLinear(nn.Module):
    """y = x W~^T + b with W~ [out, in] held as int8/int4 codes (see the module docstring)."""

    def __init__(self, store: _QuantStore, bias: torch.Tensor | None):
        super().__init__()
        self.store = store
        self.in_features = store.cols
        self.out_features = store.rows
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._kernel: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def bits(self) -> int:
        return self.store.bits

    def dequantize(self) -> torch.Tensor:
        return self.store.dequantize()

    def _int8_kernel_args(self):
        """(signed codes, bf16 scales, per-row offset or None) for _weight_int8pack_mm, built once.

        The kernel computes x @ (q_s8 * s)^T with signed codes and no zero point. Our codes are unsigned
        with zero z: W~ = (q - z) s = (q_s8 + 128 - z) s, so y = kernel(x) + sum(x) * (128 - z) s.
        """
        if self._kernel is None:
            st = self.store
            q_s8 = (st.qweight.to(torch.int16) - 128).to(torch.int8).contiguous()
            s = st.scales[:, 0]
            offset = (128 - st.zeros[:, 0].to(torch.float32)) * s
            self._kernel = (q_s8, s.to(torch.bfloat16), None if bool((offset == 0).all()) else offset)
        return self._kernel

    def _use_int8_kernel(self, x: torch.Tensor) -> bool:
        st = self.store
        return (
            _HAS_INT8_KERNEL and st.bits == 8 and st.group_size == st.cols and x.device.type == "cpu"
            and x.numel() // x.shape[-1] <= INT8_KERNEL_MAX_ROWS and not x.requires_grad
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_int8_kernel(x):
            q_s8, s_bf16, offset = self._int8_kernel_args()
            x2 = x.reshape(-1, x.shape[-1])
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), q_s8, s_bf16).to(x.dtype)
            if offset is not None:
                y = y + x2.sum(-1, keepdim=True) * offset.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.store.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.store.group_size}")


class QuantTiedHead(QuantLinear):
    """The output head tied to the quantized token embedding: it shares the embedding's codes.

    It exposes `.weight` (dequantized on access) because GPT2's chunked loss multiplies by it directly.
    """

    @property
    def weight(self) -> torch.Tensor:
        return self.store.dequantize()


class QuantEmbedding(nn.Module):
    """nn.Embedding whose table is quantized per row; a lookup dequantizes only the rows it reads."""

    def __init__(self, store: _QuantStore):
        super().__init__()
        self.store = store
        self.num_embeddings = store.rows
        self.embedding_dim = store.cols

    @property
    def weight(self) -> torch.Tensor:
        return self.store.dequantize()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.store.dequantize(idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.store.bits}, group_size={self.store.group_size}"


# ----- which modules, and loading a quantized checkpoint ---------------------------------------------


LINEAR_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
EMBEDDINGS = ("transformer.wte", "transformer.wpe")
HEAD = "lm_head"


def quantizable_modules(model: nn.Module, embeddings: bool = True) -> list[str]:
    """Names of the modules quantization replaces: the four projections of every block and, with
    embeddings=True, the token and position embeddings (the tied head follows the token embedding)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(LINEAR_SUFFIXES)]
    if embeddings:
        names += list(EMBEDDINGS)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def install_quantized(model: nn.Module, name: str, store: _QuantStore, bias: torch.Tensor | None = None) -> None:
    """Put the quantized version of module `name` (stored in `store`) into `model`, in place."""
    if name in EMBEDDINGS:
        _set_module(model, name, QuantEmbedding(store))
        if name == "transformer.wte":
            model.lm_head = QuantTiedHead(store, None)
    else:
        _set_module(model, name, QuantLinear(store, bias))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear | QuantEmbedding) for m in model.modules())


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a (partly) quantized model under checkpoint names: `<module>.qweight/.scales/.zeros`
    for quantized matrices, HF names (Conv1D layout) for float ones, the tied head left out."""
    from .hf import _is_conv1d

    out: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantTiedHead):
            quantized.add(name)
            continue
        if isinstance(mod, QuantLinear | QuantEmbedding):
            quantized.add(name)
            out.update(mod.store.tensors(name))
            if isinstance(mod, QuantLinear) and mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.detach()
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized or owner.rsplit(".", 1)[0] in quantized or name == f"{HEAD}.weight":
            continue  # a quantized module's buffers (`x.store.qweight`) or the tied head
        t = t.detach()
        out[name] = (t.t() if _is_conv1d(name) else t).contiguous()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def load_quantized(path, device=None, dtype=None) -> nn.Module:
    """Load a checkpoint written by `gpt2kit quantize` as a GPT2 whose listed modules are quantized.

    dtype: the float dtype of the unquantized tensors and of the dequantized weights (default float32).
    """
    from ..errors import require_dir
    from ..fileio import read_json
    from .config import GPT2Config
    from .gpt2 import GPT2
    from .hf import CONFIG_FILE, GPT2KIT_FILE, WEIGHTS_FILE, _is_conv1d, read_weights

    path = require_dir(path, "model directory")
    meta = read_json(path / GPT2KIT_FILE, "gpt2kit checkpoint metadata")
    spec = meta.get("quantization") if isinstance(meta, dict) else None
    if not isinstance(spec, dict) or spec.get("bits") not in (4, 8) or not isinstance(spec.get("modules"), list):
        raise UserError(f"{path / GPT2KIT_FILE}: 'quantization' must hold bits (4 or 8) and a list of modules")
    config = GPT2Config.from_hf_dict(read_json(path / CONFIG_FILE, "model config"), source=str(path / CONFIG_FILE))
    weights_file = path / WEIGHTS_FILE
    if not weights_file.exists():
        raise UserError(f"no weights in {path}: expected {WEIGHTS_FILE}")
    tensors = read_weights(weights_file)
    dtype = dtype or torch.float32
    device = torch.device(device) if device is not None else torch.device("cpu")

    with torch.device("meta"):
        model = GPT2(config)
    bits = int(spec["bits"])
    used: set[str] = set()
    for name in spec["modules"]:
        keys = [f"{name}.qweight", f"{name}.scales", f"{name}.zeros"]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise UserError(f"{weights_file}: missing tensor {missing[0]!r} of quantized module {name!r}")
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path / GPT2KIT_FILE}: quantized module {name!r} is not part of this model") from None
        cols = original.embedding_dim if isinstance(original, nn.Embedding) else original.in_features
        qw, sc, zs = (tensors[k].to(device) for k in keys)
        store = _QuantStore(qw, sc, zs, bits, cols, compute_dtype=dtype)
        rows = original.num_embeddings if isinstance(original, nn.Embedding) else original.out_features
        if store.rows != rows:
            raise UserError(f"{weights_file}: quantized {name!r} has {store.rows} rows, expected {rows}")
        bias = None
        if isinstance(original, nn.Linear) and original.bias is not None:
            if f"{name}.bias" not in tensors:
                raise UserError(f"{weights_file}: missing tensor {name + '.bias'!r}")
            bias = tensors[f"{name}.bias"].to(device=device, dtype=dtype)
            used.add(f"{name}.bias")
        install_quantized(model, name, store, bias)
        used.update(keys)

    # the float tensors that remain (layer norms, unquantized modules)
    state = {}
    for name, t in tensors.items():
        if name in used:
            continue
        state[name] = (t.t() if _is_conv1d(name) else t).to(device=device, dtype=dtype).contiguous()
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False) if n != f"{HEAD}.weight"}
    expected -= {n for n, m in model.named_modules() if isinstance(m, QuantLinear) for n in [f"{n}.bias"]}
    unknown = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    if unknown or missing:
        what = f"unexpected tensor {unknown[0]!r}" if unknown else f"missing tensor {missing[0]!r}"
        raise UserError(f"{weights_file}: {what} for a quantized model with this config")
    model.load_state_dict(state, strict=False, assign=True)
    if "transformer.wte" not in spec["modules"]:
        model.lm_head.weight = model.transformer.wte.weight  # re-tie the float head
    model.requires_grad_(False)  # inference only: quantized codes have no gradient
    model.eval()
    return model
