"""Phone-book lookup examples (Birdie, Blouir et al. 2024, Fig. 1; after Jelassi et al. 2024).

    What are the phone numbers for A, B, and C? Find them in the phonebook below.
    Phonebook:
    Name Surname : XXX-XXX-XXXX
    ...
    What are the phone numbers for A, B, and C?
→ target "n_A, n_B, n_C" (query order). The book is deterministic per seed, with unique names and
unique numbers. Training data (`train/data/birdie_data.py`, the Birdie figures) and the evaluator
(`eval/phonebook.py`) draw their examples here.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

FIRST_NAMES = (
    "Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jamal",
    "Keiko", "Liam", "Maya", "Nikolai", "Olga", "Pablo", "Quinn", "Rosa", "Sanjay", "Tara",
    "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zara", "Amara", "Boris", "Carmen", "Dev",
    "Esther", "Felix", "Gita", "Hugo", "Ivy", "Jonas", "Kira", "Lucas", "Mina", "Noah",
)
LAST_NAMES = (
    "Abbott", "Bauer", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito",
    "Jensen", "Kowalski", "Larsen", "Moreau", "Nakamura", "Okafor", "Petrov", "Quispe", "Rossi",
    "Schmidt", "Tanaka", "Usman", "Varga", "Weber", "Xu", "Yilmaz", "Zhang", "Alvarez", "Becker",
    "Chen", "Dalton", "Evans", "Ferreira", "Gupta", "Horvat", "Ivanova", "Johansson", "Kim",
    "Lopez", "Mensah", "Novak",
)
MAX_ENTRIES = len(FIRST_NAMES) * len(LAST_NAMES)
DIGITS_PER_NUMBER = 10


@dataclasses.dataclass(frozen=True)
class PhonebookExample:
    prompt: str
    target: str
    book: tuple        # ((name, number), ...) in the order listed
    queried: tuple     # names asked, in query order


def make_book(rng: np.random.Generator, entries: int) -> list[tuple[str, str]]:
    """`entries` (name, number) pairs: unique names (first × last), unique numbers."""
    if not 1 <= entries <= MAX_ENTRIES:
        raise ValueError(f"entries={entries} is not allowed; use 1..{MAX_ENTRIES}")
    picks = rng.choice(MAX_ENTRIES, entries, replace=False)
    names = [f"{FIRST_NAMES[i // len(LAST_NAMES)]} {LAST_NAMES[i % len(LAST_NAMES)]}"
             for i in picks]
    numbers: list[str] = []
    seen = set()
    while len(numbers) < entries:
        d = "".join(str(x) for x in rng.integers(0, 10, DIGITS_PER_NUMBER))
        if d not in seen:
            seen.add(d)
            numbers.append(f"{d[:3]}-{d[3:6]}-{d[6:]}")
    return list(zip(names, numbers))


def _name_list(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"{names[0]} and {names[1]}"
    return ", ".join(names[:-1]) + f", and {names[-1]}"


def make_example(seed: int, entries: int, queries: int, index: int = 0) -> PhonebookExample:
    """Example `index` of book family `seed`: deterministic in (seed, entries, queries, index)."""
    if not 1 <= queries <= entries:
        raise ValueError(f"queries={queries} is not allowed with entries={entries}; "
                         f"use 1..{entries}")
    rng = np.random.default_rng([seed, entries, queries, index])
    book = make_book(rng, entries)
    asked = [book[i] for i in rng.choice(entries, queries, replace=False)]
    question = f"What are the phone numbers for {_name_list([n for n, _ in asked])}?"
    lines = "".join(f"{n} : {p}\n" for n, p in book)
    prompt = (f"{question} Find them in the phonebook below.\nPhonebook:\n{lines}"
              f"{question}\n")
    target = ", ".join(p for _, p in asked)
    return PhonebookExample(prompt, target, tuple(book), tuple(n for n, _ in asked))


def max_example_length(entries: int, queries: int) -> int:
    """Tokens of the longest lookup example any book of `entries` names with `queries` asked can
    make, laid out as training lays it out (`birdie.make_example`: prompt, then the numbers and
    EOS): every name as long as the longest first name + the longest last name."""
    if not 1 <= queries <= entries <= MAX_ENTRIES:
        raise ValueError(f"entries={entries}, queries={queries} are not allowed; use "
                         f"1 <= queries <= entries <= {MAX_ENTRIES}")
    name = "x" * (max(map(len, FIRST_NAMES)) + 1 + max(map(len, LAST_NAMES)))
    number = DIGITS_PER_NUMBER + 2                      # XXX-XXX-XXXX
    question = f"What are the phone numbers for {_name_list([name] * queries)}?"
    prompt = (len(f"{question} Find them in the phonebook below.\nPhonebook:\n")
              + entries * len(f"{name} : {'0' * number}\n") + len(question) + 1)
    return prompt + queries * number + 2 * (queries - 1) + 1   # ", " between numbers, EOS
