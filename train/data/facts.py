"""Synthetic fact stream for MAC (offline stand-in for StreamingQA), plus real QA loaders.

Each document states facts about one invented entity among distractor sentences:

    "Bodaku lives in Lisbon. Bodaku works as a baker. Bodaku collects coins."

and each question asks one of the facts ("Where does Bodaku live?" → "Lisbon"), so its answer
can only be read from that document. Entity names are two- or three-syllable inventions split
into train / validation / test sets by a fixed permutation (independent of the stream seed), so
the splits never share an entity. Streams are deterministic per (split, seed).

Real data (`load_qa_file`, `load_squad`, `load_qa_split`): StreamingQA and ArchivalQA files in
their official columns and SQuAD v1.1 through `tfds.data_source("squad")` (a prepared TFDS build;
nothing is downloaded at run time), with the official MAC code's splits, order and targets;
records {"doc_id", "document", "question", "answer" (the target), "answers" (every gold)}.

Token layout (train/data/tokenizer.py bytes): documents are right-padded with PAD to S; a QA row
is `question SEP answer EOS` padded to Q, with the loss on the answer and EOS only.
The TFDS builder `FactStream` writes the same records as array_record files (no TensorFlow).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Any, ClassVar, Iterator, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from train.data import catalog
from train.data import tokenizer as tok

SPLITS = ("train", "validation", "test")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "h", "j")
_VOWELS = ("a", "e", "i", "o", "u")
_SPLIT_SEED = 20240607  # fixed: the entity split does not depend on the stream seed

# Relations: (question template, fact template, closed answer set). Answers are one word, so EM
# and F1 agree; within a relation every answer starts with a different letter (the first byte
# decides the answer, as a single-token answer would), and with 20 answers guessing scores 1/20.
RELATIONS = (
    ("Where does {e} live?", "{e} lives in {a}.",
     ("Accra", "Bern", "Cairo", "Dakar", "Essen", "Fez", "Geneva", "Hanoi", "Izmir", "Jena",
      "Kyoto", "Lisbon", "Minsk", "Nice", "Oslo", "Perth", "Quito", "Riga", "Sofia", "Tunis")),
    ("What does {e} work as?", "{e} works as a {a}.",
     ("baker", "chef", "dentist", "farmer", "guard", "hunter", "judge", "keeper", "lawyer",
      "miner", "nurse", "pilot", "quarryman", "ranger", "sailor", "tailor", "vet", "weaver",
      "yeoman", "zookeeper")),
    ("What does {e} collect?", "{e} collects {a}.",
     ("antiques", "bells", "coins", "dolls", "eggs", "fossils", "gems", "hats", "jars", "keys",
      "lamps", "maps", "nails", "pens", "quilts", "rocks", "stamps", "tickets", "vases",
      "watches")),
)

DISTRACTORS = (
    "The river was calm that morning.", "A light rain fell over the hills.",
    "The market opened late.", "Nobody remembered the old bridge.", "The train left on time.",
    "Bread was cheap that year.", "The museum closed for repairs.", "Birds sang in the park.",
    "A storm passed to the north.", "The library bought new shelves.",
    "Tea was served at noon.", "The festival drew a large crowd.", "Snow covered the roofs.",
    "The harbor was quiet.", "A new road was built.", "The school held a concert.",
)


def _all_names() -> list[str]:
    syll = [o + v for o in _ONSETS for v in _VOWELS]
    names = [a + b for a in syll for b in syll] + [a + b + c for a in syll[::3]
                                                  for b in syll[1::3] for c in syll[2::3]]
    return sorted(set(n.capitalize() for n in names))


def entity_names(split: str) -> list[str]:
    """The entity names of a split (train 80%, validation 10%, test 10%; pairwise disjoint)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
    names = _all_names()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(names))
    n = len(names)
    bounds = {"train": (0, int(0.8 * n)), "validation": (int(0.8 * n), int(0.9 * n)),
              "test": (int(0.9 * n), n)}
    lo, hi = bounds[split]
    return [names[i] for i in order[lo:hi]]


