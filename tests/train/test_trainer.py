"""The trainer: sharded vs single-device, resume, signals, NaN, checkpoints, bad configs."""
import json
import logging
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint as ckpt_lib
from train import config_identity
from train import sharding as shd
from train import trainer
from train.configs import lm as lm_config

from background import beside

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**overrides):
    c = lm_config.get_config("tiny")
    c.model.width = 32
    c.model.num_heads = 4
    c.seq_len = 16
    c.batch_size = 8
    c.num_steps = 3
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 0
    c.progress = False
    c.data.source = "memory"
    c.data.num_pairs = 4
    c.data.num_queries = 4
    c.optim.warmup_steps = 1
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def run_steps(config, devices, n=3):
    """Losses and final params of n steps on a mesh over `devices`."""
    run = trainer.setup(config, devices=devices)
    state = trainer.init_state(run)
    step = trainer.make_train_step(run)
    it = iter(trainer.make_data(config, "train"))
    losses = []
    for _ in range(n):
        state, m = step(state, trainer.to_device(next(it), run.batch_sharding))
        losses.append(float(m["loss"]))
    return losses, state, run


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(tiny_config(), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=1, model=4), dict(data=1, fsdp=8, model=1)])
def test_sharded_matches_single_device(single_device_run, mesh):
    losses1, state1, _ = single_device_run
    c = tiny_config()
    c.mesh.update(mesh)
    losses8, state8, run = run_steps(c, jax.devices())
    # Same maths, different reduction order across devices: float32 rounding only.
    np.testing.assert_allclose(losses8, losses1, rtol=0, atol=1e-5)
    leaf = state8.params["block_0"]["mlp"]["fc_in"]["kernel"]
    assert len(leaf.sharding.device_set) == 8


def test_sharded_init_holds_no_full_replica():
    c = tiny_config()
    c.mesh.update(dict(data=1, fsdp=8, model=1))
    run = trainer.setup(c, devices=jax.devices())
    state = trainer.init_state(run)
    total = shd.tree_bytes(state.params)
    # Every weight has an 'embed' axis split 8 ways (norm scales are tiny and also split).
    assert shd.per_device_bytes(state.params) <= total / 8 + 1024


def test_same_seed_same_run_bitwise(single_device_run):
    losses1, state1, _ = single_device_run
    losses2, state2, _ = run_steps(tiny_config(), jax.devices()[:1])
    assert losses1 == losses2
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           state1.params, state2.params)


def test_grad_accumulation_equals_full_batch(single_device_run):
    losses1, state1, _ = single_device_run
    losses2, state2, _ = run_steps(tiny_config(**{"optim.grad_accum": 4}), jax.devices()[:1])
    np.testing.assert_allclose(losses2, losses1, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           state1.params, state2.params)


