"""Packed Birdie rows for the shared trainer: objectives over a corpus, as a random-access source.

Record i of a split is one row of T tokens (T = seq_len), generated when read from the generator
seeded by (data_seed, split, i), so any record can be regenerated alone:

    {"inputs": int32 [T], "targets": int32 [T], "weights": float32 [T],
     "segment_ids": int32 [T], "objective_ids": int32 [T],
     "prefix": bool [T]}                                 (prefix only when with_prefix)

Each row is filled next-fit (`train.objectives.birdie.pack`) with examples: with probability
`task_weight` the task itself, else one of the objective set's K configurations drawn from
`mixture` ([K] weights; empty: Birdie's uniform mixture over classes); a text is drawn from the
corpus and the objective lays it out (prompt ++ [SG] ++ target). `objective_ids` holds each
token's configuration index (K for the task, -1 on padding). The mixture is part of the record's
definition: record i under another mixture is another row, so a run whose mixture changes (the
Birdie controller, a trainer hook) rebuilds its iterator at the same position with the new one.
With `objective_per_row`, row i holds examples of configuration i % K only (no task): the
balanced rows the controller measures each objective's validation loss on.

- objectives: "birdie" (Birdie's 7 classes: 19 configurations under the paper's settings, 18
  under the compact ones), "ul2" (UL2's 7 denoisers), "ntp" (plain next-token prediction, no
  prompt: what a Transformer-NTP baseline trains on), built with `objective_settings`
  (`birdie.ObjectiveSettings`: the paper's by default; the controller builds its actions from
  the same settings, so both agree on K);
- corpus: "text" (the local Python-docs prose, train/data/text_corpus.py), "local_text" (the
  documents of a local folder, `text_dir`, through text_corpus's local_text TFDS build), "tfds"
  (a prepared TFDS text dataset, `tfds_name` / `text_key`: the Pile-style pre-training corpus),
  "phonebook" (phone-book text, eval/phonebook.py's format, the synthetic retrieval text) or
  "mix" (Python-docs prose and phone books, half each). "text", "local_text" and "tfds" hold no
  phone-book text: with task_weight 0 pre-training never sees the task;
- task: the phone-book lookup prompt → "numbers" + EOS, the fine-tuning/evaluation task;
- tokenizer: "byte" (ids 0..255 bytes, 256..319 the specials Birdie's objectives use) or any
  `load_tokenizer` spec, whose ids are mapped around Birdie's specials (`to_birdie_ids`: an id
  t ≥ 256 becomes t + 64), so the model's vocabulary is the tokenizer's + 64 (`vocab_size`).

The Transformer has no prefix: configs for it set with_prefix=False so batches carry no
`prefix` field (train/objectives/birdie.py:trainer_loss passes only the fields a batch has).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from train.data import catalog, phonebook, text_corpus
from train.data import tokenizer as tok
from train.objectives import birdie

SPLITS = ("train", "validation")
_SPLIT_CODE = {"train": 0, "validation": 1}
OBJECTIVE_SETS = ("birdie", "ul2", "ntp")
CORPORA = ("text", "local_text", "tfds", "phonebook", "mix")
# Birdie's special ids (the byte vocabulary's 256..319); another tokenizer's ids move above them.
NUM_SPECIAL_IDS = tok.VOCAB_SIZE - tok.NUM_BYTES


@dataclasses.dataclass(frozen=True)
class BirdieDataSpec:
    seq_len: int = 256                 # T: tokens per row
    objectives: str = "birdie"         # objective set, see OBJECTIVE_SETS
    corpus: str = "mix"                # text the objectives read, see CORPORA
    task_weight: float = 0.0           # probability of a phone-book task example per draw
    with_prefix: bool = True           # emit the prefix field (False for the Transformer)
    phonebook_entries: tuple = (4, 8)  # entries of the task's / corpus's books (inclusive range)
    phonebook_queries: tuple = (1, 2)  # queried names of the task (inclusive range)
    validation_percent: int = 10       # text corpus: documents held out for "validation"
    num_train: int = 1_000_000         # rows in "train" (generated on read: size is free)
    num_validation: int = 256          # rows in "validation"
    seed: int = 0                      # content seed
    mixture: tuple = ()                # [K] weights over the configurations; () = uniform
    objective_per_row: bool = False    # row i: configuration i % K only (controller validation)
    # how the objective set is built (a mapping or ConfigDict of its fields is converted)
    objective_settings: birdie.ObjectiveSettings = birdie.PAPER_SETTINGS
    tokenizer: str = "byte"            # load_tokenizer spec of the text (see to_birdie_ids)
    text_dir: str = ""                 # corpus "local_text": the folder of documents
    text_patterns: tuple = text_corpus.DEFAULT_PATTERNS   # its file patterns
    tfds_name: str = ""                # corpus "tfds": the prepared dataset ("name[/config]")
    text_key: str = "text"             # its feature holding the text
    data_dir: str = ""                 # where TFDS builds live ("" = TFDS's default)

    def __post_init__(self):
        object.__setattr__(self, "objective_settings",
                           birdie.ObjectiveSettings.from_mapping(self.objective_settings))
        for name in ("phonebook_entries", "phonebook_queries"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "mixture", tuple(float(v) for v in self.mixture))
        if self.objectives not in OBJECTIVE_SETS:
            raise ValueError(f"objectives={self.objectives!r} is not allowed; use one of "
                             f"{OBJECTIVE_SETS}")
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus={self.corpus!r} is not allowed; use one of {CORPORA}")
        object.__setattr__(self, "text_patterns", tuple(self.text_patterns))
        if not 0.0 <= self.task_weight <= 1.0:
            raise ValueError(f"task_weight={self.task_weight} must be in [0, 1]")
        if self.seq_len < 32:
            raise ValueError(f"seq_len={self.seq_len} must be >= 32 (one example per row)")
        lo, hi = self.phonebook_entries
        qlo, qhi = self.phonebook_queries
        if not (1 <= lo <= hi and 1 <= qlo <= qhi <= lo):
            raise ValueError(f"phonebook_entries={self.phonebook_entries}, phonebook_queries="
                             f"{self.phonebook_queries}: need 1 <= lo <= hi, and queries within "
                             "1..min entries")
        for name in ("num_train", "num_validation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.mixture:
            K = len(objective_set(self.objectives, self.objective_settings))
            w = np.asarray(self.mixture)
            if w.shape != (K,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"mixture={self.mixture} is not allowed: objectives="
                                 f"{self.objectives!r} needs {K} non-negative weights with a "
                                 "positive sum (or () for the uniform mixture)")

    def num_examples(self, split: str) -> int:
        if split not in _SPLIT_CODE:
            raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
        return self.num_train if split == "train" else self.num_validation


def objective_set(name: str, settings: birdie.ObjectiveSettings = birdie.PAPER_SETTINGS):
    """The configurations of objective set `name` (OBJECTIVE_SETS) built with `settings`."""
    if name == "birdie":
        return birdie.birdie_objectives(length_bins=(64, 128, 256, 512), settings=settings)
    if name == "ul2":
        return birdie.ul2_objectives(settings=settings)
    return birdie.ntp_objectives()


def vocab_size(tokenizer: str = "byte") -> int:
    """The model vocabulary rows need for Birdie's rows of `tokenizer`: 320 for "byte", else the
    tokenizer's vocab_size + NUM_SPECIAL_IDS."""
    if tokenizer == "byte":
        return tok.VOCAB_SIZE
    return tok.cached_tokenizer(tokenizer).vocab_size + NUM_SPECIAL_IDS