def make_document(rng: np.random.Generator, entity: str, *, num_distractors: int = 0,
                  shuffle: bool = False) -> dict:
    """One document about `entity`: every relation's fact (in random order if `shuffle`), with
    `num_distractors` distractor sentences at random places.

    The defaults (facts in relation order, no distractors) are the CPU-scale task: the small
    amortization network must learn where the facts are within a few thousand steps.
    """
    answers = [rel[2][rng.integers(len(rel[2]))] for rel in RELATIONS]
    sentences = [rel[1].format(e=entity, a=a) for rel, a in zip(RELATIONS, answers)]
    order = list(rng.permutation(len(sentences))) if shuffle else list(range(len(sentences)))
    sentences = [sentences[i] for i in order]
    for _ in range(num_distractors):
        pos = int(rng.integers(len(sentences) + 1))
        sentences.insert(pos, DISTRACTORS[rng.integers(len(DISTRACTORS))])
    qas = [{"question": rel[0].format(e=entity), "answer": a}
           for rel, a in zip(RELATIONS, answers)]
    return {"document": " ".join(sentences), "entity": entity, "qas": qas}


def fact_stream(split: str, num_documents: int, seed: int, *,
                num_distractors: int = 0, shuffle: bool = False) -> list[dict]:
    """`num_documents` documents about distinct entities of `split`, deterministic per seed.

    Each item: {"doc_id", "document", "entity", "qas": [{"question", "answer"}, ...]}.
    """
    names = entity_names(split)
    if not 0 < num_documents <= len(names):
        raise ValueError(f"num_documents={num_documents} is not allowed for split={split!r}: "
                         f"use 1..{len(names)} (one entity per document)")
    salt = SPLITS.index(split)
    rng = np.random.default_rng([seed, salt])
    picks = rng.choice(len(names), size=num_documents, replace=False)
    out = []
    for i, j in enumerate(picks):
        d = make_document(rng, names[j], num_distractors=num_distractors, shuffle=shuffle)
        d["doc_id"] = i
        out.append(d)
    return out


def qa_records(docs: Sequence[dict], *, questions_per_doc: Optional[int] = 1) -> list[dict]:
    """Flat {"doc_id", "document", "question", "answer"} records (the first k questions per doc)."""
    out = []
    for d in docs:
        qas = d["qas"] if questions_per_doc is None else d["qas"][:questions_per_doc]
        for qa in qas:
            out.append({"doc_id": d["doc_id"], "document": d["document"],
                        "question": qa["question"], "answer": qa["answer"]})
    return out


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------
def encode_documents(texts: Sequence[str], length: int) -> np.ndarray:
    """int32 [N, S=length]: document bytes, right-padded with PAD (cut at S)."""
    return tok.encode_batch(texts, length=length)


def encode_prompts(questions: Sequence[str], length: int) -> np.ndarray:
    """int32 [B, Q]: `question SEP`, right-padded with PAD; the decoder continues after SEP."""
    rows = [np.concatenate([tok.encode(q), [tok.SEP]]) for q in questions]
    out = np.full((len(rows), length), tok.PAD, np.int32)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"question {questions[i]!r} needs {len(r)} tokens > length={length}")
        out[i, :len(r)] = r
    return out


def encode_questions(questions: Sequence[str], length: int) -> np.ndarray:
    """int32 [B, Q]: question bytes only (the aggregation network's input), PAD-padded."""
    return tok.encode_batch(questions, length=length)


def encode_qa(questions: Sequence[str], answers: Sequence[str], length: int):
    """`question SEP answer EOS` rows: tokens [B, Q] int32 and loss weights [B, Q] float32.

    weights[b, t] = 1 where tokens[b, t] is an answer byte or the EOS, i.e. the positions whose
    *prediction* (from position t-1) is scored.
    """
    tokens = np.full((len(questions), length), tok.PAD, np.int32)
    weights = np.zeros((len(questions), length), np.float32)
    for i, (q, a) in enumerate(zip(questions, answers)):
        qi = np.concatenate([tok.encode(q), [tok.SEP]])
        ai = np.concatenate([tok.encode(a), [tok.EOS]])
        row = np.concatenate([qi, ai])
        if len(row) > length:
            raise ValueError(f"question+answer {q!r}/{a!r} needs {len(row)} tokens > "
                             f"length={length}")
        tokens[i, :len(row)] = row
        weights[i, len(qi):len(row)] = 1.0
    return tokens, weights