def test_truncated_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    c = tiny_config(num_steps=4, checkpoint_every=2)
    c.async_checkpoints = False
    trainer.train(c, tmp_path)
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    assert ckpt.all_steps() == [2, 4]
    # Truncate every data file of the newest checkpoint's state.
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: max(0, f.stat().st_size // 3)])
    run = trainer.setup(c, devices=jax.devices()[:1])
    with caplog.at_level(logging.WARNING):
        state, step = ckpt.restore_latest(trainer.abstract_state(run))
    ckpt.close()
    assert step == 2 and int(state.step) == 2
    assert any("step 4" in r.getMessage() and "unreadable" in r.getMessage()
               for r in caplog.records)


def truncate_state(workdir, step):
    for f in (pathlib.Path(workdir) / "checkpoints" / str(step) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: max(0, f.stat().st_size // 3)])


def test_truncated_newest_checkpoint_is_moved_aside_and_training_saves_that_step_again(
        tmp_path, caplog):
    # checkpoint_every=10, the checkpoint at step 20 truncated, rerun to 30: it restores step 10,
    # trains through 20 (where Orbax used to raise StepAlreadyExistsError) and on to 30.
    c = tiny_config(num_steps=20, checkpoint_every=10)
    c.async_checkpoints = False
    trainer.train(c, tmp_path)
    truncate_state(tmp_path, 20)
    with caplog.at_level(logging.WARNING):
        out = trainer.train(tiny_config(num_steps=30, checkpoint_every=10), tmp_path)
    assert out["start_step"] == 10 and out["step"] == 30
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    assert ckpt.all_steps() == [10, 20, 30]
    run = trainer.setup(c, devices=jax.devices()[:1])
    state, step = ckpt.restore_latest(trainer.abstract_state(run))
    assert step == 30 and int(ckpt.restore(20, trainer.abstract_state(run)).step) == 20
    ckpt.close()
    aside = tmp_path / "unreadable_checkpoints"
    assert sorted(p.name for p in aside.iterdir()) == ["20", "20.txt"]
    assert (aside / "20" / "state").is_dir()                  # kept, not deleted
    assert "step 20" in (aside / "20.txt").read_text()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("step 20" in m and "unreadable" in m for m in msgs)
    assert any("moved the unreadable checkpoint at step 20 aside" in m for m in msgs)
    starts = [m["resumed_from"] for m in metrics(tmp_path) if m.get("event") == "start"]
    assert starts == [0, 10]


def test_close_waits_for_orbaxs_temporary_folder_cleanup(tmp_path, monkeypatch):
    # The manager starts cleaning old temporary folders in a thread; orbax's own close() does not
    # wait for it, and a process exiting right after (a refused resume) printed that thread's
    # traceback under its one-line error. Checkpointer.close() returns after it.
    import asyncio
    from orbax.checkpoint._src.path import temporary_paths
    done = []

    async def slow_cleanup(*args, **kwargs):
        await asyncio.sleep(0.5)
        done.append(True)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    ckpt.close()
    assert done == [True]


def test_changed_model_field_is_refused_before_anything_is_touched(tmp_path):
    c = tiny_config(num_steps=4, checkpoint_every=2)
    trainer.train(c, tmp_path)
    before = (tmp_path / "config.json").read_text()
    heads8 = tiny_config(num_steps=6, checkpoint_every=2, **{"model.num_heads": 8})
    with pytest.raises(ValueError, match=r"model\.num_heads: 4 -> 8") as e:
        trainer.train(heads8, tmp_path)
    assert isinstance(e.value, config_identity.ConfigMismatchError)
    assert "\n" not in str(e.value) and "allow_config_change=model.num_heads" in str(e.value)
    assert (tmp_path / "config.json").read_text() == before       # compared before rewriting
    assert not (tmp_path / "unreadable_checkpoints").exists()
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    # Allowing it does not start from scratch over the old run: no checkpoint fits the model.
    with pytest.raises(ckpt_lib.NoReadableCheckpointError, match=r"steps \[2, 4\]"):
        trainer.train(heads8, tmp_path, allow_changes=["model.num_heads"])
    assert not (tmp_path / "unreadable_checkpoints").exists()
    # Run-control fields may change; an allowed field resumes the run and is recorded.
    other = tiny_config(num_steps=6, checkpoint_every=3, log_every=2, **{"optim.lr": 1e-3})
    other.mesh.update(dict(data=2, fsdp=1, model=1))
    with pytest.raises(config_identity.ConfigMismatchError, match=r"optim\.lr: 0\.003 -> 0\.001"):
        trainer.train(other, tmp_path, devices=jax.devices()[:2])
    out = trainer.train(other, tmp_path, devices=jax.devices()[:2], allow_changes=("optim.lr",))
    assert out["start_step"] == 4 and out["step"] == 6
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-3


def test_restore_onto_different_mesh(tmp_path):
    c = tiny_config(num_steps=2)
    c.mesh.update(dict(data=2, fsdp=1, model=4))
    out = trainer.train(c, tmp_path, devices=jax.devices())
    saved = jax.device_get(out["state"].params)
    cfg, params, model = trainer.restore_for_eval(tmp_path)
    leaf = params["block_0"]["attn"]["query"]
    assert leaf.sharding.device_set == {jax.devices()[0]}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)),
                           saved, params)
    logits = model.apply({"params": params}, jnp.zeros((1, 16), jnp.int32))
    assert logits.shape == (1, 16, 320)


def test_nan_loss_stops_naming_step_and_keeps_checkpoint(tmp_path):
    c = tiny_config(num_steps=6, checkpoint_every=2)
    c.debug.nan_at_step = 3
    with pytest.raises(FloatingPointError, match="at step 3"):
        trainer.train(c, tmp_path)
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    assert ckpt.all_steps() == [2]
    run = trainer.setup(c, devices=jax.devices()[:1])
    state, step = ckpt.restore_latest(trainer.abstract_state(run))
    ckpt.close()
    assert step == 2
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(state.params)))


# ---------------------------------------------------------------------------------------------
# Subprocess runs: SIGKILL resume, SIGTERM.
# ---------------------------------------------------------------------------------------------
CLI_OVERRIDES = ["--config.model.width=32", "--config.model.num_heads=4", "--config.seq_len=16",
                 "--config.batch_size=8", "--config.log_every=1", "--config.eval_every=0",
                 "--config.progress=False", "--config.data.source=memory",
                 "--config.data.num_pairs=4", "--config.data.num_queries=4",
                 "--config.optim.warmup_steps=1"]


