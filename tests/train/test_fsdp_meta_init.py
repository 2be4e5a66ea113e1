"""FSDP initialised on the meta device: no rank holds the whole model before sharding, and the weights
(fresh or from a checkpoint) and 5 training steps equal FSDP built from a full model (2 Gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "dist_scripts" / "meta_init.py"

pytestmark = pytest.mark.slow  # one ~15-30 s run of 2 ranks


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("meta_init")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "meta_init.json").read_text())


@pytest.mark.parametrize("case", ["fresh", "checkpoint"])
def test_meta_init_equals_the_full_model_path(report, case):
    r = report[case]
    assert r["built_on"] == ["meta"]  # the model was never materialised whole on this rank
    assert r["same_keys"] and r["tied"]
    assert r["init_max_diff"] == 0.0
    assert r["losses_meta"] == r["losses_ref"] and r["trained_max_diff"] == 0.0
    # each rank holds about half of the parameters, not all of them
    assert all(b < 0.55 * r["full_param_bytes"] for b in r["local_param_bytes"])
    assert sum(r["local_param_bytes"]) == r["full_param_bytes"]
