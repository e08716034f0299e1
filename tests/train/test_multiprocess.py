"""Two processes × 4 CPU devices with jax.distributed give the same losses as 1 process × 8."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = ["--config.model.width=32", "--config.model.num_heads=4", "--config.seq_len=16",
             "--config.batch_size=8", "--config.log_every=1", "--config.eval_every=0",
             "--config.progress=False", "--config.data.source=memory", "--config.data.num_pairs=4",
             "--config.data.num_queries=4", "--config.optim.warmup_steps=1",
             "--config.num_steps=3", "--config.checkpoint_every=0", "--config.mesh.data=2",
             "--config.mesh.fsdp=2", "--config.mesh.model=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, devices, env_extra=()):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (os.environ["MNEMAX_TEST_XLA_FLAGS"]
                        + f" --xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra)
    cmd = [sys.executable, "-m", "train.main", "--config", "train/configs/lm.py:tiny",
           "--workdir", str(workdir), *OVERRIDES]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _losses(workdir):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    procs = [_launch(tmp_path / "multi", 4, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                             "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    single = _launch(tmp_path / "single", 8)
    for p in procs + [single]:
        try:
            rc = p.wait(timeout=240)
        finally:
            if p.poll() is None:
                p.kill()
        assert rc == 0, p.stderr.read()[-4000:]
    start = json.loads((tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["processes"] == 2
    multi, one = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
    assert len(multi) == len(one) == 3
    # Same global batches (row sharding) and the same mesh: only collective order may differ.
    np.testing.assert_allclose(multi, one, rtol=0, atol=1e-6)
