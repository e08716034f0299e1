"""Precomputed frozen embeddings (DKVB, Träuble et al. 2023: the backbone is frozen, so every
dataset is embedded once) as a random-access source for the trainer's pipeline (dataset
"embeddings", train/data/pipeline.py).

A folder holds SPLIT.npz files with z [N, D] float32 and y [N] int32 (`save`; the keys' data,
keys.npz, has no labels). A record is {"z": [D] float32, "y": int32}; `classes` keeps only the
items of those classes (a class-incremental task), in file order.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Optional, Sequence

import numpy as np

SPLITS = ("train", "test")


def save(data_dir, split: str, z: np.ndarray, y: Optional[np.ndarray] = None) -> pathlib.Path:
    """Writes DATA_DIR/SPLIT.npz (z, and y when given); returns its path."""
    path = pathlib.Path(data_dir) / f"{split}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"z": np.asarray(z, np.float32)}
    if y is not None:
        arrays["y"] = np.asarray(y, np.int32)
    np.savez(path, **arrays)
    return path


@functools.lru_cache(maxsize=16)
def load(data_dir: str, split: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(z [N, D], y [N] or None) of DATA_DIR/SPLIT.npz. Cached: do not write to the arrays."""
    path = pathlib.Path(data_dir) / f"{split}.npz"
    if not path.exists():
        raise ValueError(f"data_config.data_dir={data_dir!r} has no {split}.npz (embeddings.save "
                         "writes it)")
    with np.load(path) as f:
        z, y = f["z"], (f["y"] if "y" in f else None)
    bad = np.flatnonzero(~np.isfinite(z).reshape(len(z), -1).all(axis=1))
    if len(bad):   # fail here, not as a NaN loss some steps into a run
        raise ValueError(f"{path}: z has non-finite values (NaN or inf) in {len(bad)} rows, "
                         f"first row {int(bad[0])}; allowed: finite embeddings")
    return z, y


class EmbeddingSource:
    """Random access to {"z", "y"} records of `split`, only those of `classes` (() = all)."""

    def __init__(self, data_dir: str, split: str, classes: Sequence[int] = ()):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
        z, y = load(str(data_dir), split)
        if y is None:
            raise ValueError(f"{data_dir}/{split}.npz has no labels y")
        keep = np.isin(y, list(classes)) if classes else np.ones(len(y), bool)
        if not keep.any():
            raise ValueError(f"data_config classes={tuple(classes)} select no item of {split!r} "
                             f"(its classes: {sorted(set(y.tolist()))})")
        self._z, self._y = z[keep], y[keep]

    def __len__(self) -> int:
        return len(self._y)

    def __getitem__(self, i) -> dict:
        return {"z": self._z[i], "y": self._y[i]}
