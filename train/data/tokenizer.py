"""Byte-level tokenizer shared by every text task: ids 0..255 are UTF-8 bytes, 256..319 are specials.

The vocabulary, V = VOCAB_SIZE = 320:

| ids       | names                          | used by                                                  |
|-----------|--------------------------------|----------------------------------------------------------|
| 0..255    | the byte values                | all text                                                 |
| 256       | PAD                            | padding; the pipelines give it weight 0                  |
| 257       | BOS                            | optional document start                                  |
| 258       | EOS                            | document end (the packer joins documents with it)        |
| 259       | SEP                            | separates a prompt from its answer / context from query  |
| 260       | LANDMARK                       | landmark attention's block-end token (Mohtashami & Jaggi) |
| 261..292  | SENTINEL_0 .. SENTINEL_31      | span-corruption sentinels (Birdie / UL2 style objectives) |
| 293..308  | PARADIGM_0 .. PARADIGM_15      | objective / paradigm prefix tokens (Birdie)               |
| 309..319  | RESERVED_0 .. RESERVED_10      | not yet assigned                                         |

Nothing is downloaded: the tokenizer is the identity on UTF-8 bytes. `decode` replaces invalid
UTF-8 (a window cut inside a multi-byte character) with U+FFFD.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

NUM_BYTES = 256

PAD = 256
BOS = 257
EOS = 258
SEP = 259
LANDMARK = 260

NUM_SENTINELS = 32
FIRST_SENTINEL = 261
NUM_PARADIGMS = 16
FIRST_PARADIGM = FIRST_SENTINEL + NUM_SENTINELS  # 293
NUM_RESERVED = 11
FIRST_RESERVED = FIRST_PARADIGM + NUM_PARADIGMS  # 309

VOCAB_SIZE = FIRST_RESERVED + NUM_RESERVED  # 320


def _special_table() -> dict[str, int]:
    table = {"PAD": PAD, "BOS": BOS, "EOS": EOS, "SEP": SEP, "LANDMARK": LANDMARK}
    table.update({f"SENTINEL_{i}": FIRST_SENTINEL + i for i in range(NUM_SENTINELS)})
    table.update({f"PARADIGM_{i}": FIRST_PARADIGM + i for i in range(NUM_PARADIGMS)})
    table.update({f"RESERVED_{i}": FIRST_RESERVED + i for i in range(NUM_RESERVED)})
    return table


SPECIALS: dict[str, int] = _special_table()
SPECIAL_NAMES: dict[int, str] = {v: k for k, v in SPECIALS.items()}
assert len(SPECIALS) == VOCAB_SIZE - NUM_BYTES and max(SPECIAL_NAMES) == VOCAB_SIZE - 1


def special(name: str) -> int:
    """The id of the special token `name` (e.g. "EOS", "SENTINEL_3")."""
    try:
        return SPECIALS[name]
    except KeyError:
        raise ValueError(
            f"special token name={name!r} is unknown; allowed: PAD, BOS, EOS, SEP, LANDMARK, "
            f"SENTINEL_0..{NUM_SENTINELS - 1}, PARADIGM_0..{NUM_PARADIGMS - 1}, "
            f"RESERVED_0..{NUM_RESERVED - 1}"
        ) from None


def special_name(token_id: int) -> str:
    """The name of special id `token_id` (256 <= token_id < VOCAB_SIZE)."""
    if token_id not in SPECIAL_NAMES:
        raise ValueError(
            f"token_id={token_id} is not a special id; allowed: {NUM_BYTES}..{VOCAB_SIZE - 1}"
        )
    return SPECIAL_NAMES[token_id]


def sentinel(i: int) -> int:
    """The i-th span-corruption sentinel id, 0 <= i < NUM_SENTINELS."""
    if not 0 <= i < NUM_SENTINELS:
        raise ValueError(f"sentinel index i={i} out of range; allowed: 0..{NUM_SENTINELS - 1}")
    return FIRST_SENTINEL + i


def paradigm(i: int) -> int:
    """The i-th paradigm (objective prefix) id, 0 <= i < NUM_PARADIGMS."""
    if not 0 <= i < NUM_PARADIGMS:
        raise ValueError(f"paradigm index i={i} out of range; allowed: 0..{NUM_PARADIGMS - 1}")
    return FIRST_PARADIGM + i


def is_special(ids) -> np.ndarray:
    """Boolean mask, same shape as `ids`: True where an id is a special token (>= 256)."""
    return np.asarray(ids) >= NUM_BYTES


def encode(text: str | bytes, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """int32 [T]: the UTF-8 bytes of `text`, optionally wrapped in BOS ... EOS."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    if add_bos or add_eos:
        parts = ([np.array([BOS], np.int32)] if add_bos else []) + [ids]
        parts += [np.array([EOS], np.int32)] if add_eos else []
        ids = np.concatenate(parts)
    return ids


def decode(ids: Iterable[int] | np.ndarray, *, specials: str = "skip") -> str:
    """The text of ids [T]; specials="skip" drops special ids, "render" writes them as <NAME>."""
    if specials not in ("skip", "render"):
        raise ValueError(f"specials={specials!r} is not allowed; allowed: 'skip', 'render'")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = (ids < 0) | (ids >= VOCAB_SIZE)
    if bad.any():
        raise ValueError(
            f"ids contain {ids[bad][0]} which is outside the vocabulary; allowed: 0..{VOCAB_SIZE - 1}"
        )
    if specials == "skip":
        return ids[ids < NUM_BYTES].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    # Render: decode each run of bytes, put <NAME> between runs.
    out: list[str] = []
    start = 0
    for pos in np.flatnonzero(ids >= NUM_BYTES):
        out.append(ids[start:pos].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        out.append(f"<{SPECIAL_NAMES[int(ids[pos])]}>")
        start = pos + 1
    out.append(ids[start:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
    return "".join(out)


def encode_batch(
    texts: Sequence[str | bytes],
    *,
    length: int | None = None,
    add_bos: bool = False,
    add_eos: bool = False,
    pad_id: int = PAD,
) -> np.ndarray:
    """int32 [B, T]: each text encoded, right-padded with `pad_id` (and cut) to T.

    T is `length` when given (longer texts are truncated), else the longest encoding.
    """
    rows = [encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
    if length is None:
        length = max((len(r) for r in rows), default=0)
    if length < 0:
        raise ValueError(f"length={length} must be >= 0")
    out = np.full((len(rows), length), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, : len(r)] = r
    return out


def decode_batch(ids_BxT, *, specials: str = "skip") -> list[str]:
    """The texts of a batch of ids [B, T] (PAD is a special, so padding is dropped by 'skip')."""
    ids_BxT = np.asarray(ids_BxT)
    if ids_BxT.ndim != 2:
        raise ValueError(f"ids_BxT has shape {ids_BxT.shape}; allowed: rank 2 [B, T]")
    return [decode(row, specials=specials) for row in ids_BxT]
