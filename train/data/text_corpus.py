"""A small corpus of real English prose that every machine has offline: Python's own documentation.

Documents, in a fixed order:

1. every topic of the interactive help (`pydoc_data.topics.topics`, the Language Reference
   sections that `help("assert")` prints), sorted by topic name; id "pydoc/<topic>";
2. for each module of `STDLIB_MODULES` (a fixed list, in that order): the module docstring
   followed by the docstrings of its public functions and classes (sorted by name), each under a
   "name:" heading; id "module/<module>".

Sizes on CPython 3.13: 79 topics (~0.51 MB) and ~0.3 MB of docstrings. The text differs between
Python versions, so the TFDS config name carries the version ("py3.13") and builds made by one
interpreter are never read by another.

The train/validation split is fixed by a hash of the document id (SHA-256, not Python's salted
`hash`): `validation_percent` of ids land in "validation", independent of order and of which
other documents exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import pathlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from train.data import catalog

SPLITS = ("train", "validation")

# Chosen for long, prose-rich docstrings; order is part of the dataset definition.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fractions", "functools", "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io",
    "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tempfile", "textwrap", "threading", "time", "timeit", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
)  # fmt: skip

# Extension modules whose members report another __module__ (e.g. "_struct"); take them all.
_ANY_MEMBER_MODULE = frozenset(
    {"array", "itertools", "math", "operator", "struct", "time", "zlib", "heapq", "bisect"}
)


def python_version_tag() -> str:
    return f"py{sys.version_info.major}.{sys.version_info.minor}"


def _module_document(name: str) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except ImportError:  # e.g. sqlite3 on a stripped-down Python build
        return None
    parts = []
    doc = inspect.getdoc(module)
    if doc:
        parts.append(doc)
    public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for member_name in sorted(set(public)):
        member = getattr(module, member_name, None)
        if not (inspect.isclass(member) or inspect.isroutine(member)):
            continue
        if name not in _ANY_MEMBER_MODULE and getattr(member, "__module__", None) != name:
            continue  # re-exported from elsewhere: its docstring belongs to that module
        member_doc = inspect.getdoc(member)
        if member_doc:
            parts.append(f"{member_name}:\n{member_doc}")
    return "\n\n".join(parts) if parts else None


def python_docs_documents() -> list[tuple[str, str]]:
    """All documents as (doc_id, text), in the fixed order described in the module docstring."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc/{k}", topics[k].strip()) for k in sorted(topics) if topics[k].strip()]
    for name in STDLIB_MODULES:
        text = _module_document(name)
        if text:
            docs.append((f"module/{name}", text))
    return docs


def split_of(doc_id: str, validation_percent: int) -> str:
    """'validation' for a fixed `validation_percent`% of ids (by SHA-256 of the id), else 'train'."""
    if not 0 <= validation_percent <= 100:
        raise ValueError(f"validation_percent={validation_percent} must be in 0..100")
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % 100
    return "validation" if bucket < validation_percent else "train"


def documents(split: str, validation_percent: int = 10) -> list[dict[str, Any]]:
    """In-memory records {"id": bytes, "text": bytes} of `split` (same as the TFDS build's)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a corpus split; allowed: {SPLITS}")
    return [
        {"id": doc_id.encode("utf-8"), "text": text.encode("utf-8")}
        for doc_id, text in python_docs_documents()
        if split_of(doc_id, validation_percent) == split
    ]


# ---------------------------------------------------------------------------------------------
# TFDS builder (array_record; TensorFlow not needed).


@dataclasses.dataclass(eq=False)
class PythonDocsConfig(tfds.core.BuilderConfig):
    """Config: the percentage of documents in "validation" (name also carries the Python version)."""

    validation_percent: int = 10


def _config_name(validation_percent: int) -> str:
    return f"{python_version_tag()}_val{validation_percent}"


class PythonDocs(catalog.LocalBuilder):
    """TFDS dataset "python_docs": splits train/validation, records {"id": text, "text": text}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[PythonDocsConfig]] = [
        PythonDocsConfig(name=_config_name(10), validation_percent=10)
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "text": tfds.features.Text()}
            ),
            disable_shuffling=True,  # keep the documented document order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        pct = self.builder_config.validation_percent
        for record in documents(split, pct):
            yield record["id"].decode("utf-8"), record


def builder(validation_percent: int = 10, data_dir: str | None = None) -> PythonDocs:
    """The (unbuilt) array_record builder in `data_dir` (None -> default_data_dir())."""
    if not 1 <= validation_percent <= 99:   # TFDS cannot write an empty split
        raise ValueError(f"data.validation_percent={validation_percent} is not allowed: 0 or 100 "
                         "leaves a split of the python_docs build empty; use 1..99")
    name = _config_name(validation_percent)
    config = (
        name
        if name == PythonDocs.BUILDER_CONFIGS[0].name
        else PythonDocsConfig(name=name, validation_percent=validation_percent)
    )
    return PythonDocs(
        config=config, data_dir=catalog.resolve_data_dir(data_dir), file_format="array_record"
    )