def cli(workdir, env, *extra, devices=1, installed=False, **kw):
    """`python -m train.main --config train/configs/lm.py:tiny` in the checkout, under `env` plus
    this; installed=True: the console script `mnemax-train --config lm:tiny`, run from
    `workdir`'s parent (outside the checkout, without PYTHONPATH)."""
    env = dict(env)
    env["XLA_FLAGS"] = (env["MNEMAX_TEST_XLA_FLAGS"]
                        + f" --xla_force_host_platform_device_count={devices}")
    if installed:
        env.pop("PYTHONPATH", None)
        cmd = [str(pathlib.Path(sys.executable).parent / "mnemax-train"), "--config", "lm:tiny"]
        cwd = pathlib.Path(workdir).parent
    else:
        env["PYTHONPATH"] = str(REPO)
        cmd = [sys.executable, "-m", "train.main", "--config", "train/configs/lm.py:tiny"]
        cwd = REPO
    cmd += ["--workdir", str(workdir), *CLI_OVERRIDES, *extra]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def metrics(workdir):
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_state(workdir, config):
    run = trainer.setup(config, devices=jax.devices()[:1])
    ckpt = ckpt_lib.Checkpointer(workdir)
    state, step = ckpt.restore_latest(trainer.abstract_state(run))
    data_state = json.loads((pathlib.Path(workdir) / "checkpoints" / str(step) / "data" /
                             "process_0-of-1.json").read_text())
    ckpt.close()
    return state, step, data_state


# The subprocess runs go beside the in-process tests (tests/background.py); each test then checks
# what they left.
def _straight_and_killed(tmp, env):
    """6 steps with checkpoints every 3, straight and SIGKILLed at step 4 then resumed."""
    straight, killed = tmp / "straight", tmp / "killed"
    common = ["--config.num_steps=6", "--config.checkpoint_every=3"]
    p1 = cli(straight, env, *common)
    p2 = cli(killed, env, *common, "--config.debug.sigkill_at_step=4")
    assert p1.wait(timeout=180) == 0, p1.stderr.read()
    assert p2.wait(timeout=180) == -signal.SIGKILL
    p3 = cli(killed, env, *common)
    assert p3.wait(timeout=180) == 0, p3.stderr.read()
    return straight, killed


@beside(_straight_and_killed)
def test_sigkill_then_resume_is_bitwise_identical(beside):
    straight, killed = beside
    starts = [m for m in metrics(killed) if m.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [0, 3]
    c = tiny_config(num_steps=6)
    s1, step1, d1 = final_state(straight, c)
    s2, step2, d2 = final_state(killed, c)
    assert step1 == step2 == 6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           s1.params, s2.params)
    assert d1 == d2  # the data iterator is at the same position: same data order
    # Steps 4-6 saw the same batches: identical losses.
    loss = lambda w: {m["step"]: m["loss"] for m in metrics(w) if "loss" in m}  # noqa: E731
    assert loss(straight) == {k: v for k, v in loss(killed).items()}