def to_birdie_ids(ids: np.ndarray) -> np.ndarray:
    """A (non-byte) tokenizer's ids in Birdie's id space: t < 256 stays, t ≥ 256 → t + 64, so
    256..319 stay Birdie's specials. `from_birdie_ids` inverts it."""
    ids = np.asarray(ids, np.int32)
    return np.where(ids >= tok.NUM_BYTES, ids + NUM_SPECIAL_IDS, ids).astype(np.int32)


def from_birdie_ids(ids: np.ndarray) -> np.ndarray:
    """The tokenizer's ids of Birdie-space ids (specials 256..319 map to -1)."""
    ids = np.asarray(ids, np.int32)
    special = (ids >= tok.NUM_BYTES) & (ids < tok.VOCAB_SIZE)
    out = np.where(ids >= tok.VOCAB_SIZE, ids - NUM_SPECIAL_IDS, ids)
    return np.where(special, -1, out).astype(np.int32)


def encode(text: str | bytes, tokenizer: str = "byte", *, add_eos: bool = False) -> np.ndarray:
    """Birdie-space ids of `text` under `tokenizer` (EOS, Birdie's, appended with add_eos)."""
    if tokenizer == "byte":
        return tok.encode(text, add_eos=add_eos)
    ids = to_birdie_ids(tok.cached_tokenizer(tokenizer).encode(text))
    return np.append(ids, np.int32(tok.EOS)).astype(np.int32) if add_eos else ids


class BirdieTokenizer:
    """A tokenizer seen through Birdie's id space (`to_birdie_ids`): encode, decode, vocab_size,
    pad_id and special("EOS") as a `tok.Tokenizer`, for evaluating a Birdie run trained with a
    non-byte tokenizer (eval/phonebook.py)."""

    def __init__(self, spec: str):
        self._spec = spec
        self._tok = tok.cached_tokenizer(spec)
        self.spec = f"birdie:{spec}"
        self.vocab_size = vocab_size(spec)
        self.pad_id = tok.PAD

    def special(self, name: str) -> int:
        return tok.special(name)

    def encode(self, text: str | bytes) -> np.ndarray:
        return encode(text, self._spec)

    def decode(self, ids) -> str:
        ids = from_birdie_ids(np.asarray(ids))
        return self._tok.decode(ids[ids >= 0])


