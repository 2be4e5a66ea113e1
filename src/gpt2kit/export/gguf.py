"""A float GPT-2 checkpoint -> one GGUF file that llama.cpp loads as its `gpt2` architecture.

Metadata, tensor names and layouts are those llama.cpp's own converter (convert_hf_to_gguf.py, GPT2Model)
writes for a Hugging Face GPT-2: the four projections in nn.Linear layout [out, in] (HF's Conv1D weights
transposed), the tied head left out (llama.cpp reuses `token_embd`), 1-D tensors kept in f32. The
tokenizer goes in as a `gpt2` BPE vocabulary with its merges and the `gpt-2` pre-tokenizer, so any
gpt2kit tokenizer -- OpenAI's or one we learned -- tokenizes the same in llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_path
from ..model.config import GPT2Config
from ..tokenizer import Tokenizer
from ..tokenizer.pretokenize import token_to_unicode

DTYPES = ("f32", "f16", "q8_0")


def export_gguf(model, tokenizer: Tokenizer, out: str | Path, dtype: str = "f32") -> dict:
    """Write `model` (a float gpt2kit GPT2) and `tokenizer` to the GGUF file `out`; returns a summary."""
    import gguf

    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    config: GPT2Config = model.config
    check_exportable(config, tokenizer)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(Path(out).stem)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_block_count(config.n_layer)
        w.add_context_length(config.n_ctx)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(4 * config.n_embd)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
        w.add_file_type(file_type)
        _add_tokenizer(w, tokenizer, config)
        kinds: dict[str, int] = {}
        for name, tensor in gguf_tensors(model):
            data, shape, qtype = _encode(tensor, dtype)
            w.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)
            kinds[qtype.name] = kinds.get(qtype.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"out": str(out), "format": "gguf", "dtype": dtype, "tensors": kinds, "bytes": Path(out).stat().st_size}


def check_exportable(config: GPT2Config, tokenizer: Tokenizer) -> None:
    """UserError unless llama.cpp's GPT-2 graph and tokenizer reproduce this model exactly."""
    if not config.is_gpt2:
        raise UserError(f"GGUF export supports plain GPT-2 only; this checkpoint is a variant ({config.variant()}) "
                        "that llama.cpp's gpt2 architecture cannot run")
    if tokenizer.normalization or tokenizer.lowercase:
        raise UserError("GGUF export: the tokenizer normalizes its input (normalization/lowercase in gpt2kit.json), "
                        "which llama.cpp's tokenizer would not do; export refused")
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"GGUF export: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                        f"{config.vocab_size}")


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in nn.Linear layout) for every weight llama.cpp's gpt2 graph reads."""
    import gguf

    def tn(kind, suffix: str, bid: int | None = None) -> str:
        name = gguf.TENSOR_NAMES[kind]
        return (name.format(bid=bid) if bid is not None else name) + suffix

    T = gguf.MODEL_TENSOR
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = [(tn(T.TOKEN_EMBD, ".weight"), sd["transformer.wte.weight"]),
           (tn(T.POS_EMBD, ".weight"), sd["transformer.wpe.weight"])]
    per_layer = [("ln_1", T.ATTN_NORM), ("attn.c_attn", T.ATTN_QKV), ("attn.c_proj", T.ATTN_OUT),
                 ("ln_2", T.FFN_NORM), ("mlp.c_fc", T.FFN_UP), ("mlp.c_proj", T.FFN_DOWN)]
    for i in range(model.config.n_layer):
        for ours, kind in per_layer:
            for suffix in (".weight", ".bias"):
                out.append((tn(kind, suffix, i), sd[f"transformer.h.{i}.{ours}{suffix}"]))
    out += [(tn(T.OUTPUT_NORM, ".weight"), sd["transformer.ln_f.weight"]),
            (tn(T.OUTPUT_NORM, ".bias"), sd["transformer.ln_f.bias"])]
    return out


def _encode(tensor: torch.Tensor, dtype: str):
    """(data, raw shape, GGML type): matrices in the requested type, vectors in f32 (as llama.cpp's converter).
    Q8_0 needs rows that are a multiple of 32 long; other matrices fall back to f16, as the converter does."""
    import gguf

    Q = gguf.GGMLQuantizationType
    data = tensor.numpy().astype(np.float32)
    if data.ndim < 2 or dtype == "f32":
        return data, None, Q.F32
    if dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        q = gguf.quants.quantize(data, Q.Q8_0)
        return q, None, Q.Q8_0  # the writer derives the element shape from the byte shape
    return data.astype(np.float16), None, Q.F16


def _add_tokenizer(w, tokenizer: Tokenizer, config: GPT2Config) -> None:
    import gguf

    by_id: dict[int, tuple[str, int]] = {i: (token_to_unicode(t), gguf.TokenType.NORMAL)
                                         for t, i in tokenizer.ranks.items()}
    for text, i in tokenizer.special_tokens.items():
        by_id[i] = (text, gguf.TokenType.CONTROL)
    # the model may have more rows than the tokenizer has ids (a vocabulary padded for speed)
    tokens, types = [], []
    for i in range(config.vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(kind)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{token_to_unicode(a)} {token_to_unicode(b)}" for a, b in tokenizer.merges])
    eos = config.eos_token_id
    if eos is not None:
        # GPT-2 uses <|endoftext|> as both; gpt2kit never prepends it when encoding a prompt
        w.add_bos_token_id(eos)
        w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
