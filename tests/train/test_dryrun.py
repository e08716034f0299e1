"""train/dryrun.py: a config's train step compiled for N devices without allocating it."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from train import chips, dryrun, trainer
from train.configs import lm

from background import beside


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


# The checkout whose train.dryrun these tests import: the subprocesses run the same code.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(dryrun.__file__)))


def _dryrun(tmp, env, args, says):
    """`python -m train.dryrun ARGS` as a user runs it: no XLA flags, outside the checkout (which
    is on PYTHONPATH, so that it is this checkout's code whichever one the venv installed)."""
    env = {k: v for k, v in env.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = CHECKOUT
    return subprocess.run([sys.executable, "-m", "train.dryrun", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, says", [
    (["--config", "lm:tiny", "--num_devices", "4"], None),
    (["--config", "lm:tiny", "--num_devices", "0"], "--num_devices must be an integer >= 1"),
    (["--num_devices", "2"], "--config must be given"),
    (["--config", "lm:tiny", "--num_devices", "3"], "batch_size=32 must be a positive multiple"),
    (["--config", "lm:tiny", "--topology", "v5e=2x2", "--num_devices", "4"],
     "--topology and --num_devices exclude each other"),
    pytest.param(["--config", "lm:tiny", "--topology", "v5e=2x2"],
                 'needs libtpu: pip install "jax[tpu]==' + importlib.metadata.version("jax"),
                 marks=pytest.mark.skipif(chips.has_compiler("tpu"),
                                          reason="libtpu is installed: --topology can run")),
    (["--config", "lm:tiny", "--gpu", "h100", "--num_devices", "4"],
     "--gpu excludes --topology and --num_devices"),
    (["--config", "lm:tiny", "--gpu", "h100", "--topology", "v5e=2x2"],
     "--gpu excludes --topology and --num_devices"),
    (["--config", "lm:tiny", "--gpu", "v100"], "--gpu=v100 is unknown; use one of a100, h100"),
    pytest.param(["--config", "lm:tiny", "--gpu", "h100"],
                 'needs the CUDA plugin: pip install "jax-cuda12-plugin=='
                 + importlib.metadata.version("jax"),
                 marks=pytest.mark.skipif(chips.has_compiler("gpu"),
                                          reason="the CUDA plugin is installed: --gpu can run")),
])
@beside(_dryrun)            # beside the in-process tests
def test_the_command_line(beside, args, says):
    out = beside
    if says is None:
        assert out.returncode == 0, out.stderr[-2000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["num_devices"] == 4                      # the devices it faked
    else:
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and says in lines[0], out.stderr[-2000:]


@pytest.mark.skipif(not chips.has_compiler("tpu"), reason="needs libtpu")
def test_a_topology_is_compiled_for_its_chips():
    """--topology: the chip, its count and `fits` for it alone; a v4 chip shows 2 devices,
    which jax.make_mesh refuses: a one-line error."""
    def dryrun_(topology):
        return subprocess.run([sys.executable, "-m", "train.dryrun", "--config", "lm:tiny",
                               "--topology", topology, "--config.mesh.fsdp=-1",
                               "--config.mesh.data=1"], capture_output=True, text=True,
                              timeout=300)
    out = dryrun_("v5p=2x2x1")
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert (r["device_kind"], r["num_devices"], r["num_chips"]) == ("TPU v5", 4, 4)
    assert r["fits"] == {"tpu_v5p": True} and r["temp_bytes_per_device"] > 0
    out = dryrun_("v4=2x2x1")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "as several devices" in out.stderr


@pytest.mark.skipif(not chips.has_compiler("gpu"), reason="needs jax-cuda12-plugin")
def test_a_gpu_is_compiled_for():
    """--gpu h100 --gpu_count 2: XLA:GPU's program for 2 compile-only H100s, `fits` for the
    H100 alone; XLA:GPU's compile-only devices give no cost analysis (step_flops null)."""
    out = subprocess.run([sys.executable, "-m", "train.dryrun", "--config", "lm:tiny", "--gpu",
                          "h100", "--gpu_count", "2", "--config.mesh.fsdp=-1",
                          "--config.mesh.data=1"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": CHECKOUT})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert (r["device_kind"], r["num_devices"]) == ("NVIDIA H100 80GB HBM3", 2)
    assert r["fits"] == {"h100_80g": True} and r["temp_bytes_per_device"] > 0
    assert r["step_flops"] is None and r["analytic_step_flops"] > 0


def test_step_flops_against_the_analytic_count():
    """XLA's FLOPs of the CPU step and the trainer benchmark's MFU numerator agree for the tiny
    LM: XLA counts a little more (1.12 measured at 2 devices: the norms, softmax, GELU, loss and
    Adam's elementwise work, which 6·N + 12·L·T·D leaves out, weigh most at width 64); a
    non-LM gets no analytic count."""
    c = lm.get_config("tiny")
    c.mesh.data, c.mesh.fsdp = 1, -1
    r = dryrun.dry_run(c, devices=jax.devices()[:2])
    assert 1.0 <= r["step_flops"] / r["analytic_step_flops"] <= 1.25, r
    c.model.family = "not_an_lm"
    assert dryrun.analytic_step_flops(c, None) is None


def test_fsdp_keeps_the_batch_split_at_a_large_width():
    """Under fsdp the weights are gathered, never the batch's activations. Regression: the step
    was traced without the mesh in context, so Flax dropped every nn.with_logical_constraint and
    XLA, at a large width, all-gathered every activation over the batch (the paper gated SSM:
    f32[256,2048,2048] on each device; its scratch 136 GB at 8 devices, 121 GB at 32)."""
    from train.configs import birdie
    c = birdie.get_config("tiny:gated_birdie")
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.model.width = c.model.state_width = 1024            # wide enough that XLA gathered rows
    c.model.mlp_hidden, c.model.num_layers = 4096, 1
    c.seq_len, c.batch_size = 128, 16
    temp = {}
    for n in (2, 8):
        _, _, _, compiled = dryrun.compile_train_step(c, devices=jax.devices()[:n])
        temp[n] = compiled.memory_analysis().temp_size_in_bytes
    # No collective makes an array of the whole batch's rows [B, T, ...] on one device.
    whole = re.findall(rf"= \w+\[{c.batch_size},{c.seq_len}[,\]][^=]* all-gather\(",
                       compiled.as_text())
    assert not whole, whole
    # Scratch per device falls with the devices: activations by 4 from 2 to 8 devices, plus the
    # gathered weights (whole on every device under fsdp) which do not; 0.45 measured, 0.79
    # with the whole batch gathered.
    assert temp[8] <= 0.6 * temp[2], temp


def test_a_written_report_says_what_made_it():
    p = dryrun.provenance(["train.dryrun", "--config", "lm:paper", "--out", "r.json",
                           "--num_devices=16", "--out=s.json", "--config.mesh.data=1"])
    assert p["command"] == ("python -m train.dryrun --config lm:paper --num_devices=16 "
                            "--config.mesh.data=1")                  # without --out
    assert p["commit"] and p["dirty"] in (True, False)               # a checkout: its commit
    assert set(p["versions"]) == {"jax", "flax"}


def test_dkvb_without_its_embeddings():
    """DKVB's embeddings and keys need not be prepared: the batch and the keys' width come
    from input_shape."""
    from train.configs import dkvb
    c = dkvb.get_config("dkvb")
    c.data.data_dir = "/nonexistent"
    c.input_shape, c.batch_size = (24,), 16
    c.model.num_codebooks, c.model.num_keys = 4, 8
    run, state, batch, _ = dryrun.compile_train_step(c, devices=jax.devices()[:2])
    assert batch["z"].shape == (16, 24) and batch["y"].shape == (16,)
    dk = c.memory.dkvb_codebooks.key_dim
    assert state.memory["dkvb_codebooks"]["projection"].shape == (4, 24, dk)
    assert state.memory["dkvb_codebooks"]["keys"].shape == (4, 8, dk)
