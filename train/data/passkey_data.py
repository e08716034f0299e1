"""Passkey retrieval prompts (Mohtashami & Jaggi 2023, Sec. 4.2) and a passkey/prose training mixture.

The prompt is the paper's (official `run_test.py`): an optional task line, the filler

    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

repeated (joined by spaces) and cut at a character count, the key line "The pass key is K.
Remember it. K is the pass key." inserted at a random character depth of the filler, and the
question "What is the pass key? The pass key is"; the lines are joined with "\\n". The answer is
" K". Lengths are in bytes = byte-tokenizer tokens (train/data/tokenizer.py).

`PasskeySource(spec, split)` is a random-access source of training rows
{inputs, targets, weights} [T] (kind "examples" in train/data/pipeline.py, dataset name "passkey"):
with probability `passkey_fraction` a row starts with a passkey prompt of random length ending in
its answer (then EOS and prose fill the rest of the window), otherwise it is a window of the
local prose corpus (train/data/text_corpus.py; the split decides which documents). Row i of a split
depends only on (data_seed, split, i).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from train.data import text_corpus
from train.data import tokenizer as tok

SPLITS = ("train", "validation")

TASK_LINE = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
             "memorize them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def fixed_length(num_digits: int, *, intro: bool = False) -> int:
    """Bytes of a prompt with no filler (task line, key line, question and the joining newlines)."""
    # (prefix filler) \n key line \n (suffix filler) \n question, as the official "\n".join
    n = 3 + len(key_line("0" * num_digits)) + len(QUESTION)
    return n + (len(TASK_LINE) + 1 if intro else 0)


def make_prompt(length: int, key: int, depth: float, *, num_digits: int = 5,
                intro: bool = False) -> tuple[str, str]:
    """(prompt, answer) with len(prompt) == length bytes; the key line sits after
    round(depth · filler bytes) filler characters (depth in [0, 1]); answer is " K"."""
    k = str(int(key))
    if len(k) != num_digits:
        raise ValueError(f"key={key} must have num_digits={num_digits} digits")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    n_filler = length - fixed_length(num_digits, intro=intro)
    if n_filler < 0:
        raise ValueError(f"length={length} is below the shortest prompt "
                         f"({fixed_length(num_digits, intro=intro)} bytes with intro={intro})")
    reps = n_filler // (len(FILLER) + 1) + 2
    garbage = " ".join([FILLER] * reps)
    n_pre = int(round(depth * n_filler))
    # Official: prefix = garbage_inf[:n_prefix], suffix = garbage_inf[:n - n_prefix].
    lines = ([TASK_LINE] if intro else []) + [garbage[:n_pre], key_line(k), garbage[:n_filler - n_pre],
                                              QUESTION]
    prompt = "\n".join(lines)
    assert len(prompt) == length, (len(prompt), length)
    return prompt, " " + k


def random_key(rng: np.random.Generator, num_digits: int) -> int:
    return int(rng.integers(10 ** (num_digits - 1), 10 ** num_digits))


@functools.lru_cache(maxsize=4)
def corpus_tokens(split: str, validation_percent: int) -> tuple[np.ndarray, ...]:
    """The prose corpus of `split` as one token array per document (EOS-terminated)."""
    return tuple(tok.encode(r["text"], add_eos=True)
                 for r in text_corpus.documents(split, validation_percent))


def prose_tokens(rng: np.random.Generator, n: int, split: str,
                 validation_percent: int) -> np.ndarray:
    """n tokens of prose: a random document from a random offset, continued by random documents."""
    docs = corpus_tokens(split, validation_percent)
    doc = docs[int(rng.integers(len(docs)))]
    parts = [doc[int(rng.integers(max(doc.size - n, 0) + 1)):]]
    got = parts[0].size
    while got < n:
        doc = docs[int(rng.integers(len(docs)))]
        parts.append(doc)
        got += doc.size
    return np.concatenate(parts)[:n].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PasskeySpec:
    seq_len: int                      # T: tokens per row (the window is T + 1)
    passkey_fraction: float = 0.5     # probability that a row is a passkey prompt (else prose)
    num_digits: int = 5               # digits of the key (keys uniform in [10^(d-1), 10^d))
    intro: bool = False               # start prompts with the paper's task line
    min_length: int = 0               # shortest prompt in bytes (0: the shortest possible)
    answer_weight: float = 1.0        # loss weight of the answer digits (other tokens weigh 1)
    validation_percent: int = 10      # prose documents held out for "validation"
    num_train: int = 1_000_000        # rows per split (generated when read)
    num_validation: int = 512
    seed: int = 0                     # content seed

    def __post_init__(self):
        if not 0.0 <= self.passkey_fraction <= 1.0:
            raise ValueError(f"passkey_fraction={self.passkey_fraction} must be in [0, 1]")
        if not isinstance(self.num_digits, int) or not 1 <= self.num_digits <= 9:
            raise ValueError(f"num_digits={self.num_digits!r} must be an integer in 1..9")
        shortest = fixed_length(self.num_digits, intro=self.intro) + 1 + self.num_digits
        if self.passkey_fraction > 0 and self.seq_len + 1 < shortest:
            raise ValueError(f"seq_len={self.seq_len} cannot hold a passkey prompt and its answer "
                             f"({shortest} tokens with intro={self.intro}); allowed: "
                             f"seq_len >= {shortest - 1}")
        if self.answer_weight < 0:
            raise ValueError(f"answer_weight={self.answer_weight} must be >= 0")

    def num_examples(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; allowed: {SPLITS}")
        return self.num_train if split == "train" else self.num_validation


class PasskeySource:
    """Random-access rows {inputs, targets, weights} [T] of the passkey/prose mixture (picklable)."""

    def __init__(self, spec: PasskeySpec, split: str):
        self._spec = spec
        self._split = split
        self._len = spec.num_examples(split)

    def __len__(self) -> int:
        return self._len

    def passkey_row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(window [T + 1], weights of its targets [T]): a prompt + answer, EOS, then prose."""
        s = self._spec
        T = s.seq_len
        hi = T + 1 - (1 + s.num_digits)                   # the longest prompt that fits
        lo = max(fixed_length(s.num_digits, intro=s.intro), min(s.min_length, hi))
        length = int(rng.integers(lo, hi + 1))
        key = random_key(rng, s.num_digits)
        prompt, answer = make_prompt(length, key, float(rng.random()), num_digits=s.num_digits,
                                     intro=s.intro)
        ids = tok.encode(prompt + answer)
        rest = T + 1 - ids.size
        fill = (np.concatenate([[tok.EOS], prose_tokens(rng, rest - 1, self._split,
                                                        s.validation_percent)])
                if rest > 0 else np.zeros(0, np.int32))
        window = np.concatenate([ids, fill]).astype(np.int32)
        weights = np.ones(T, np.float32)
        # Targets t = window[t + 1]; the answer digits are window[len(prompt) + 1 :].
        answer_t = np.arange(length + 1, length + 1 + s.num_digits) - 1
        weights[answer_t] = s.answer_weight
        return window, weights

    def __getitem__(self, index: int) -> dict:
        s = self._spec
        split_id = SPLITS.index(self._split)
        rng = np.random.default_rng([s.seed, split_id, int(index)])
        if rng.random() < s.passkey_fraction:
            window, weights = self.passkey_row(rng)
        else:
            window = prose_tokens(rng, s.seq_len + 1, self._split, s.validation_percent)
            weights = np.ones(s.seq_len, np.float32)
        return {"inputs": window[:-1], "targets": window[1:], "weights": weights}