def build(validation_percent: int = 10, data_dir: str | None = None) -> PythonDocs:
    """Builds the corpus once into data_dir (reused afterwards); returns the prepared builder."""
    return catalog.prepare(lambda: builder(validation_percent, data_dir))


def data_source(split: str, validation_percent: int = 10, data_dir: str | None = None) -> Any:
    """Random-access array_record source of `split` ({"id": bytes, "text": bytes}), built if needed."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a corpus split; allowed: {SPLITS}")
    built = build(validation_percent, data_dir)
    return catalog.CheckedSource(built.as_data_source(split=split),
                                 f"the python_docs build in {built.data_dir}",
                                 f"delete {built.data_dir} and rerun (it is built again)")


# ---------------------------------------------------------------------------------------------
# A corpus of local files (data.text_dir): e.g. arXiv math papers' .tex sources, as the landmark
# paper's arXiv-math set, prepared by the user (nothing is downloaded).

DEFAULT_PATTERNS = ("*.txt", "*.tex")


def local_documents(text_dir: str, patterns: Sequence[str] = DEFAULT_PATTERNS
                    ) -> list[tuple[str, str]]:
    """(relative path, text) of every file under `text_dir` (recursively) matching one of
    `patterns`, sorted by path; UTF-8, undecodable bytes replaced, empty files left out."""
    root = pathlib.Path(text_dir)
    if not root.is_dir():
        raise ValueError(f"data.text_dir={text_dir!r} is not a folder; give the folder of the "
                         f"corpus's {', '.join(patterns)} files")
    paths = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    docs = [(p.relative_to(root).as_posix(), p.read_text("utf-8", errors="replace").strip())
            for p in paths]
    docs = [(i, t) for i, t in docs if t]
    if not docs:
        raise ValueError(f"data.text_dir={text_dir!r} holds no non-empty file matching "
                         f"{list(patterns)}")
    return docs


def local_digest(text_dir: str, patterns: Sequence[str] = DEFAULT_PATTERNS) -> str:
    """12 hex digits naming a local corpus's content (each file's path and bytes): a changed
    folder is a new build."""
    h = hashlib.sha256()
    for doc_id, text in local_documents(text_dir, patterns):
        h.update(doc_id.encode("utf-8") + b"\0" + hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:12]


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    """Config: the corpus folder, its file patterns and the validation percentage (the name
    carries the content's digest)."""

    text_dir: str = ""
    patterns: tuple = DEFAULT_PATTERNS
    validation_percent: int = 10


class LocalText(catalog.LocalBuilder):
    """TFDS dataset "local_text": the files of a local folder (data.text_dir), one document
    each, id = the file's relative path, split by hash of the id as "python_docs"."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[LocalTextConfig]] = []

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=LocalText.__doc__,
            features=tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "text": tfds.features.Text()}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        for doc_id, text in local_documents(cfg.text_dir, cfg.patterns):
            if split_of(doc_id, cfg.validation_percent) == split:
                yield doc_id, {"id": doc_id, "text": text}


def local_data_source(split: str, text_dir: str, patterns: Sequence[str] = DEFAULT_PATTERNS,
                      validation_percent: int = 10, data_dir: str | None = None, *,
                      digest: str | None = None) -> Any:
    """Random-access source of `split` of the local corpus in `text_dir` ({"id", "text"} bytes),
    built once into data_dir per content digest (`local_digest`; pass it if already known)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a corpus split; allowed: {SPLITS}")
    if not 1 <= validation_percent <= 99:
        raise ValueError(f"data.validation_percent={validation_percent} is not allowed: 0 or 100 "
                         "leaves a split of the local_text build empty; use 1..99")
    patterns = tuple(patterns)
    name = f"files_{digest or local_digest(text_dir, patterns)}_val{validation_percent}"
    config = LocalTextConfig(name=name, text_dir=str(text_dir), patterns=patterns,
                             validation_percent=validation_percent)
    built = catalog.prepare(lambda: LocalText(
        config=config, data_dir=catalog.resolve_data_dir(data_dir), file_format="array_record"))
    return catalog.CheckedSource(built.as_data_source(split=split),
                                 f"the local_text build in {built.data_dir}",
                                 f"delete {built.data_dir} and rerun (it is built again)")


def token_count(split: str, validation_percent: int = 10) -> int:
    """Bytes (= byte-level tokens, without EOS) in `split`."""
    return int(np.sum([len(r["text"]) for r in documents(split, validation_percent)]))
