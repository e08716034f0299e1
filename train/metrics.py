"""A run's metrics on any filesystem: WORKDIR/metrics.jsonl (one JSON object per line) and
TensorBoard events in WORKDIR/tb, written by process 0 through `etils.epath`.

    writer = MetricsWriter(workdir)      # a local path, a mount, or a URL (gs://, s3://, ...)
    writer.write(step, {"loss": 1.2})    # one row: {"step": 1, "loss": 1.2}
    writer.flush()                       # everything written so far is in WORKDIR
    writer.close()
    read_metrics(workdir) -> [row, ...]  # the rows in the order they were written

A local folder (or a mount such as gcsfuse or NFS) gets each row appended and flushed at once,
so `tail -f metrics.jsonl` follows a run. An object store cannot append (gcsfs opens "a" as an
overwrite): there the writer holds the file's rows (those already there when it opened, e.g. a
resumed run's, then its own) and writes the whole object again at most every `flush_every_s`
seconds, on `flush()` (the trainer flushes at every checkpoint) and on `close()`; TensorBoard
events go to a local scratch folder and are copied to WORKDIR/tb at the same moments. A crash
there loses at most the rows since the last flush; a resumed run writes rows after its
checkpoint again, as it does locally.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
import uuid
from typing import Any

import jax
import numpy as np
from etils import epath

from train import checkpoint as ckpt_lib

log = logging.getLogger(__name__)

FILENAME = "metrics.jsonl"


def _json_value(v):
    """Python/NumPy/JAX scalars as bool, int or float; anything else unchanged."""
    if isinstance(v, (str, dict, list)) or np.ndim(v) != 0:
        return v
    dtype = np.asarray(v).dtype
    if dtype == bool:
        return bool(v)
    return int(v) if np.issubdtype(dtype, np.integer) else float(v)


def read_metrics(workdir) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl in the order they were written (a resumed run's rows
    after a checkpoint appear again: the later row of a step is the one that counts)."""
    path = epath.Path(workdir) / FILENAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """metrics.jsonl + TensorBoard events of a run, on process 0 only (see the module
    docstring for local folders and object stores)."""

    def __init__(self, workdir, *, flush_every_s: float = 60.0, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / FILENAME
        self.local = not ckpt_lib.is_url(self.workdir)
        self.flush_every_s = flush_every_s
        self._lines: list[str] = []        # object stores: the whole file
        self._dirty = False
        self._flushed_at = time.monotonic()
        self._scratch = None               # object stores: TensorBoard's local folder
        self.tb = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.local and self.path.exists():
            self._lines = self.path.read_text().splitlines(keepends=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                if self.local:
                    tb_dir = os.fspath(self.workdir / "tb")
                else:
                    self._scratch = tempfile.mkdtemp(prefix="mnemax-tb-")
                    tb_dir = self._scratch
                # A suffix of its own: two writers in one second (a quick resume) would
                # otherwise share a file name.
                self.tb = SummaryWriter(tb_dir, filename_suffix=f".{uuid.uuid4().hex[:8]}")
            except Exception as e:  # TensorBoard is optional at run time
                log.warning("TensorBoard disabled: %s", e)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        line = json.dumps(row) + "\n"
        if self.local:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            self._dirty = True
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self.tb.add_scalar(k, v, step)
        if not self.local and time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Everything written so far is in WORKDIR (a no-op for a local folder's rows, which
        are there as soon as they are written)."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.flush()
        if self.local:
            return
        if self._dirty:
            self.path.write_text("".join(self._lines))
            self._dirty = False
        if self._scratch is not None:
            for root, _, files in os.walk(self._scratch):
                rel = os.path.relpath(root, self._scratch)
                dest = self.workdir / "tb" / rel if rel != "." else self.workdir / "tb"
                dest.mkdir(parents=True, exist_ok=True)
                for name in files:
                    (dest / name).write_bytes(pathlib.Path(root, name).read_bytes())
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        self.flush()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
