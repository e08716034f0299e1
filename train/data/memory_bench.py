"""The memory benchmark's probes and their training mixture (the `memory_bench` figure).

Every probe example is one token sequence (byte ids, V = 320) with its answer marked:

    {"tokens": int32 [n], "answer": bool [n], "prefix_len": int}

`answer[i]` marks the tokens a model must predict from tokens[:i] (scored by argmax under
teacher forcing: all of an example's answer tokens right ⇔ greedy decoding writes the answer);
tokens[:prefix_len] is the prompt a bidirectional model may read both ways (Birdie's prefix).

Probes (`difficulty` is the swept setting):
- "mqar": multi-query associative recall (train/data/mqar.py's generator), difficulty = P pairs;
  the pairs are the prefix, then all P keys queried in a random order (seq 4P, no fill gaps).
  Keys are ids in [128, 192), values in [192, 256): outside ASCII, so no text probe uses them.
- "passkey": the landmark paper's prompt (train/data/passkey_data.py: make_prompt), difficulty =
  the prompt's length in bytes; the answer is the key's digits.
- "phonebook": a book of `difficulty` entries "Name Surname : XXX-XXX-XXXX" (train/data/
  phonebook.py: make_book), then "Name Surname?"; the answer is the asked number's digits.
- "streamqa": streaming QA over a stream of `difficulty` one-fact documents, one a line, each
  about its own invented entity (train/data/facts.py: "Bodaku lives in Lisbon."; the relation
  drawn per document), then a question about one of them ("Where does Bodaku live?"); the answer
  is " Lisbon", its first letter scored (within a relation every answer starts with its own
  letter, so that letter decides the answer; the rest is spelled from it). The entities come
  from facts.py's split: train examples name train entities, test examples test entities, so
  no test fact was ever seen in training.

Example i of split s ("train" | "test") under content seed S is drawn from
`np.random.default_rng([S, PROBE_CODE, SPLIT_CODE, difficulty, i])`: the test split is another
stream of the same generator. For MQAR and the phone book a test example's (pairs | book) is
checked against nothing: collisions with training examples are possible but improbable
(`heldout_overlap` counts them). `no_binding` gives each probe's honest floor: the answer-token
accuracy of a model that reads the context's candidate answers but has not bound them to the
query (MQAR: a value of the example's own pairs; phone book: a number of the example's own book;
passkey: uniform digits, as its prompt holds one key only; streaming QA: the attribute of one of
the example's own documents of the asked relation, which the question names; the attribute
prior, 1/20 per relation, is lower).

`MixtureSource(spec, split)` is the training mixture (dataset "memory_bench" in
train/data/pipeline.py): row i is one example of a probe drawn with `spec.weights`, at a
difficulty drawn uniformly from the probe's training range, left-aligned in T + 1 tokens and
padded with 0: {inputs, targets, weights, prefix} [T], weights 1 exactly at the answer targets.
With `birdie_fraction` > 0 that share of the rows is instead packed with Birdie's objectives
(train/objectives/birdie.py, the compact settings) over the text of probe examples drawn the
same way (an example that cannot fit T tokens is drawn again, with other text), and every row
also carries segment_ids and objective_ids (train/data/birdie_data.py's fields; a probe row:
segment 1, objective K). The K configurations are `birdie_objectives(T)`: those of the compact
set whose shortest example fits T tokens (18; at T = 128 selective copying, whose shortest
example needs 132, is left out: 17). Which configuration each packed example uses is drawn from
`mixture` ([K] weights, set by Birdie's controller, train/objectives/birdie_controller.py; ():
uniform over the classes); the mixture never changes which rows are Birdie rows nor the probe
rows, so every model trained on the mixture sees the same probe rows.

The "validation" split (`num_validation` rows) is the controller's: another stream of the same
generator (streaming QA on train entities, as in training), disjoint by seed from "train" and
from "test". With `objective_per_row` every row of a split is a Birdie row and row i packs
configuration i % K only (the controller's balanced validation rows).
"""
from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from train.data import birdie_data, facts, mqar, passkey_data, phonebook
from train.data import tokenizer as tok
from train.objectives import birdie

PROBES = ("mqar", "passkey", "phonebook", "streamqa")
SPLITS = ("train", "test", "validation")
_PROBE_CODE = {p: i for i, p in enumerate(PROBES)}
_SPLIT_CODE = {"train": 0, "test": 1, "validation": 2}

