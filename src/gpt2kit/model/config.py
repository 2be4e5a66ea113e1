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

    # ----- variants: anything below set away from its default makes a model that is NOT GPT-2 ---------
    # (config.json then says model_type "gpt2kit", which transformers refuses; see to_hf_dict)
    # attention (model/attention.py): one pattern for every layer, or a per-layer list (Gemma 2's layer_types)
    attention: str = "dense"  # "dense" | "sliding" | "fixed" | "linear"
    attention_layers: tuple[str, ...] | None = None  # per-layer names; overrides `attention`
    window: int = 256  # sliding: each query sees its `window` most recent positions, itself included
    attention_block: int = 128  # fixed: local block length (Child et al. 2019's l)
    attention_summary: int = 1  # fixed: summary columns at the end of each block (their c)
    # Mixture-of-Experts feed-forward (model/moe.py); moe_experts=0: every block dense
    moe_experts: int = 0
    moe_top_k: int = 1
    moe_every: int = 1  # every n-th block is MoE (blocks n-1, 2n-1, ...), the rest dense
    moe_first_layer: int = 0  # blocks before it stay dense (layer 0 routes on little more than the token itself)
    moe_capacity_factor: float = 1.25  # training
    moe_eval_capacity_factor: float = 2.0
    moe_dropless: bool = False  # no capacity limit at all
    moe_aux_loss_coef: float = 0.01  # Switch load-balancing loss alpha
    moe_z_loss_coef: float = 1e-3  # ST-MoE router z-loss
    moe_expert_hidden: int = 0  # hidden width of each expert; 0 = GPT-2's 4 * n_embd (narrower: fine-grained experts)
    # cross-layer weight sharing: "none" (GPT-2), "all" (ALBERT), "pairs" (each block applied twice, MobileLLM-LS)
    share_layers: str = "none"

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
        if isinstance(self.attention_layers, list):
            object.__setattr__(self, "attention_layers", tuple(self.attention_layers))
        _check_variant(self)

    # ----- variants ----------------------------------------------------------------------------------

    @property
    def layer_attention(self) -> tuple[str, ...]:
        """The attention pattern of each layer."""
        return tuple(self.attention_layers) if self.attention_layers is not None else (self.attention,) * self.n_layer

    @property
    def is_gpt2(self) -> bool:
        """True for plain GPT-2 (what transformers' GPT2LMHeadModel computes); False for any variant."""
        return not self.variant()

    def variant(self) -> dict[str, Any]:
        """The variant fields that are not at their GPT-2 default ({} for plain GPT-2)."""
        out = {}
        for name, default in _VARIANT_DEFAULTS.items():
            value = getattr(self, name)
            if name == "attention_layers" and value is not None and all(a == "dense" for a in value):
                continue  # an all-dense per-layer list is plain GPT-2
            if value != default:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

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
        """The keys of `transformers.GPT2Config`, so `GPT2LMHeadModel.from_pretrained(dir)` opens our dir.

        A variant is written with model_type "gpt2kit" (and its settings under "gpt2kit_variant"), a
        type transformers does not know, so it refuses the checkpoint instead of loading it as GPT-2.
        """
        variant = self.variant()
        out = self._hf_gpt2_keys()
        if variant:
            all_fields = {n: getattr(self, n) for n in _VARIANT_DEFAULTS}
            if self.attention_layers is not None:
                all_fields["attention_layers"] = list(self.attention_layers)
            out |= {"model_type": VARIANT_MODEL_TYPE, "architectures": ["GPT2KitForCausalLM"],
                    "gpt2kit_variant": all_fields}
        return out

    def _hf_gpt2_keys(self) -> dict[str, Any]:
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
        if model_type not in ("gpt2", VARIANT_MODEL_TYPE):
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gpt2' (or {VARIANT_MODEL_TYPE!r})")
        variant = d.get("gpt2kit_variant", {}) if model_type == VARIANT_MODEL_TYPE else {}
        if not isinstance(variant, dict):
            raise ConfigError(f"{source}: gpt2kit_variant must be a JSON object")
        unknown = sorted(set(variant) - set(_VARIANT_DEFAULTS))
        if unknown:
            raise ConfigError(f"{source}: unknown gpt2kit_variant field {unknown[0]!r}")
        if "attention_layers" in variant and isinstance(variant["attention_layers"], list):
            variant = variant | {"attention_layers": tuple(variant["attention_layers"])}
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
                **variant,
            )
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