# ---------------------------------------------------------------------------------------------
# Real data: StreamingQA, ArchivalQA and SQuAD in their official formats
# ---------------------------------------------------------------------------------------------
# The official MAC code (jihoontack/MAC, common/dataset.py: StreamingQADataset, ArchivalQADataset,
# SquadDataset; conf/dataset/*.yaml) reads {train,val,test}.csv for StreamingQA and ArchivalQA
# and slices SQuAD v1.1's train split for training and validation, testing on its validation.
QA_FORMATS = ("streamingqa", "archivalqa", "squad")
QA_SPLITS = ("train", "val", "test")          # file names D/SPLIT.csv (the official layout)
_COLUMNS = {"streamingqa": ("question", "answers", "text"),
            "archivalqa": ("question", "answer", "ans_paragraph", "ans_text", "doc_id",
                           "para_num")}
# SQuAD v1.1 rows of the official splits (conf/dataset/squad.yaml): [start, end) of a TFDS split.
SQUAD_SPLITS = {"train": ("train", 42118, 82011), "val": ("train", 82011, 87599),
                "test": ("validation", 0, None)}


def _capitalize_first(s: str) -> str:
    """The official ArchivalQA / SQuAD target: the first character upper-cased, if lower."""
    return s[0].upper() + s[1:] if s and s[0].islower() else s


def qa_record(fmt: str, row: dict, *, full_passage: bool = False) -> dict:
    """One official-format row → {"document", "question", "answer", "answers", "group"}.

    answer is the official training and scoring target: StreamingQA the shortest of the
    `answers` split on a backslash; ArchivalQA `answer`, SQuAD the shortest stripped gold, both
    with the first letter capitalised (as the official `get_qa`). answers keeps every gold
    answer (for the SQuAD-style max-over-golds scores). group is what the official split
    shuffles by (ArchivalQA doc_id, SQuAD title; StreamingQA none: rows are shuffled)."""
    if fmt == "streamingqa":
        answers = [a for a in str(row["answers"]).split("\\")]
        return {"document": row["text"], "question": row["question"].strip(),
                "answer": min(answers, key=len), "answers": answers, "group": None}
    if fmt == "archivalqa":
        return {"document": row["ans_text" if full_passage else "ans_paragraph"],
                "question": row["question"].strip(),
                "answer": _capitalize_first(str(row["answer"])), "answers": [str(row["answer"])],
                "group": str(row["doc_id"]), "para_num": int(row["para_num"])}
    if fmt == "squad":
        answers = [a.strip() for a in row["answers"]]
        return {"document": row["context"], "question": row["question"].strip(),
                "answer": _capitalize_first(min(answers, key=len)), "answers": answers,
                "group": row["title"]}
    raise ValueError(f"format={fmt!r} is not allowed; use one of {QA_FORMATS}")


def shuffle_groups(records: Sequence[dict], seed: int) -> list[dict]:
    """The records with the order of their groups (record["group"], in order of first
    appearance) permuted by `seed` and the order within a group kept: the official
    `utils.shuffle_groups`, with a seeded generator instead of numpy's global one."""
    groups = list(dict.fromkeys(r["group"] for r in records))
    rank = {g: i for i, g in enumerate(np.random.default_rng(seed).permutation(len(groups)))}
    rank = {groups[i]: r for i, r in rank.items()}
    return sorted(records, key=lambda r: rank[r["group"]])   # sorted() is stable


def _with_doc_ids(records: Sequence[dict]) -> list[dict]:
    """doc_id = index of the record's document text in order of first appearance."""
    ids: dict[str, int] = {}
    return [{**r, "doc_id": ids.setdefault(r["document"], len(ids))} for r in records]


def official_order(fmt: str, records: Sequence[dict], seed: int) -> list[dict]:
    """The official split's order: StreamingQA rows shuffled (`sample(frac=1)`); ArchivalQA
    rows stably sorted by para_num, then shuffled by doc_id groups; SQuAD shuffled by title
    groups. Documents then get doc_ids in the new order."""
    if fmt == "streamingqa":
        order = np.random.default_rng(seed).permutation(len(records))
        records = [records[i] for i in order]
    elif fmt == "archivalqa":
        records = shuffle_groups(sorted(records, key=lambda r: r["para_num"]), seed)
    elif fmt == "squad":
        records = shuffle_groups(records, seed)
    else:
        raise ValueError(f"format={fmt!r} is not allowed; use one of {QA_FORMATS}")
    return _with_doc_ids(records)