MQAR_KEYS = (128, 192)        # key ids [lo, hi)
MQAR_VALUES = (192, 256)      # value ids [lo, hi)
MAX_PAIRS = MQAR_KEYS[1] - MQAR_KEYS[0]
PASSKEY_DIGITS = 5
PASSKEY_MIN = passkey_data.fixed_length(PASSKEY_DIGITS)   # shortest passkey prompt (bytes)
PHONE_QUESTION = "{name}?"
# streamqa: facts.py's relations (question, fact, answers); the test split's entities are few.
STREAMQA_MAX_DOCUMENTS = len(facts.entity_names("test"))
_FACT_PATTERNS = [re.compile("^" + re.escape(fact).replace(re.escape("{e}"), "(?P<e>[A-Za-z]+)")
                             .replace(re.escape("{a}"), "(?P<a>[a-z]+|[A-Z][a-z]+)") + "$")
                  for _, fact, _ in facts.RELATIONS]


def _check(field: str, value, allowed: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {allowed}")


def example_rng(seed: int, probe: str, split: str, difficulty: int,
                index: int) -> np.random.Generator:
    """The generator of example `index` of (`probe`, `split`, `difficulty`) under `seed`."""
    _check("probe", probe, str(PROBES), probe in _PROBE_CODE)
    _check("split", split, str(SPLITS), split in _SPLIT_CODE)
    return np.random.default_rng([int(seed), _PROBE_CODE[probe], _SPLIT_CODE[split],
                                  int(difficulty), int(index)])


def _pack(prompt: np.ndarray, answer: np.ndarray, scored: np.ndarray) -> dict:
    """tokens = prompt ++ answer; `scored` [len(answer)] marks which answer tokens count."""
    tokens = np.concatenate([prompt, answer]).astype(np.int32)
    mask = np.zeros(tokens.size, bool)
    mask[prompt.size:] = scored
    return {"tokens": tokens, "answer": mask, "prefix_len": int(prompt.size)}


def mqar_probe(rng: np.random.Generator, pairs: int) -> dict:
    """P = `pairs` key-value pairs, then every key queried once (query k_a → answer v_a)."""
    _check("pairs", pairs, f"1..{MAX_PAIRS}", 1 <= pairs <= MAX_PAIRS)
    ex = mqar.mqar_example(rng, seq_len=4 * pairs, num_pairs=pairs, num_queries=pairs,
                           key_range=MQAR_KEYS, value_range=MQAR_VALUES, fill_token=0)
    tokens = np.concatenate([ex["inputs"], ex["targets"][-1:]]).astype(np.int32)
    mask = np.zeros(tokens.size, bool)
    mask[1:] = ex["weights"] > 0             # target t = tokens[t + 1] answers query t
    return {"tokens": tokens, "answer": mask, "prefix_len": 2 * pairs}


def passkey_probe(rng: np.random.Generator, length: int) -> dict:
    """The passkey prompt of `length` bytes (key at a uniform depth); answer " K", its digits
    scored."""
    _check("length", length, f">= {PASSKEY_MIN}", length >= PASSKEY_MIN)
    key = passkey_data.random_key(rng, PASSKEY_DIGITS)
    prompt, answer = passkey_data.make_prompt(length, key, float(rng.random()),
                                              num_digits=PASSKEY_DIGITS)
    a = tok.encode(answer)
    return _pack(tok.encode(prompt), a, np.arange(a.size) > 0)    # the space is not scored


def phonebook_lines(book) -> str:
    return "".join(f"{n} : {p}\n" for n, p in book)


def phonebook_probe(rng: np.random.Generator, entries: int) -> dict:
    """A book of `entries` names, one of them asked; answer " XXX-XXX-XXXX" (digits scored)."""
    _check("entries", entries, f"1..{phonebook.MAX_ENTRIES}",
           1 <= entries <= phonebook.MAX_ENTRIES)
    book = phonebook.make_book(rng, entries)
    name, number = book[int(rng.integers(entries))]
    prompt = phonebook_lines(book) + PHONE_QUESTION.format(name=name)
    a = tok.encode(" " + number)
    scored = np.array([c.isdigit() for c in " " + number])
    return _pack(tok.encode(prompt), a, scored)


def streamqa_probe(rng: np.random.Generator, documents: int, *, split: str = "train") -> dict:
    """`documents` one-fact documents (distinct entities of facts.py's `split`: "test" for the
    test split), one a line, then a question about a uniformly chosen one; answer " Attribute",
    its first letter scored."""
    names = facts.entity_names("test" if split == "test" else "train")
    _check("documents", documents, f"1..{STREAMQA_MAX_DOCUMENTS}",
           1 <= documents <= STREAMQA_MAX_DOCUMENTS)
    picks = rng.choice(len(names), documents, replace=False)
    lines, qas = [], []
    for j in picks:
        question, fact, answers = facts.RELATIONS[int(rng.integers(len(facts.RELATIONS)))]
        a = answers[int(rng.integers(len(answers)))]
        lines.append(fact.format(e=names[j], a=a))
        qas.append((question.format(e=names[j]), a))
    question, a = qas[int(rng.integers(documents))]
    prompt = "".join(f"{ln}\n" for ln in lines) + question
    answer = tok.encode(" " + a)
    return _pack(tok.encode(prompt), answer, np.arange(answer.size) == 1)


def streamqa_facts(text: str) -> list[tuple[int, str, str]]:
    """The (relation, entity, attribute) of each document line of a streamqa prompt `text`."""
    out = []
    for line in text.split("\n")[:-1]:
        hit = [(r, m) for r, m in enumerate(p.match(line) for p in _FACT_PATTERNS) if m]
        _check("streamqa document", line, "a facts.RELATIONS fact", len(hit) == 1)
        r, m = hit[0]
        out.append((r, m["e"], m["a"]))
    return out


GENERATORS = {"mqar": mqar_probe, "passkey": passkey_probe, "phonebook": phonebook_probe,
              "streamqa": streamqa_probe}


def probe_example(probe: str, split: str, difficulty: int, index: int, seed: int) -> dict:
    """Example `index` of `probe` at `difficulty` in `split` (deterministic)."""
    rng = example_rng(seed, probe, split, difficulty, index)
    if probe == "streamqa":
        return streamqa_probe(rng, int(difficulty), split=split)
    return GENERATORS[probe](rng, int(difficulty))


def probe_length(probe: str, difficulty: int) -> int:
    """The most tokens an example of `probe` at `difficulty` has."""
    if probe == "mqar":
        return 4 * difficulty + 1
    if probe == "passkey":
        return difficulty + 1 + PASSKEY_DIGITS
    if probe == "streamqa":
        entity = max(map(len, facts.entity_names("train") + facts.entity_names("test")))
        fact = max(len(f) + max(map(len, a)) - 6 for _, f, a in facts.RELATIONS) + entity
        question = max(len(q) - 3 for q, _, _ in facts.RELATIONS) + entity
        answer = 1 + max(len(x) for _, _, a in facts.RELATIONS for x in a)
        return difficulty * (fact + 1) + question + answer
    _check("probe", probe, str(PROBES), probe == "phonebook")
    name = max(map(len, phonebook.FIRST_NAMES)) + 1 + max(map(len, phonebook.LAST_NAMES))
    return difficulty * (name + 3 + 13) + name + 1 + 13


def no_binding(probe: str, examples: list[dict], seed: int | None = None) -> float:
    """The expected answer-token accuracy of answering from the context without binding (see the
    module docstring), averaged over `examples` (a list of (example, difficulty) is not needed:
    each example carries what its floor needs)."""
    del seed
    hits = total = 0.0
    for ex in examples:
        t, m = ex["tokens"], ex["answer"]
        if probe == "mqar":
            P = ex["prefix_len"] // 2
            values = t[1:2 * P:2]
            share = (values[None, :] == t[m][:, None]).mean(-1)
            hits += float(share.sum())
            total += float(m.sum())
        elif probe == "passkey":
            # A uniform key: the first digit 1 in 9, the others 1 in 10.
            hits += 1 / 9 + (PASSKEY_DIGITS - 1) / 10
            total += PASSKEY_DIGITS
        elif probe == "streamqa":
            # The asked relation's attributes among the example's own documents, one at random.
            text = bytes(t[:ex["prefix_len"]].astype(np.uint8)).decode()
            question = text.split("\n")[-1]
            r = [i for i, (q, _, _) in enumerate(facts.RELATIONS)
                 if question.startswith(q.split("{e}")[0]) and question.endswith(q.split("{e}")[1])]
            _check("streamqa question", question, "a facts.RELATIONS question", len(r) == 1)
            firsts = [a[0] for rel, _, a in streamqa_facts(text) if rel == r[0]]
            asked = chr(int(t[m][0]))
            hits += sum(f == asked for f in firsts) / len(firsts)
            total += float(m.sum())
        else:
            _check("probe", probe, str(PROBES), probe == "phonebook")
            text = bytes(t[:ex["prefix_len"]].astype(np.uint8)).decode()
            numbers = [ln.split(" : ")[1] for ln in text.split("\n")[:-1]]
            digits = np.array([[c for c in n if c.isdigit()] for n in numbers])
            asked = np.array([chr(c) for c in t[m]])
            hits += float((digits == asked[None, :]).mean(0).sum())
            total += float(m.sum())
    return hits / max(total, 1.0)


def heldout_overlap(probe: str, difficulty: int, num: int, seed: int) -> int:
    """How many of the first `num` test examples also appear among the first `num` train ones."""
    seen = {probe_example(probe, "train", difficulty, i, seed)["tokens"].tobytes()
            for i in range(num)}
    return sum(probe_example(probe, "test", difficulty, i, seed)["tokens"].tobytes() in seen
               for i in range(num))


# ---------------------------------------------------------------------------------------------
# The training mixture


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
    seq_len: int                                   # T: tokens per row
    weights: tuple = (1.0, 1.0, 1.0, 1.0)          # probability of each of PROBES (normalised)
    mqar_pairs: tuple = (1, 8)                     # training difficulty ranges (inclusive)
    passkey_lengths: tuple = (PASSKEY_MIN, 120)
    phonebook_entries: tuple = (1, 3)
    streamqa_documents: tuple = (1, 3)
    num_train: int = 1_000_000                     # rows per split (generated when read)
    num_test: int = 256
    seed: int = 0                                  # content seed
    birdie_fraction: float = 0.0                   # share of rows of Birdie objectives
    mixture: tuple = ()                            # [K] weights over birdie_objectives(T);
                                                   # () uniform over the classes
    num_validation: int = 256                      # rows of "validation" (the controller's)
    objective_per_row: bool = False                # every row Birdie's, row i configuration i % K

    def __post_init__(self):
        _check("birdie_fraction", self.birdie_fraction, "a number in [0, 1]",
               0.0 <= self.birdie_fraction <= 1.0)
        _check("num_validation", self.num_validation, "an integer >= 1",
               int(self.num_validation) == self.num_validation and self.num_validation >= 1)
        w = tuple(float(x) for x in self.mixture)
        object.__setattr__(self, "mixture", w)
        if w or self.objective_per_row:
            _check("birdie_fraction", self.birdie_fraction,
                   "> 0 with a mixture or objective_per_row (they choose Birdie's rows)",
                   self.birdie_fraction > 0)
        if w:
            K = len(birdie_objectives(self.seq_len))
            _check("mixture", self.mixture, f"() or {K} finite non-negative weights with a "
                   "positive sum", len(w) == K and all(np.isfinite(w)) and min(w) >= 0
                   and sum(w) > 0)
        w = tuple(float(x) for x in self.weights)
        _check("weights", self.weights, f"{len(PROBES)} non-negative numbers, not all 0",
               len(w) == len(PROBES) and min(w) >= 0 and sum(w) > 0)
        object.__setattr__(self, "weights", w)
        for probe, field in zip(PROBES, ("mqar_pairs", "passkey_lengths", "phonebook_entries",
                                       "streamqa_documents")):
            lo, hi = (int(x) for x in getattr(self, field))
            object.__setattr__(self, field, (lo, hi))
            _check(field, getattr(self, field), "(lo, hi) with 1 <= lo <= hi", 1 <= lo <= hi)
            need = probe_length(probe, hi)
            _check(field, (lo, hi), f"a longest example that fits seq_len={self.seq_len} + 1 "
                   f"(it needs {need} tokens)", need <= self.seq_len + 1)
        _check("passkey_lengths", self.passkey_lengths, f"lo >= {PASSKEY_MIN}",
               self.passkey_lengths[0] >= PASSKEY_MIN)

    def train_range(self, probe: str) -> tuple[int, int]:
        return {"mqar": self.mqar_pairs, "passkey": self.passkey_lengths,
                "phonebook": self.phonebook_entries, "streamqa": self.streamqa_documents}[probe]


class MixtureSource:
    """Random-access training rows of the probe mixture (see the module docstring; picklable)."""

    def __init__(self, spec: MixtureSpec, split: str):
        _check("split", split, str(SPLITS), split in _SPLIT_CODE)
        self._spec, self._split = spec, split
        self._len = {"train": spec.num_train, "test": spec.num_test,
                     "validation": spec.num_validation}[split]

    def __len__(self) -> int:
        return self._len

    def _draw(self, rng: np.random.Generator) -> tuple[str, dict]:
        s = self._spec
        p = np.asarray(s.weights) / sum(s.weights)
        probe = PROBES[int(rng.choice(len(PROBES), p=p))]
        lo, hi = s.train_range(probe)
        return probe, GENERATORS[probe](rng, int(rng.integers(lo, hi + 1)))  # streamqa: train

    def _rng(self, index: int) -> np.random.Generator:
        s = self._spec
        return np.random.default_rng([s.seed, len(PROBES), _SPLIT_CODE[self._split], int(index)])

    def example(self, index: int) -> tuple[str, dict]:
        """(probe, example) of row `index` (birdie_fraction 0: the example the row holds)."""
        return self._draw(self._rng(index))

    def __getitem__(self, index: int) -> dict:
        s = self._spec
        rng = self._rng(index)
        if not s.birdie_fraction:
            return row(self._draw(rng)[1], s.seq_len)
        objectives = birdie_objectives(s.seq_len)
        K = len(objectives)
        # objective_per_row: no probe rows (the draw below is kept so the stream is the same).
        if rng.random() >= s.birdie_fraction and not s.objective_per_row:
            r = row(self._draw(rng)[1], s.seq_len)
            real = np.arange(s.seq_len) < int(np.nonzero(r["weights"])[0][-1]) + 1
            r["segment_ids"] = real.astype(np.int32)
            r["objective_ids"] = np.where(real, K, -1).astype(np.int32)
            return r
        if s.mixture:
            mixture = np.asarray(s.mixture, np.float64) / sum(s.mixture)
        else:
            mixture = birdie.uniform_mixture(objectives)

        def draw():
            # A configuration (objective_per_row: the row's) whose example from this text does
            # not fit T tokens is drawn again with another text.
            for _ in range(64):
                i = int(index) % K if s.objective_per_row else int(rng.choice(K, p=mixture))
                text = self._draw(rng)[1]["tokens"]
                try:
                    return objectives[i](text, int(rng.integers(2**31)),
                                         max_length=s.seq_len), i
                except ValueError:
                    continue
            raise ValueError(f"seq_len={s.seq_len} is not allowed with birdie_fraction="
                             f"{s.birdie_fraction}: no Birdie example fits in 64 draws; "
                             "allowed: a longer seq_len")
        return birdie.pack_row(draw, s.seq_len, with_prefix=True)


@functools.lru_cache(maxsize=None)
def birdie_objectives(seq_len: int) -> tuple:
    """The K configurations of Birdie's objective set under the compact settings (the CPU
    figures') whose shortest example fits `seq_len` tokens: what `mixture` weighs and the
    controller chooses among (a configuration that never fits has no validation rows)."""
    _check("seq_len", seq_len, "an integer >= 1", int(seq_len) == seq_len and seq_len >= 1)
    text = (np.arange(4 * int(seq_len)) % 95 + 32).astype(np.int32)    # printable bytes

    def fits(objective) -> bool:
        try:
            objective(text, 0, max_length=int(seq_len))
        except ValueError as e:
            if "is too small; the shortest example needs" in str(e):
                return False
            raise
        return True
    return tuple(o for o in birdie_data.objective_set("birdie", birdie.COMPACT_SETTINGS)
                 if fits(o))


def row(ex: dict, seq_len: int) -> dict:
    """An example as a training/eval row of T = seq_len: {inputs, targets, weights, prefix} [T]."""
    n = ex["tokens"].size
    _check("seq_len", seq_len, f">= {n - 1} (the example's tokens - 1)", n - 1 <= seq_len)
    window = np.zeros(seq_len + 1, np.int32)
    window[:n] = ex["tokens"]
    weights = np.zeros(seq_len, np.float32)
    weights[:n - 1] = ex["answer"][1:]
    prefix = np.zeros(seq_len, bool)
    prefix[:ex["prefix_len"]] = True
    return {"inputs": window[:-1], "targets": window[1:], "weights": weights, "prefix": prefix}
