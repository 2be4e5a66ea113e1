"""Hub ids in place of checkpoint directories, proven through huggingface_hub's own cache resolution.

Each test builds a hub-layout cache (HF_HOME/hub/models--owner--name/{refs/main, snapshots/<hash>/}) from
a tiny gpt2kit checkpoint and runs offline (HF_HUB_OFFLINE=1): nothing here touches the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub")

from gpt2kit.errors import UserError  # noqa: E402
from gpt2kit.hub import parse_hub_id  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer.train(["the cat sat on the mat. the dog sat on the log. " * 20], 300, progress=False)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, n_ctx=64, n_layer=2, n_head=2, n_embd=32)
    GPT2(cfg).save_pretrained(d, tokenizer=tok)
    return d


def hub_cache(home: Path, repo: str, checkpoint: Path, commit: str = COMMIT, ref: str = "main",
              blobs: bool = False) -> Path:
    """Lay `checkpoint` out as huggingface_hub caches a download of `repo`; returns the snapshot dir."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if blobs:  # the real layout: content-addressed blobs, symlinked from the snapshot
            blob = root / "blobs" / f"blob-{f.name}"
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        else:
            shutil.copyfile(f, snap / f.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


def run_cli(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "gpt2kit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_parse_hub_id_maps_legacy_names_and_revisions():
    assert parse_hub_id("gpt2") == ("openai-community/gpt2", None)
    assert parse_hub_id("gpt2-medium") == ("openai-community/gpt2-medium", None)
    assert parse_hub_id("openai-community/gpt2-medium") == ("openai-community/gpt2-medium", None)
    assert parse_hub_id("user/repo@v1.0") == ("user/repo", "v1.0")
    assert parse_hub_id("runs/x/best") is None  # a path, not an id: two slashes
    assert parse_hub_id("mistyped_dir") is None  # bare words other than the legacy names stay local paths
    assert parse_hub_id("../ckpt") is None


def cli_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    from gpt2kit.cli import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """huggingface_hub pointed at an empty cache in tmp_path, offline (what HF_HOME + HF_HUB_OFFLINE=1 set)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_generate_gpt2_from_offline_cache_matches_local_dir(checkpoint, tmp_path, capsys):
    """The real environment variables, in a fresh process: HF_HOME's cache, HF_HUB_OFFLINE=1."""
    hub_cache(tmp_path / "hf", "openai-community/gpt2", checkpoint, blobs=True)
    args = ["--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "0", "--seed", "1"]
    via_hub = run_cli(["generate", "gpt2", *args], tmp_path / "hf", tmp_path)
    assert via_hub.returncode == 0, via_hub.stderr
    code, local, err = cli_in_process(["generate", str(checkpoint), *args], capsys)
    assert code == 0, err
    assert via_hub.stdout == local and local.strip()


def test_missing_id_is_one_line_exit_2(offline_cache, capsys):
    code, _, err = cli_in_process(["generate", "someone/not-cached", "--prompt", "x"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "someone/not-cached" in lines[0] and "HF_HUB_OFFLINE" in lines[0], err


def test_local_path_wins_and_revision_selects_snapshot(checkpoint, offline_cache, tmp_path, monkeypatch):
    from gpt2kit.hub import resolve_checkpoint
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer import Tokenizer

    snap = hub_cache(offline_cache, "user/repo", checkpoint, commit="f" * 40, ref="v2")
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("user/repo@v2") == snap
    with pytest.raises(UserError, match="user/repo@nope"):
        resolve_checkpoint("user/repo@nope")
    # a directory named like an id is a path first
    (tmp_path / "user" / "repo").mkdir(parents=True)
    assert resolve_checkpoint("user/repo") == Path("user/repo")
    # the loaders take the id directly
    model = GPT2.from_pretrained("user/repo@v2")
    ref = GPT2.from_pretrained(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert Tokenizer.from_pretrained("user/repo@v2").fingerprint == Tokenizer.from_pretrained(checkpoint).fingerprint


def test_torch_bin_only_snapshot_loads_weights_only(checkpoint, offline_cache):
    """A repository without safetensors: pytorch_model.bin is read with torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    from gpt2kit.model import GPT2

    snap = hub_cache(offline_cache, "user/binonly", checkpoint)
    torch.save(load_file(snap / "model.safetensors"), snap / "pytorch_model.bin")
    (snap / "model.safetensors").unlink()
    got = GPT2.from_pretrained("user/binonly")
    ref = GPT2.from_pretrained(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))


def test_unreachable_hub_is_one_line_exit_2(offline_cache, monkeypatch, capsys):
    """Online mode, nothing cached, the endpoint refuses connections: one line naming the id, exit 2."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    code, _, err = cli_in_process(["generate", "someone/x", "--prompt", "hi"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "someone/x" in lines[0] and "cannot be reached" in lines[0], err
