"""Two processes × 4 CPU devices with jax.distributed: the same losses as 1 process × 8; a
SIGTERM to one process saves one step on both; a process that dies stops the other, and the run
resumes from the last complete checkpoint.

Each test's runs go beside the in-process tests (tests/background.py); the test then checks the
runs' outputs and files."""
import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from background import beside

REPO = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = ["--config.model.width=32", "--config.model.num_heads=4", "--config.seq_len=16",
             "--config.batch_size=8", "--config.log_every=1", "--config.eval_every=0",
             "--config.progress=False", "--config.data.source=memory", "--config.data.num_pairs=4",
             "--config.data.num_queries=4", "--config.optim.warmup_steps=1",
             "--config.checkpoint_every=0", "--config.mesh.data=2", "--config.mesh.fsdp=2",
             "--config.mesh.model=2"]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proc:
    """One `python -m train.main` process; its output goes to files (a full pipe would block
    it), and Python's fault handler dumps its stacks when a test gives up on it."""

    def __init__(self, workdir, env, devices, args, env_extra=None, name="single"):
        self.log = workdir.parent / f"{workdir.name}-{name}.log"
        env = dict(env)
        env["XLA_FLAGS"] = (env["MNEMAX_TEST_XLA_FLAGS"]
                            + f" --xla_force_host_platform_device_count={devices}")
        env["PYTHONPATH"] = str(REPO)
        env["PYTHONFAULTHANDLER"] = "1"
        env.update(env_extra or {})
        cmd = [sys.executable, "-m", "train.main", "--config", "train/configs/lm.py:tiny",
               "--workdir", str(workdir), *OVERRIDES, *args]
        workdir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as f:
            self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout=TIMEOUT_S) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.send_signal(signal.SIGABRT)   # the fault handler prints every thread's stack
            self.p.wait()
            raise AssertionError(f"no exit within {timeout} s:\n{self.output()[-8000:]}")

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def _launch_pair(workdir, env, args, heartbeat_s=None) -> list[_Proc]:
    """Processes 0 and 1 of one run; process 1 starts once process 0's coordinator listens
    (connecting to a port nobody listens on yet can connect a socket to itself)."""
    port = _free_port()
    flags = [f"--heartbeat_timeout_s={heartbeat_s}"] if heartbeat_s else []

    def launch(i):
        return _Proc(workdir, env, 4, [*args, *flags], name=f"p{i}",
                     env_extra={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})

    first = launch(0)
    deadline = time.time() + TIMEOUT_S
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if first.p.poll() is not None or time.time() > deadline:
                raise AssertionError(f"process 0 never listened:\n{first.output()[-4000:]}")
            time.sleep(0.1)
    return [first, launch(1)]


def _finish(procs, expect=0) -> None:
    try:
        for p in procs:
            rc = p.wait()
            assert rc == expect, f"exit {rc}, not {expect}:\n{p.output()[-6000:]}"
    finally:
        for p in procs:
            p.kill()


def _rows(workdir):
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _saved(workdir) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _one_and_two_processes(tmp, env):
    _finish(_launch_pair(tmp / "multi", env, ["--config.num_steps=3"]))
    _finish([_Proc(tmp / "single", env, 8, ["--config.num_steps=3"])])
    return tmp / "multi", tmp / "single"


@beside(_one_and_two_processes)
def test_two_processes_match_one(beside):
    multi_run, single_run = beside
    assert _rows(multi_run)[0]["processes"] == 2
    multi, one = _losses(multi_run), _losses(single_run)
    assert sorted(multi) == sorted(one) == [1, 2, 3]
    # Same global batches (row sharding) and the same mesh: only collective order may differ.
    np.testing.assert_allclose([multi[s] for s in multi], [one[s] for s in multi],
                               rtol=0, atol=1e-6)


