"""ONNX export proven by onnxruntime: prefill (empty past) and 16 cached steps give our logits to 1e-4 and
the same greedy tokens; batch and every length are dynamic; left padding is masked like ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import checkpoint, learned_tokenizer

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from gpt2kit.cli import main
    from gpt2kit.model import GPT2

    d = tmp_path_factory.mktemp("onnx")
    ck = checkpoint(d / "ckpt", learned_tokenizer(d / "tok"))
    assert main(["export", str(ck), "--format", "onnx", "--out", str(d / "onnx")]) == 0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(d / "onnx" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    return GPT2.from_pretrained(ck).eval(), sess, d / "onnx"


def run(sess, config, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray] | None):
    b, t = ids.shape
    past_len = 0 if past is None else past[0].shape[2]
    if past is None:
        head_dim = config.n_embd // config.n_head
        past = [np.zeros((b, config.n_head, 0, head_dim), np.float32) for _ in range(2 * config.n_layer)]
    # positions count real tokens only, so a left-padded row starts at 0 (what gpt2kit's generate does)
    positions = (np.cumsum(mask, axis=1) - 1).clip(min=0)[:, past_len:]
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
            "position_ids": positions.astype(np.int64)}
    for i in range(config.n_layer):
        feed[f"past_key_values.{i}.key"] = past[2 * i]
        feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
    logits, *present = sess.run(None, feed)
    return logits, present


def test_prefill_and_16_cached_steps_match_ours(exported):
    model, sess, _ = exported
    cfg = model.config
    prompt = np.array([[5, 17, 42, 9, 100, 7, 3, 250]])
    mask = np.ones_like(prompt)
    logits, past = run(sess, cfg, prompt, mask, None)
    with torch.no_grad():
        ref = model(torch.from_numpy(prompt)).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-4
    seq = prompt[0].tolist()
    errs = []
    for _ in range(16):
        tok = int(np.argmax(logits[0, -1]))
        seq.append(tok)
        mask = np.ones((1, len(seq)), np.int64)
        logits, past = run(sess, cfg, np.array([[tok]]), mask, past)
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0, -1].numpy()
        errs.append(float(np.abs(logits[0, -1] - ref).max()))
    assert max(errs) <= 1e-4, errs
    assert past[0].shape[2] == len(seq)
    with torch.no_grad():
        ours = model.generate(torch.from_numpy(prompt), max_new_tokens=16, temperature=0.0)[0].tolist()
    assert seq == ours


def test_dynamic_batch_with_left_padding(exported):
    model, sess, _ = exported
    cfg = model.config
    a, b = [5, 17, 42, 9, 100], [8, 33, 71]
    ids = np.array([a, [0, 0] + b])
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]])
    logits, past = run(sess, cfg, ids, mask, None)
    with torch.no_grad():
        ref_a = model(torch.tensor([a])).logits[0].numpy()
        ref_b = model(torch.tensor([b])).logits[0].numpy()
    assert np.abs(logits[0] - ref_a).max() <= 1e-4
    assert np.abs(logits[1, 2:] - ref_b).max() <= 1e-4
    assert np.isfinite(logits).all()  # padding rows stay finite
    # one cached step for both rows
    nxt = np.argmax(logits[:, -1], axis=-1)[:, None]
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    step, _ = run(sess, cfg, nxt, mask, past)
    with torch.no_grad():
        ref_a = model(torch.tensor([a + [int(nxt[0, 0])]])).logits[0, -1].numpy()
        ref_b = model(torch.tensor([b + [int(nxt[1, 0])]])).logits[0, -1].numpy()
    assert np.abs(step[0, -1] - ref_a).max() <= 1e-4 and np.abs(step[1, -1] - ref_b).max() <= 1e-4


def test_io_names_and_files(exported):
    model, sess, out = exported
    n = model.config.n_layer
    assert [i.name for i in sess.get_inputs()][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [i.name for i in sess.get_inputs()][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in sess.get_outputs()][0] == "logits"
    assert len(sess.get_outputs()) == 1 + 2 * n and sess.get_outputs()[-1].name == f"present.{n - 1}.value"
    assert (out / "config.json").exists() and (out / "vocab.json").exists()