def load_qa_file(path, *, format: str, full_passage: bool = False,
                 limit: Optional[int] = None) -> list[dict]:
    """The rows of an official StreamingQA or ArchivalQA file (.csv as released, or .jsonl with
    the same fields) as `qa_record`s in file order, with doc_ids by first appearance.

    streamingqa needs columns question, answers (golds separated by a backslash), text;
    archivalqa question, answer, ans_paragraph, ans_text, doc_id, para_num (full_passage: the
    document is ans_text instead of ans_paragraph, the official option). Other columns are
    ignored. A missing column or an empty question / answer is a ValueError naming the row."""
    if format not in _COLUMNS:
        raise ValueError(f"format={format!r} is not allowed for a file; use one of "
                         f"{tuple(_COLUMNS)} (SQuAD: load_squad)")
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} is not a file")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        raise ValueError(f"path={str(path)!r} is not allowed: use a .csv or .jsonl file")
    out = []
    for n, r in enumerate(rows[:limit] if limit is not None else rows):
        missing = [c for c in _COLUMNS[format] if c not in r]
        if missing:
            raise ValueError(f"{path}: row {n} lacks columns {missing}; the official {format} "
                             f"format has {list(_COLUMNS[format])}")
        rec = qa_record(format, r, full_passage=full_passage)
        if not rec["question"] or not rec["answer"] or not rec["document"]:
            raise ValueError(f"{path}: row {n} has an empty question, answer or document")
        out.append(rec)
    return _with_doc_ids(out)


def load_squad(split: str = "test", *, limit: Optional[int] = None,
               data_dir: Optional[str] = None) -> list[dict]:
    """SQuAD v1.1 rows of the official MAC split ("train": train[42118:82011], "val":
    train[82011:87599], "test": the validation split) through `tfds.data_source("squad")` (a
    prepared TFDS build; nothing is downloaded), as `qa_record`s in source order."""
    if split not in SQUAD_SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {tuple(SQUAD_SPLITS)}")
    tfds_split, lo, hi = SQUAD_SPLITS[split]
    source = tfds.data_source("squad", split=tfds_split, data_dir=data_dir, download=False)
    hi = len(source) if hi is None else min(hi, len(source))
    if limit is not None:
        hi = min(hi, lo + limit)
    out = []
    for i in range(lo, hi):
        ex = source[i]
        out.append(qa_record("squad", {
            "context": _text(ex["context"]), "question": _text(ex["question"]),
            "title": _text(ex["title"]), "answers": [_text(a) for a in ex["answers"]["text"]]}))
    return _with_doc_ids(out)


def load_qa_split(fmt: str, data_dir, split: str, *, seed: int = 0, full_passage: bool = False,
                  limit: Optional[int] = None) -> list[dict]:
    """One official split in the official order (`official_order` with `seed`): StreamingQA
    and ArchivalQA from DATA_DIR/SPLIT.csv (or .jsonl), SQuAD from the TFDS build in data_dir
    ("" = TFDS's default)."""
    if split not in QA_SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {QA_SPLITS}")
    if fmt == "squad":
        recs = load_squad(split, limit=limit, data_dir=str(data_dir) or None)
    elif fmt in _COLUMNS:
        d = pathlib.Path(data_dir)
        files = [d / f"{split}{ext}" for ext in (".csv", ".jsonl")]
        path = next((f for f in files if f.is_file()), None)
        if path is None:
            raise ValueError(f"data_dir={str(data_dir)!r} has no {split}.csv or {split}.jsonl "
                             f"({fmt}'s official layout: train.csv, val.csv, test.csv)")
        recs = load_qa_file(path, format=fmt, full_passage=full_passage, limit=limit)
    else:
        raise ValueError(f"format={fmt!r} is not allowed; use one of {QA_FORMATS}")
    return official_order(fmt, recs, seed)


