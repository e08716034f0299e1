"""TFDS plumbing without TensorFlow: where builds live, building once, the real catalog path.

TensorFlow is not installed. Everything here goes through array_record:

* Local builders (`train/data/mqar.py`, `train/data/text_corpus.py`) are plain
  `tfds.core.GeneratorBasedBuilder` subclasses defined outside any registered TFDS package. Their
  `_info()` returns a `tfds.core.DatasetInfo(builder=self, features=..., disable_shuffling=True)`
  directly; `_split_generators` returns `{split: self._generate_examples(...)}`, a dict of python
  generators of `(key, example)`; no Beam and no TF are involved. `prepare()` below builds them
  with `file_format="array_record"` (into `data_dir/NAME/CONFIG/VERSION/`), and
  `builder.as_data_source()[split]` reads them back as a random-access
  `tfds.data_sources.ArrayRecordDataSource` (records are dicts of numpy arrays; `Text` features
  come back as `bytes`). Building is skipped when the version folder already exists.
* Real catalog datasets (pg19, wikipedia, ...) are read with
  `tfds.data_source(name, split=..., data_dir=..., download=...)`, i.e. from an array_record
  build that the user already has (or lets TFDS prepare, with `download=True`).
* Tests use `tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=N)`,
  which in tfds 4.9.10 also patches `tfds.data_source` / `builder.as_data_source`: it returns an
  `ArrayRecordDataSource` whose records are random examples made from the builder's features
  (deterministic per index; `Text` features come back as `str`, not `bytes`, so readers accept
  both). `MockPolicy.AUTO` falls back to `USE_CODE` when no metadata exists.

Never call `tfds.list_builders()` (it tries the community registry on GCS; use
`with_community_datasets=False`) nor `tfds.load` (it needs TensorFlow).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

# The env var that moves every local TFDS build; default ~/.cache/mnemax/tfds.
DATA_DIR_ENV = "MNEMAX_DATA_DIR"


def default_data_dir() -> str:
    """$MNEMAX_DATA_DIR if set, else ~/.cache/mnemax/tfds."""
    return os.environ.get(DATA_DIR_ENV) or str(pathlib.Path("~/.cache/mnemax/tfds").expanduser())


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """`data_dir` as a string, or the default when it is None or empty."""
    return str(data_dir) if data_dir else default_data_dir()


@contextlib.contextmanager
def _quiet_progress_bars():
    """TFDS prints a tqdm bar per split; silence them during a build and restore the setting."""
    tqdm_utils = tfds.core.utils.tqdm_utils
    was_active = tqdm_utils._active  # tfds exposes only a setter
    tqdm_utils.display_progress_bar(False)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(was_active)


def prepare(make_builder: Callable[[], Any]):
    """Builds the dataset of `make_builder()` as array_record once; returns a prepared builder.

    `make_builder` constructs the builder (with `file_format="array_record"`); it is called again
    after waiting for another process's build, because a TFDS builder reads its split info when
    constructed. TFDS writes into an `incomplete.*` folder and renames it at the end, so an
    interrupted build leaves nothing that looks finished. Processes on one machine asking for
    the same build (several figure scripts, hosts sharing a local disk) are serialised by an
    `fcntl` lock next to the dataset; the later ones find it prepared. Remote data_dirs
    (gs://...) are not locked: build there from one process first.
    """
    builder = make_builder()
    if builder.is_prepared():
        return builder
    with _build_lock(os.path.dirname(builder.data_dir)), _quiet_progress_bars():
        builder = make_builder()
        if not builder.is_prepared():
            builder.download_and_prepare()
    return builder


@contextlib.contextmanager
def _build_lock(directory: str):
    if "://" in directory:
        yield
        return
    import fcntl  # POSIX only; imported here so that the module still imports elsewhere

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".build.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of mnemax's local builders (not itself registered; subclasses are, by snake_case name).

    It only fixes `code_path`: for a builder living in a regular package (here `train.data`),
    tfds 4.9.10 tests `isinstance(path, importlib_resources.abc.Traversable)`, which imports the
    `importlib_resources` backport that is not installed on Python >= 3.9 and crashes
    `download_and_prepare`. The file that defines the class is the right answer anyway.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):  # defined in a notebook
            return None


def catalog_data_source(
    name: str,
    *,
    split: str,
    data_dir: str | None = None,
    download: bool = False,
    builder_kwargs: Mapping[str, Any] | None = None,
) -> Sequence[Any]:
    """Random-access source for a real TFDS catalog dataset (e.g. "pg19"), read as array_record.

    Args:
      name: TFDS name, optionally with config and version ("pg19", "wiki40b/en:1.3.0").
      split: TFDS split string ("train", "validation", "train[:1%]").
      data_dir: where the array_record build lives; None -> TFDS's own default (~/tensorflow_datasets)
        so that users' existing builds are found. Local mnemax builders use `default_data_dir()`.
      download: let TFDS download and prepare the dataset when it is missing. False by default:
        nothing is downloaded at run time unless a config asks for it.
      builder_kwargs: passed to `tfds.builder` (e.g. {"file_format": "array_record"}).

    Returns:
      `ArrayRecordDataSource`: `len()` and `[i]` give decoded records (dicts of numpy / bytes).
    """
    if not name:
        raise ValueError(f"name={name!r} must name a TFDS dataset, e.g. 'pg19'")
    kwargs: dict[str, Any] = {"split": split, "download": download}
    if data_dir:
        kwargs["data_dir"] = data_dir
    if builder_kwargs:
        kwargs["builder_kwargs"] = dict(builder_kwargs)
    where = data_dir or "~/tensorflow_datasets"
    try:
        source = tfds.data_source(name, **kwargs)
    except Exception as e:
        if download:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"data.tfds_name={name!r} has no array_record build in data.data_dir={where!r} "
            f"({type(e).__name__}: {first}); prepare it once: rerun with "
            f"--config.data.download=True (TFDS downloads and prepares it there), or point "
            f"--config.data.data_dir at a folder that holds a prepared copy") from None
    return CheckedSource(source, f"the {name!r} build in {where}",
                         "prepare it again (--config.data.download=True) or use another copy")


class CheckedSource:
    """A random-access array_record source whose read errors (a truncated or corrupted shard)
    are one-line ValueErrors naming the build and what to do, instead of TypeErrors or
    RuntimeErrors from inside array_record. Picklable when the wrapped source is."""

    def __init__(self, source: Sequence[Any], what: str, fix: str):
        self._source, self._what, self._fix = source, what, fix

    def _error(self, index, why: str) -> ValueError:
        return ValueError(f"{self._what}: record {index} cannot be read ({why}); an array_record "
                          f"shard is truncated or corrupted: {self._fix}")

    @staticmethod
    def _why(e: Exception) -> str:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"

    def __len__(self) -> int:
        try:
            return len(self._source)
        except Exception as e:
            raise self._error("count", self._why(e)) from None

    def __getitem__(self, index: int):
        try:
            record = self._source[index]
        except Exception as e:
            raise self._error(index, self._why(e)) from None
        # A shard cut short reads as empty bytes, which TFDS decodes to None fields.
        empty = sorted(k for k, v in record.items() if v is None) if isinstance(
            record, Mapping) else []
        if empty:
            raise self._error(index, f"its fields {empty} decode to nothing")
        return record

    def __repr__(self) -> str:
        return f"CheckedSource({self._source!r})"


class TextFieldSource:
    """Random-access view of a source's records as {"text": bytes}, taking record[text_key].

    Picklable (grain may ship it to worker processes) as long as the wrapped source is.
    """

    def __init__(self, source: Sequence[Any], text_key: str):
        self._source = source
        self._text_key = text_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, bytes]:
        record = self._source[index]
        if self._text_key not in record:
            raise ValueError(
                f"text_key={self._text_key!r} is not a feature of the records; "
                f"allowed: {sorted(record)}"
            )
        text = record[self._text_key]
        if isinstance(text, str):  # mock data (and some decoders) give str
            text = text.encode("utf-8")
        elif not isinstance(text, bytes):
            text = bytes(text)
        return {"text": text}

    def __repr__(self) -> str:
        return f"TextFieldSource({self._source!r}, text_key={self._text_key!r})"
