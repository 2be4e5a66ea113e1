"""GPT-2 hyperparameters: one dataclass, named presets, and the mapping to Hugging Face `config.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from dataclasses import replace as dc_replace
from typing import Any

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid model configuration (a UserError for the CLI, a ValueError for Python callers)."""


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_ctx: int = 1024  # context length: number of learned positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1  # embeddings, attention output and FFN output (HF embd_pdrop / resid_pdrop)
    attn_dropout: float = 0.1  # attention probabilities (HF attn_pdrop)
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 50256  # GPT-2 uses one token as both BOS and EOS: <|endoftext|>

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"model config: {name} must be a number in [0, 1), got {value!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"model config: layer_norm_epsilon must be a positive number, got {eps!r}")
        eos = self.eos_token_id
        if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < self.vocab_size:
            raise ConfigError(
                f"model config: eos_token_id must be an integer in [0, vocab_size={self.vocab_size}), got {eos!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def bos_token_id(self) -> int:
        return self.eos_token_id

    # ----- presets -----------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """A named preset (see PRESETS), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; expected one of: {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        return dc_replace(PRESETS[name], **overrides)

    def replace(self, **changes: Any) -> GPT2Config:
        """A validated copy with some fields changed."""
        return dc_replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ----- Hugging Face config.json ------------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The keys of `transformers.GPT2Config`, so `GPT2LMHeadModel.from_pretrained(dir)` opens our dir."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,  # None = 4 * n_embd
            "activation_function": "gelu_new",  # the tanh approximation of GELU, as the original GPT-2
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.attn_dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "use_cache": True,
            "bos_token_id": self.eos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> GPT2Config:
        """Read a Hugging Face GPT-2 `config.json`; refuse settings this network does not implement."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gpt2'")
        n_embd = d.get("n_embd", 768)
        n_inner = d.get("n_inner")
        if n_inner is not None and n_inner != 4 * n_embd:
            raise ConfigError(f"{source}: n_inner={n_inner} is not supported (only 4 * n_embd = {4 * n_embd})")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"{source}: activation_function {act!r} is not supported (expected 'gelu_new')")
        for key, ok in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
            ("add_cross_attention", False),
            ("tie_word_embeddings", True),
        ):
            if key in d and bool(d[key]) != ok:
                raise ConfigError(f"{source}: {key}={d[key]!r} is not supported (expected {ok})")
        n_ctx = d.get("n_positions", d.get("n_ctx", 1024))
        resid = d.get("resid_pdrop", 0.1)
        embd = d.get("embd_pdrop", resid)
        if embd != resid:
            raise ConfigError(
                f"{source}: embd_pdrop ({embd}) differs from resid_pdrop ({resid}); gpt2kit uses one 'dropout'"
            )
        eos = d.get("eos_token_id", 50256)
        if isinstance(eos, list):  # some configs list several; GPT-2 has one
            eos = eos[0] if eos else 50256
        try:
            return cls(
                vocab_size=d.get("vocab_size", 50257),
                n_ctx=n_ctx,
                n_layer=d.get("n_layer", 12),
                n_head=d.get("n_head", 12),
                n_embd=n_embd,
                dropout=resid,
                attn_dropout=d.get("attn_pdrop", 0.1),
                layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
                eos_token_id=eos,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


PRESETS: dict[str, GPT2Config] = {
    # OpenAI's four released sizes
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
    # small models that train in minutes on a laptop CPU
    "gpt2-tiny": GPT2Config(n_layer=2, n_head=2, n_embd=64),
    "gpt2-mini": GPT2Config(n_layer=4, n_head=4, n_embd=128),
    "gpt2-small-cpu": GPT2Config(n_layer=6, n_head=6, n_embd=384),
}