def eval_tokenizer(spec: str = "byte"):
    """What encodes a Birdie run's evaluation prompts: the byte tokenizer, or `BirdieTokenizer`."""
    return tok.ByteTokenizer() if spec == "byte" else BirdieTokenizer(spec)


@functools.lru_cache(maxsize=4)
def _corpus_tokens(split: str, validation_percent: int, tokenizer: str) -> tuple[np.ndarray, ...]:
    return tuple(encode(d["text"], tokenizer)
                 for d in text_corpus.documents(split, validation_percent))


def _document_source(spec: BirdieDataSpec, split: str):
    """Random-access {"text": bytes} documents of corpus "local_text" / "tfds" (opened at the
    first read, so a config can be compiled, e.g. by train/dryrun.py, before the corpus exists)."""
    needs = "text_dir" if spec.corpus == "local_text" else "tfds_name"
    if not getattr(spec, needs):
        raise ValueError(f"corpus={spec.corpus!r} needs {needs}; give --config.data.{needs}=...")
    if spec.corpus == "local_text":
        return text_corpus.local_data_source(split, spec.text_dir, spec.text_patterns,
                                             spec.validation_percent, spec.data_dir or None)
    return catalog.TextFieldSource(catalog.catalog_data_source(
        spec.tfds_name, split=split, data_dir=spec.data_dir or None), spec.text_key)


def row_generator(seed: int, split: str, index: int, length: int) -> np.random.Generator:
    """The generator of record `index` of `split` (of `length` records): seeded by (seed, split,
    index) alone, so any record can be regenerated on its own."""
    if not 0 <= index < length:
        raise IndexError(f"index={index} out of range for split {split!r}")
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


class BirdieSource:
    """Random-access source of packed rows (picklable; the corpus is loaded on first read)."""

    def __init__(self, spec: BirdieDataSpec, split: str):
        self._spec = spec
        self._split = split
        self._len = spec.num_examples(split)
        self._documents = None          # corpus "local_text" / "tfds": opened on first read
        self._objectives = objective_set(spec.objectives, spec.objective_settings)
        if spec.mixture:
            w = np.asarray(spec.mixture, np.float64)
            self._mixture = w / w.sum()
        else:
            self._mixture = birdie.uniform_mixture(self._objectives)

    def __len__(self) -> int:
        return self._len

    def _text(self, rng: np.random.Generator) -> np.ndarray:
        s = self._spec
        use_book = s.corpus == "phonebook" or (s.corpus == "mix" and rng.random() < 0.5)
        if use_book:
            entries = int(rng.integers(s.phonebook_entries[0], s.phonebook_entries[1] + 1))
            ex = phonebook.make_example(int(rng.integers(2**31)), entries, 1)
            return encode(ex.prompt + ex.target, s.tokenizer)
        if s.corpus in ("local_text", "tfds"):
            if self._documents is None:
                self._documents = _document_source(s, self._split)
            doc = encode(self._documents[int(rng.integers(len(self._documents)))]["text"],
                         s.tokenizer)
        else:
            docs = _corpus_tokens(self._split, s.validation_percent, s.tokenizer)
            doc = docs[int(rng.integers(len(docs)))]
        n = min(doc.size, s.seq_len)
        start = int(rng.integers(0, doc.size - n + 1))
        return doc[start: start + n]

    def _task(self, rng: np.random.Generator):
        s = self._spec
        entries = int(rng.integers(s.phonebook_entries[0], s.phonebook_entries[1] + 1))
        queries = int(rng.integers(s.phonebook_queries[0],
                                   min(s.phonebook_queries[1], entries) + 1))
        ex = phonebook.make_example(int(rng.integers(2**31)), entries, queries)
        prompt = encode(ex.prompt, s.tokenizer)
        target = encode(ex.target, s.tokenizer, add_eos=True)
        if prompt.size + target.size > s.seq_len:
            raise ValueError(f"a phone book of {entries} entries needs "
                             f"{prompt.size + target.size} tokens > seq_len={s.seq_len}")
        return birdie.make_example(prompt, target)

    def _example(self, rng: np.random.Generator, index: int):
        """(example, configuration index; K for the task) of the next draw for row `index`."""
        s = self._spec
        K = len(self._objectives)
        if s.objective_per_row:
            i = index % K
        elif s.task_weight and rng.random() < s.task_weight:
            return self._task(rng), K
        else:
            i = int(rng.choice(K, p=self._mixture))
        return self._objectives[i](self._text(rng), int(rng.integers(2**31)),
                                   max_length=s.seq_len), i

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self._spec
        index = int(index)
        rng = row_generator(s.seed, self._split, index, self._len)
        return birdie.pack_row(lambda: self._example(rng, index), s.seq_len,
                               with_prefix=s.with_prefix)

    def __getstate__(self):
        return {**self.__dict__, "_documents": None}   # reopened in the worker

    def __repr__(self) -> str:
        return f"BirdieSource({self._spec}, split={self._split!r})"
