"""Orbax checkpoints of a run: {train state, memory state, data-iterator state, config}.

One checkpoint per saved step under `WORKDIR/checkpoints/STEP/`, with items
  state   params, optimizer state, step, RNG and memory state (a pytree; restored onto any mesh
          by passing an abstract target whose leaves carry the new shardings),
  data    the grain iterator state, one JSON file per process,
  config  the run's config as JSON.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when the
save is complete), so a crash mid-save leaves the previous checkpoint as the latest good one.
An unreadable latest checkpoint (truncated, corrupted) is skipped with a warning and the one
before it is restored; the trainer then moves the unreadable one aside, to
`WORKDIR/unreadable_checkpoints/STEP` (kept, with `STEP.txt` saying why), so that training on
through that step saves a fresh checkpoint there (Orbax refuses to save over an existing step).
`stored_config` reads the config a workdir's run was trained with (newest checkpoint first, then
`config.json`), which the trainer compares with the current one before it restores anything.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Optional

import grain.python as grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def as_path(workdir: str | pathlib.Path | epath.Path) -> epath.Path:
    """A run directory as an epath: local paths made absolute, gs:// and other URLs kept
    (cloud paths need the matching filesystem package, e.g. gcsfs, installed)."""
    s = str(workdir)
    return epath.Path(s if is_url(s) else os.path.abspath(s))


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...: an object store, which cannot append) rather
    than a local path or mount."""
    return "://" in os.fspath(path)


def check_workdir_path(workdir: str | os.PathLike) -> None:
    """A one-line ValueError unless `workdir` can be a run directory: a folder, existing or new,
    in a place this process may write (not a file, not under a file, not read-only). Nothing is
    created. Remote paths (gs://...) are not checked."""
    s = str(workdir)
    if is_url(s):
        return
    path = pathlib.Path(os.path.abspath(s))
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir={s!r} is not allowed: it is a file; give a folder (new, or a "
                         "run's to resume it)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"workdir={s!r} is not allowed: {existing} is a file; give a folder "
                         "(new, or a run's to resume it)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"workdir={s!r} is not allowed: {existing} is read-only for this "
                         "process; give a folder it may write (checkpoints and metrics go there)")


class NoReadableCheckpointError(RuntimeError):
    """A workdir holds checkpoints and none of them restores (one line: steps, what to do)."""


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager with the items above."""

    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 3,
                 async_save: bool = True):
        self.directory = as_path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.PyGrainCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_iter: Any = None,
             config: Optional[dict] = None, force: bool = True) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, *, data_iter: Any = None) -> Any:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.PyGrainCheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_latest(self, abstract_state: Any, *, data_iter: Any = None,
                       move_aside_unreadable: bool = False):
        """(state, step) from the newest readable checkpoint, or (None, None) if there is none.

        A checkpoint that fails to restore is skipped with a warning, newest first. With
        `move_aside_unreadable` (the trainer, which saves again), the skipped ones newer than
        the restored step are then moved aside (`move_aside`); nothing moves if none restores."""
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, abstract_state, data_iter=data_iter)
            except Exception as e:  # truncated files, missing items, corrupted metadata
                log.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the "
                            "previous one", step, self.directory, type(e).__name__, e)
                failed.append((step, f"{type(e).__name__}: {e}"))
                continue
            if move_aside_unreadable and failed:
                self.move_aside(failed)
            return state, step
        return None, None

    def move_aside(self, steps: list[tuple[int, str]]) -> list[epath.Path]:
        """Moves the checkpoints of `steps` ([(step, reason)]) out of Orbax's sight, to
        WORKDIR/unreadable_checkpoints/STEP (STEP-1, STEP-2, ... if taken) beside a STEP.txt
        holding the reason, and makes the manager forget them. Process 0 moves (and returns the
        new paths); every process waits for it and reloads."""
        root = self.directory.parent / "unreadable_checkpoints"
        moved = []
        if jax.process_index() == 0:
            for step, reason in steps:
                name, i = str(step), 0
                while (root / name).exists() or (root / f"{name}.txt").exists():
                    i += 1
                    name = f"{step}-{i}"
                root.mkdir(parents=True, exist_ok=True)
                # The note first: on an object store a folder exists once something is in it.
                (root / f"{name}.txt").write_text(
                    f"checkpoint step {step} of {self.directory} could not be restored:\n"
                    f"{reason}\n")
                (self.directory / str(step)).rename(root / name)
                log.warning("moved the unreadable checkpoint at step %d aside to %s (kept); "
                            "training goes on from an earlier step and saves step %d again",
                            step, root / name, step)
                moved.append(root / name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mnemax_unreadable_checkpoints_moved")
        self.manager.reload()
        return moved

    def read_config(self, step: Optional[int] = None) -> Optional[dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        path = self.directory / str(step) / "config"
        files = sorted(path.glob("*")) if path.exists() else []
        for f in files:
            try:
                return json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError):
                continue
        return None

    def read_stored_config(self) -> tuple[Optional[dict], Optional[int]]:
        """(config, step) of the newest checkpoint whose config item reads, or (None, None)."""
        for step in reversed(self.all_steps()):
            cfg = self.read_config(step)
            if cfg is not None:
                return cfg, step
        return None, None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        # Orbax's close() does not wait for the clean-up of old temporary folders that the
        # manager's constructor starts in a thread: a process exiting right after (a refused
        # resume) could then print that thread's traceback ("cannot schedule new futures after
        # interpreter shutdown") under its one-line error. Wait for it first.
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self.manager.wait_until_finished()
        self.manager.close()


def stored_config(workdir, ckpt: Optional[Checkpointer] = None) -> tuple[Optional[dict], str]:
    """(config, where) a workdir's run was trained with: the config stored in its newest
    checkpoint (what a resume restores), else its config.json (a run that saved nothing yet),
    else (None, "") for a fresh workdir. `where` names the source for messages."""
    workdir = as_path(workdir)
    if ckpt is not None:
        cfg, step = ckpt.read_stored_config()
        if cfg is not None:
            return cfg, f"{workdir} (checkpoint step {step})"
    path = workdir / "config.json"
    if path.exists():
        try:
            return json.loads(path.read_text()), f"{workdir} (config.json)"
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("%s is unreadable (%s); not compared", path, e)
    return None, ""


def saved_steps(workdir) -> list[int]:
    """The steps of the checkpoints in WORKDIR/checkpoints, ascending (none: [])."""
    directory = as_path(workdir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())


def restore_params(workdir, abstract_params: Any) -> tuple[Any, int]:
    """(params, step): only the parameters of another run's newest checkpoint,
    restored onto `abstract_params`' shapes and shardings (its optimizer state, RNG and memory
    are not read, so the two runs may differ in optimizer, hooks or data). Raises a one-line
    ValueError naming `workdir` if it holds no checkpoint or its parameters do not fit."""
    directory = as_path(workdir) / "checkpoints"
    steps = saved_steps(workdir)
    if not steps:
        raise ValueError(f"init_from={str(workdir)!r} holds no checkpoint to start from")
    step = steps[-1]
    item = {"params": abstract_params}
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                        restore_args=ocp.checkpoint_utils.construct_restore_args(
                                            item)))
    except Exception as e:   # a different model: missing keys or other shapes
        msg = " ".join(str(e).split())[:300]
        raise ValueError(f"init_from={str(workdir)!r} (step {step}): its parameters do not fit "
                         f"this model ({type(e).__name__}: {msg})") from e
    return restored["params"], step


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target for a new mesh)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