def _sigterm_then_resume(tmp, env):
    """The installed console script, from outside the checkout, SIGTERMed after 3 logged steps;
    then a resume for 2 more steps. Returns the run and the steps saved after the SIGTERM."""
    run = tmp / "run"
    p = cli(run, env, "--config.num_steps=100000", "--config.checkpoint_every=0", installed=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        f = run / "metrics.jsonl"
        if f.exists() and sum(1 for m in metrics(run) if "loss" in m) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0, p.stderr.read()
    steps = ckpt_lib.saved_steps(run)
    p = cli(run, env, f"--config.num_steps={max(steps, default=0) + 2}",
            "--config.checkpoint_every=0")
    assert p.wait(timeout=180) == 0, p.stderr.read()
    return run, steps


@beside(_sigterm_then_resume)
def test_sigterm_saves_and_exits_zero_then_resumes(beside):
    run, steps = beside
    assert len(steps) == 1 and steps[0] >= 3
    stopped = steps[0]
    starts = [m for m in metrics(run) if m.get("event") == "start"]
    assert starts[-1]["resumed_from"] == stopped
    assert max(m["step"] for m in metrics(run)) == stopped + 2


def _changed_config_runs(tmp, env):
    """2 steps with a checkpoint at 2; then 4 steps with 8 heads, refused; the same allowed by
    name, which then finds no checkpoint that fits; 3 steps of the same config. Returns each
    later run's (exit code, stdout, stderr)."""
    p = cli(tmp, env, "--config.num_steps=2", "--config.checkpoint_every=2")
    assert p.wait(timeout=180) == 0, p.stderr.read()
    runs = []
    for extra in (["--config.num_steps=4", "--config.model.num_heads=8"],
                  ["--config.num_steps=4", "--config.model.num_heads=8",
                   "--allow_config_change=model.num_heads"],
                  ["--config.num_steps=3"]):
        p = cli(tmp, env, *extra)
        out, err = p.communicate(timeout=180)
        runs.append((p.returncode, out, err))
    return runs


@beside(_changed_config_runs)
def test_cli_refuses_a_changed_config_in_one_line(beside):
    (code, out, err), (code_allowed, out_allowed, err_allowed), (code_same, out_same, err_same) = (
        beside)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert "model.num_heads: 4 -> 8" in lines[0] and "--allow_config_change" in lines[0]
    assert out.strip() == ""
    # (After the failed restore, Orbax's async machinery may print "Event loop is closed" noise
    # from another thread, possibly into the middle of the trainer's line: look for the message,
    # not for a line that starts with it.)
    assert code_allowed == 2, (code_allowed, err_allowed[-3000:])
    assert "error: none of the checkpoints" in err_allowed, (out_allowed, err_allowed[-6000:])
    assert code_same == 0, err_same                              # same config: resumes
    assert json.loads(out_same.strip().splitlines()[-1])["step"] == 3


# ---------------------------------------------------------------------------------------------
# Bad configs and inputs: a ValueError naming the field and what is allowed.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, match", [
    ({"mesh.data": 3}, "mesh="),
    ({"mesh.data": -1, "mesh.model": -1}, "at most one axis may be -1"),
    ({"mesh.model": 0}, "mesh.model=0"),
    ({"batch_size": 6}, "batch_size=6 must be a positive multiple"),
    ({"num_steps": -1}, "num_steps=-1"),
    ({"optim.grad_accum": 3}, "optim.grad_accum=3"),
    ({"optim.lr": 0.0}, "optim.lr=0.0"),
    ({"model.norm": "batchnorm"}, "norm='batchnorm'"),
    ({"model.mlp": "relu"}, "mlp='relu'"),
    ({"model.num_heads": 3}, "divisible by num_heads=3"),
    ({"model.num_heads": 2, "mesh.model": 4, "mesh.data": 2}, r"not divisible by mesh axes \('model',\)"),
    ({"model.family": "rnn"}, "model.family='rnn'"),
    ({"objective": "contrastive"}, "objective='contrastive'"),
    ({"seq_len": 0}, "seq_len=0"),
])
def test_bad_config_raises_value_error(override, match):
    c = tiny_config()
    c.mesh.update(dict(data=-1, fsdp=1, model=1))
    for k, v in override.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    with pytest.raises(ValueError, match=match):
        trainer.setup(c, devices=jax.devices())


def test_unknown_config_field_raises():
    c = tiny_config()
    c.unlock()
    c.learning_rate = 1.0
    with pytest.raises(ValueError, match=r"unknown fields \['learning_rate'\]"):
        trainer.setup(c, devices=jax.devices()[:1])


def test_unknown_model_field_raises():
    c = tiny_config()
    c.model.unlock()
    c.model.depth = 3
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        trainer.setup(c, devices=jax.devices()[:1])


# ---------------------------------------------------------------------------------------------
# Fine-tuning: init_from another run's parameters
# ---------------------------------------------------------------------------------------------
def test_init_from_starts_from_another_runs_parameters(tmp_path):
    source = trainer.train(tiny_config(num_steps=3), tmp_path / "source")
    c = tiny_config(num_steps=0)
    c.init_from = str(tmp_path / "source")
    c.optim.lr = 1e-2                              # another optimizer: only params are read
    tuned = trainer.train(c, tmp_path / "tuned")
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(tuned["state"].params),
                           jax.device_get(source["state"].params))
    assert int(tuned["state"].step) == 0
    start = [m for m in metrics(tmp_path / "tuned") if m.get("event") == "start"][0]
    assert start["init_from"] == {"workdir": str(tmp_path / "source"), "step": 3}
    assert start["resumed_from"] == 0 and isinstance(start["resumed_from"], int)
    # once the fine-tune has trained and saved, a rerun resumes it (its own checkpoint, not
    # init_from's parameters)
    c.num_steps = 1
    trainer.train(c, tmp_path / "tuned")
    c.num_steps = 2
    again = trainer.train(c, tmp_path / "tuned")
    assert again["start_step"] == 1 and int(again["state"].step) == 2
    c = tiny_config(num_steps=0)
    c.init_from = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"init_from='.*nothing' holds no checkpoint"):
        trainer.train(c, tmp_path / "x")
    c = tiny_config(num_steps=0, **{"model.width": 64})
    c.init_from = str(tmp_path / "source")
    with pytest.raises(ValueError, match=r"init_from=.*parameters do not fit this model"):
        trainer.train(c, tmp_path / "y")
