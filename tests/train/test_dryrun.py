"""train/dryrun.py: a config's train step compiled for N devices without allocating it."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from train import dryrun, trainer
from train.configs import lm


def test_fsdp_splits_parameters_and_optimizer_over_the_devices():
    c = lm.get_config("tiny")
    c.mesh.data, c.mesh.fsdp = 1, -1                      # all 8 test devices on fsdp
    r = dryrun.dry_run(c, devices=jax.devices()[:8])
    assert r["num_devices"] == 8 and "fsdp=8" in r["mesh"]
    total, per = r["params_bytes_total"], r["params_bytes_per_device"]
    assert total == 4 * sum(x.size for x in jax.tree_util.tree_leaves(   # float32 parameters
        jax.eval_shape(lambda: _init(c))))
    assert total / 8 <= per <= total / 8 * 1.05           # split, not replicated
    assert 2 * per * 0.95 <= r["optimizer_bytes_per_device"] <= 2 * per * 1.05   # Adam's m, v
    assert r["temp_bytes_per_device"] > 0
    assert r["total_bytes_per_device"] == (r["argument_bytes_per_device"]
                                           + r["temp_bytes_per_device"])
    assert set(r["fits"]) == set(dryrun.HBM_BYTES) and all(r["fits"].values())
    c.mesh.data, c.mesh.fsdp = -1, 1                      # data parallel: every device holds all
    assert dryrun.dry_run(c, devices=jax.devices()[:8])["params_bytes_per_device"] == total


def _init(c):
    model = trainer.build_model(c.model)
    return model.init(jax.random.key(0), jnp.zeros((1, c.seq_len), jnp.int32))["params"]


@pytest.mark.parametrize("args, says", [
    (["--config", "lm:tiny", "--num_devices", "4"], None),
    (["--config", "lm:tiny", "--num_devices", "0"], "--num_devices must be an integer >= 1"),
    (["--num_devices", "2"], "--config must be given"),
    (["--config", "lm:tiny", "--num_devices", "3"], "batch_size=32 must be a positive multiple"),
])
def test_the_command_line(tmp_path, args, says):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-m", "train.dryrun", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    if says is None:
        assert out.returncode == 0, out.stderr[-2000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["num_devices"] == 4                      # the devices it faked
    else:
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and says in lines[0], out.stderr[-2000:]