def _text(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if hasattr(x, "item") and not isinstance(x, str):
        x = x.item()
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    return str(x)


def iterate_records(records: Sequence[dict], batch: int, seed: int) -> Iterator[list[dict]]:
    """Endless shuffled batches of records (each epoch a fresh permutation), deterministic."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(records))
        for s in range(0, len(order) - batch + 1, batch):
            yield [records[i] for i in order[s:s + batch]]


# ---------------------------------------------------------------------------------------------
# TFDS builder (array_record; TensorFlow not needed), following train/data/mqar.py
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FactSpec:
    """What a built fact stream holds: documents per split, the seed, distractors per doc."""
    train_documents: int = 16000
    validation_documents: int = 512
    test_documents: int = 512
    seed: int = 0
    num_distractors: int = 0
    shuffle: bool = False

    def __post_init__(self):
        for s in SPLITS:
            n = getattr(self, f"{s}_documents")
            if not isinstance(n, int) or not 0 < n <= len(entity_names(s)):
                raise ValueError(f"{s}_documents={n!r} is not allowed; use 1.."
                                 f"{len(entity_names(s))} (one entity per document)")

    @property
    def config_name(self) -> str:
        return (f"n{self.train_documents}-{self.validation_documents}-{self.test_documents}"
                f"_s{self.seed}_d{self.num_distractors}" + ("_shuffled" if self.shuffle else ""))

    def documents(self, split: str) -> list[dict]:
        return fact_stream(split, getattr(self, f"{split}_documents"), self.seed,
                           num_distractors=self.num_distractors, shuffle=self.shuffle)


@dataclasses.dataclass(eq=False)
class FactStreamConfig(tfds.core.BuilderConfig):
    spec: FactSpec = dataclasses.field(default_factory=FactSpec)


class FactStream(catalog.LocalBuilder):
    """The fact stream as TFDS dataset "fact_stream": one record per document with
    {doc_id, entity, document, question_r, answer_r for each relation r}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[FactStreamConfig]] = [
        FactStreamConfig(name=FactSpec().config_name, spec=FactSpec())]

    def _info(self) -> tfds.core.DatasetInfo:
        feats = {"doc_id": tfds.features.Scalar(dtype=np.int32),
                 "entity": tfds.features.Text(), "document": tfds.features.Text()}
        for r in range(len(RELATIONS)):
            feats[f"question_{r}"] = tfds.features.Text()
            feats[f"answer_{r}"] = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                     features=tfds.features.FeaturesDict(feats),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        for d in self.builder_config.spec.documents(split):
            yield d["doc_id"], record_of(d)


def record_of(doc: dict) -> dict[str, Any]:
    """The flat TFDS record of a `fact_stream` document."""
    rec = {"doc_id": np.int32(doc["doc_id"]), "entity": doc["entity"],
           "document": doc["document"]}
    for r, qa in enumerate(doc["qas"]):
        rec[f"question_{r}"] = qa["question"]
        rec[f"answer_{r}"] = qa["answer"]
    return rec


def document_of(record: dict) -> dict:
    """Inverse of `record_of` (accepts bytes or str text fields, as TFDS returns either)."""
    t = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)  # noqa: E731
    return {"doc_id": int(record["doc_id"]), "entity": t(record["entity"]),
            "document": t(record["document"]),
            "qas": [{"question": t(record[f"question_{r}"]), "answer": t(record[f"answer_{r}"])}
                    for r in range(len(RELATIONS))]}


def builder(spec: FactSpec = FactSpec(), data_dir: Optional[str] = None) -> FactStream:
    default = FactStream.BUILDER_CONFIGS[0]
    config = (default.name if spec == default.spec
              else FactStreamConfig(name=spec.config_name, spec=spec))
    return FactStream(config=config, data_dir=catalog.resolve_data_dir(data_dir),
                      file_format="array_record")


def build(spec: FactSpec = FactSpec(), data_dir: Optional[str] = None) -> FactStream:
    """Builds `spec` once into data_dir (reused afterwards); returns the prepared builder."""
    return catalog.prepare(lambda: builder(spec, data_dir))


def data_source(spec: FactSpec, split: str, data_dir: Optional[str] = None):
    """Random-access array_record source of `split` (records as `record_of`), building first."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
    return build(spec, data_dir).as_data_source(split=split)