VARIANT_MODEL_TYPE = "gpt2kit"
ATTENTION_KINDS = ("dense", "sliding", "fixed", "linear")
SHARE_LAYERS = ("none", "all", "pairs")
_VARIANT_DEFAULTS = {
    f.name: f.default for f in fields(GPT2Config)
    if f.name in {"attention", "attention_layers", "window", "attention_block", "attention_summary",
                  "share_layers"} or f.name.startswith("moe_")
}


def _positive_int(config: GPT2Config, name: str) -> int:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
    return value


def _check_variant(c: GPT2Config) -> None:
    """Validate the variant fields; one line naming the field."""
    for name in ([c.attention] if c.attention_layers is None else list(c.attention_layers)):
        if name not in ATTENTION_KINDS:
            raise ConfigError(f"model config: unknown attention {name!r}; expected one of: {', '.join(ATTENTION_KINDS)}")
    if c.attention_layers is not None and len(c.attention_layers) != c.n_layer:
        raise ConfigError(
            f"model config: attention_layers lists {len(c.attention_layers)} layers, the model has n_layer={c.n_layer}"
        )
    for name in ("window", "attention_block", "attention_summary", "moe_every"):
        _positive_int(c, name)
    if "fixed" in c.layer_attention and c.attention_block > c.n_ctx:
        raise ConfigError(f"model config: attention_block ({c.attention_block}) must be <= n_ctx ({c.n_ctx}): a "
                          "sequence cannot use a block longer than the context")
    if c.attention_summary > c.attention_block:
        raise ConfigError(f"model config: attention_summary ({c.attention_summary}) must be <= attention_block "
                          f"({c.attention_block})")
    if isinstance(c.moe_experts, bool) or not isinstance(c.moe_experts, int) or c.moe_experts < 0:
        raise ConfigError(f"model config: moe_experts must be an integer >= 0, got {c.moe_experts!r}")
    if c.moe_experts:
        k = _positive_int(c, "moe_top_k")
        if k > c.moe_experts:
            raise ConfigError(f"model config: moe_top_k ({k}) must be <= moe_experts ({c.moe_experts})")
    for name in ("moe_capacity_factor", "moe_eval_capacity_factor"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v:
            raise ConfigError(f"model config: {name} must be a number > 0, got {v!r}")
    for name in ("moe_aux_loss_coef", "moe_z_loss_coef"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError(f"model config: {name} must be a number >= 0, got {v!r}")
    first, blocks = c.moe_first_layer, {"none": c.n_layer, "pairs": c.n_layer // 2, "all": 1}.get(c.share_layers, 1)
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < blocks:
        raise ConfigError(f"model config: moe_first_layer must be an integer in [0, {blocks}) (the model's own "
                          f"blocks), got {first!r}")
    h = c.moe_expert_hidden
    if isinstance(h, bool) or not isinstance(h, int) or h < 0:
        raise ConfigError(f"model config: moe_expert_hidden must be an integer >= 0 (0 = 4 * n_embd), got {h!r}")
    if not isinstance(c.moe_dropless, bool):
        raise ConfigError(f"model config: moe_dropless must be true or false, got {c.moe_dropless!r}")
    if c.share_layers not in SHARE_LAYERS:
        raise ConfigError(f"model config: share_layers must be one of {', '.join(SHARE_LAYERS)}, got {c.share_layers!r}")
    if c.share_layers == "pairs" and c.n_layer % 2:
        raise ConfigError(f"model config: share_layers='pairs' needs an even n_layer, got {c.n_layer}")


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