def _sigterm_then_a_changed_config(tmp, env):
    """SIGTERM to process 1 at step 3; then a resume under a changed learning rate, refused;
    then the same allowed by name. Returns the run and, per phase, the processes' outputs, the
    steps saved and the metrics' rows."""
    run, phases = tmp / "run", []
    common = ["--config.num_steps=100000", "--config.debug.signal_process=1"]
    procs = _launch_pair(run, env, [*common, "--config.debug.sigterm_at_step=3"])
    _finish(procs)
    phases.append(([p.output() for p in procs], _saved(run), _rows(run)))
    changed = [*common, "--config.optim.lr=0.001",
               f"--config.debug.sigterm_at_step={max(_saved(run), default=3) + 2}"]
    procs = _launch_pair(run, env, changed)
    _finish(procs, expect=2)
    phases.append(([p.output() for p in procs], _saved(run), _rows(run)))
    _finish(_launch_pair(run, env, [*changed, "--allow_config_change=optim.lr"]))
    phases.append((None, _saved(run), _rows(run)))
    return run, *phases


@beside(_sigterm_then_a_changed_config)
def test_sigterm_to_one_process_saves_one_step_on_both_and_exits_zero(beside):
    run, (outputs, saved, rows), (refused, saved_refused, _), (_, saved_end, rows_end) = beside
    [stopped] = saved
    assert stopped >= 3
    for out in outputs:   # both agreed on that step (one save, asked by both)
        assert f"every process saves step {stopped} and stops" in out, out[-4000:]
    assert rows[-1] == {"step": stopped, "event": "stopped", "reason": "SIGTERM"}
    assert max(r["step"] for r in rows if "loss" in r) == stopped

    # Resuming under a changed config is refused by every process, in one line...
    for out in refused:
        errors = [l for l in out.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and "optim.lr: " in errors[0], out[-4000:]
    assert saved_refused == [stopped]
    # ...and allowed by name: every process resumes, the change is in the start row.
    start = [r for r in rows_end if r.get("event") == "start"][-1]
    assert start["resumed_from"] == stopped
    assert [c.split(":")[0] for c in start["config_changes"]] == ["optim.lr"]
    assert start["config_changes"][0].endswith("-> 0.001")
    assert saved_end[-1] > stopped


def _a_process_dies_then_the_run_resumes(tmp, env):
    """Process 1 is SIGKILLed at step 3 (checkpoints every 2 steps); then both are relaunched
    and a SIGTERM at step 4 ends them. Returns the exit codes, process 0's output, the steps
    saved and the losses before the relaunch, and the run."""
    run = tmp / "run"
    common = ["--config.num_steps=100000", "--config.checkpoint_every=2"]
    procs = _launch_pair(run, env, [*common, "--config.debug.sigkill_at_step=3",
                                    "--config.debug.signal_process=1"], heartbeat_s=10)
    try:
        # process 0 waits in step 4's collective until process 1 misses its heartbeats
        codes = [procs[1].wait(), procs[0].wait()]
    finally:
        for p in procs:
            p.kill()
    died = (codes, procs[0].output(), _saved(run), _losses(run))
    # Relaunched (the fault injection is bookkeeping, free to change).
    _finish(_launch_pair(run, env, [*common, "--config.debug.sigterm_at_step=4",
                                    "--config.debug.signal_process=0"]))
    return died, run


@beside(_a_process_dies_then_the_run_resumes)
def test_a_dead_process_stops_the_other_and_the_run_resumes(beside):
    ((killed, other), output, saved, before), run = beside
    assert killed == -signal.SIGKILL
    assert other != 0 and "another task died" in output, output[-4000:]
    assert saved == [2]
    # The relaunch resumes from step 2 and trains step 3 exactly as before.
    starts = [r for r in _rows(run) if r.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [0, 2]
    after = {r["step"]: r["loss"] for r in _rows(run)[_rows(run).index(starts[1]):]
             if "loss" in r}
    assert min(after) == 3 and after[3] == before[3]
