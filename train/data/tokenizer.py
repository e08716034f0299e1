"""Tokenizers: the byte tokenizer every synthetic task is defined on, and one interface over it,
Hugging Face `tokenizers` (tokenizer.json: GPT-2 BPE, LLaMA-3) and SentencePiece (.model: T5,
LLaMA-2) for text pipelines and evaluators.

    tok = load_tokenizer("byte" | "path/to/tokenizer.json" | "path/to/folder" | "x.model")
    tok = tok.add_special_tokens(["PAD", "LANDMARK"])   # appended after the existing ids
    tok.encode(text, add_eos=True) -> int32 [T];  tok.decode(ids) -> str
    tok.vocab_size (the embedding's rows);  tok.special("EOS");  tok.spec -> "folder+PAD,LANDMARK"

`spec` is what a config stores (data.tokenizer in train/data/pipeline.py); `load_tokenizer(spec)`
builds the same tokenizer back. `tokenizers` and `sentencepiece` are imported only when such a
tokenizer is loaded. A model whose vocabulary grew with appended specials gets new embedding rows
from models/vocab.py: resize_embeddings (the mean of the old rows).

The byte tokenizer: ids 0..255 are UTF-8 bytes, 256..319 are specials (the module-level functions
below; `ByteTokenizer` is the same through the interface).

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

import abc
import copy
import functools
import importlib
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

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


# ---------------------------------------------------------------------------------------------
# One interface over the byte tokenizer, Hugging Face `tokenizers` and SentencePiece.
# ---------------------------------------------------------------------------------------------
# The specials add_special_tokens may append: the byte vocabulary's names.
_ADDABLE_HELP = ("PAD, BOS, EOS, SEP, LANDMARK, SENTINEL_0..31, PARADIGM_0..15, "
                 "RESERVED_0..10")
# "PATH+NAME,NAME": specials appended after the tokenizer's own ids (see Tokenizer.spec).
_SPEC_SUFFIX = re.compile(r"(.+)\+([A-Z][A-Z0-9_]*(?:,[A-Z][A-Z0-9_]*)*)")
_SENTINEL_PIECE = re.compile(r"<extra_id_(\d+)>")   # T5's span-corruption sentinels


class Tokenizer(abc.ABC):
    """text <-> int32 ids over a vocabulary of `vocab_size` ids, with named specials.

    The base vocabulary is the tokenizer's own (bytes + specials, a tokenizer.json, a
    SentencePiece model); `add_special_tokens` appends named specials after it, which encode
    never produces from text (the pipelines insert them) and decode drops (skip_special) or
    writes as "<NAME>". `spec` names the whole thing for a run's config: `load_tokenizer(spec)`
    builds it back.

    Named specials: PAD, BOS, EOS, SEP, LANDMARK, SENTINEL_i, PARADIGM_i, RESERVED_i (the byte
    vocabulary's names), UNK; a pretrained tokenizer has those its files name (GPT-2: BOS = EOS =
    <|endoftext|>; T5: PAD, EOS, UNK, SENTINEL_i = <extra_id_i>).
    """

    def __init__(self, base_spec: str, base_vocab: int, base_specials: Mapping[str, int]):
        self._base_spec = base_spec
        self._base_vocab = int(base_vocab)
        self._specials = dict(base_specials)
        self._added: tuple[str, ...] = ()

    # -- what a subclass provides ---------------------------------------------------------------
    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short human-readable name ("byte", "hf:gpt2", "sentencepiece:spiece")."""

    @abc.abstractmethod
    def _encode(self, text: str | bytes) -> np.ndarray:
        """int32 [T]: the base tokenizer's ids of `text`, no specials added."""

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special: bool, added: Mapping[int, str]) -> str:
        """The text of ids: base ids, and (when not skip_special) appended specials, which
        `added` maps to the text they are written as."""

    # -- the interface ----------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """The config string naming this tokenizer: "byte", a path, and "+NAME,..." for the
        specials appended by add_special_tokens ("/models/gpt2+PAD,LANDMARK")."""
        return self._base_spec + ("+" + ",".join(self._added) if self._added else "")

    @property
    def vocab_size(self) -> int:
        """V: the rows the model's embedding needs (every id this tokenizer uses is < V)."""
        return self._base_vocab + len(self._added)

    @property
    def specials(self) -> dict[str, int]:
        """{name: id} of every named special this tokenizer has, appended ones included."""
        added = {n: self._base_vocab + i for i, n in enumerate(self._added)}
        return {**self._specials, **added}

    def special(self, name: str) -> int:
        """The id of the named special `name` ("EOS", "LANDMARK", ...)."""
        specials = self.specials
        if name not in specials:
            raise ValueError(f"special token name={name!r} is not in tokenizer {self.spec!r}; "
                             f"allowed: {sorted(specials)} (add_special_tokens appends "
                             f"{_ADDABLE_HELP})")
        return specials[name]

    @property
    def bos_id(self) -> int | None:
        return self.specials.get("BOS")

    @property
    def eos_id(self) -> int | None:
        return self.specials.get("EOS")

    @property
    def pad_id(self) -> int | None:
        return self.specials.get("PAD")

    # What the original tokenizer's `encode(text)` (transformers: add_special_tokens=True) adds:
    # GPT-2 nothing, LLaMA BOS, T5 EOS.
    default_add_bos: bool = False
    default_add_eos: bool = False

    def encode(self, text: str | bytes, *, add_bos: bool = False,
               add_eos: bool = False) -> np.ndarray:
        """int32 [T]: the ids of `text` (the tokenizer's own specials only if asked for)."""
        ids = self._encode(text)
        if add_bos or add_eos:
            parts = ([np.array([self._need("BOS")], np.int32)] if add_bos else []) + [ids]
            parts += [np.array([self._need("EOS")], np.int32)] if add_eos else []
            ids = np.concatenate(parts)
        return ids

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special: bool = True) -> str:
        """The text of ids [T]: specials dropped (skip_special) or written as the tokenizer's
        own decoder writes them (appended ones as "<NAME>")."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"ids contain {ids[bad][0]} which is outside the vocabulary of "
                             f"{self.spec!r}; allowed: 0..{self.vocab_size - 1}")
        if skip_special:
            return self._decode(ids[ids < self._base_vocab].tolist(), True, {})
        added = {self._base_vocab + i: f"<{n}>" for i, n in enumerate(self._added)}
        return self._decode(ids.tolist(), False, added)

    def add_special_tokens(self, names: Sequence[str]) -> Tokenizer:
        """A tokenizer with the named specials appended after the existing ids, in order; names
        it already has are skipped (a byte tokenizer has them all)."""
        if isinstance(names, str):
            raise ValueError(f"names={names!r} is not allowed; allowed: a sequence of names")
        new = []
        for n in names:
            if n not in SPECIALS:
                raise ValueError(f"special token name={n!r} cannot be added; allowed: "
                                 f"{_ADDABLE_HELP}")
            if n not in self.specials and n not in new:
                new.append(n)
        if not new:
            return self
        out = copy.copy(self)
        out._added = self._added + tuple(new)
        return out

    def _need(self, name: str) -> int:
        i = self.specials.get(name)
        if i is None:
            fix = self.spec + ("," if self._added else "+") + name
            raise ValueError(f"tokenizer {self.spec!r} has no {name} token; allowed: a tokenizer "
                             f"with one, or append it: {fix!r}")
        return i

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """The byte tokenizer above (V = 320, every named special present) through the interface."""

    name = "byte"

    def __init__(self):
        super().__init__("byte", VOCAB_SIZE, SPECIALS)

    def _encode(self, text):
        return encode(text)

    def _decode(self, ids, skip_special, added):
        return decode(ids, specials="skip" if skip_special else "render")


def _as_text(text: str | bytes) -> str:
    return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


_MISSING = object()


def _token_setting(configs: Sequence[dict], key: str):
    """The token string a transformers config gives for `key` ("eos_token"): a str, None (set to
    null), or _MISSING; the value may be an AddedToken dict {"content": ...}."""
    for cfg in configs:
        if key in cfg:
            v = cfg[key]
            return v.get("content") if isinstance(v, dict) else v
    return _MISSING


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the {module!r} package is needed for this tokenizer ({e}); "
                          f"install it: pip install {module}") from None


# Token strings of well-known specials, tried in order when the folder has no transformers
# config naming them (GPT-2, LLaMA-2/T5 SentencePiece, LLaMA-3, BERT-style).
_WELL_KNOWN = {
    "BOS": ("<|begin_of_text|>", "<s>", "<|endoftext|>"),
    "EOS": ("<|end_of_text|>", "</s>", "<|endoftext|>"),
    "PAD": ("<pad>", "[PAD]", "<|pad|>"),
    "UNK": ("<unk>", "[UNK]"),
    "SEP": ("[SEP]",),
}
_CONFIG_KEYS = {"BOS": "bos_token", "EOS": "eos_token", "PAD": "pad_token", "UNK": "unk_token",
                "SEP": "sep_token"}


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (applied when a tokenizer's config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (GPT-2 BPE, LLaMA-3, ...) through the `tokenizers` package.

    `path`: the tokenizer.json file or the folder `save_pretrained` wrote. Named specials come
    from the folder's tokenizer_config.json / special_tokens_map.json (bos_token, eos_token,
    pad_token, unk_token, sep_token) where they name them, else from well-known token strings
    (<|endoftext|>, <s>, </s>, <|begin_of_text|>, ...). encode leaves out the tokenizer's
    post-processor specials (transformers' add_special_tokens=False) unless add_bos/add_eos ask;
    decode is transformers' `decode(ids, skip_special_tokens=...)` for a fast tokenizer (the
    config's clean_up_tokenization_spaces applied, default False).
    """

    def __init__(self, path: str | os.PathLike):
        p = pathlib.Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        tokenizers = _import("tokenizers")
        self._tok = tokenizers.Tokenizer.from_file(str(file))
        self._file = file
        vocab = self._tok.get_vocab(with_added_tokens=True)
        configs = [_read_json(file.parent / "tokenizer_config.json"),
                   _read_json(file.parent / "special_tokens_map.json")]
        specials = {}
        for name, key in _CONFIG_KEYS.items():
            token = _token_setting(configs, key)
            if token is _MISSING:
                token = next((t for t in _WELL_KNOWN[name] if t in vocab), None)
            if token is not None and token in vocab:
                specials[name] = vocab[token]
        for token, i in vocab.items():
            m = _SENTINEL_PIECE.fullmatch(token)
            if m:
                specials[f"SENTINEL_{int(m.group(1))}"] = i
        self._clean_up = bool(configs[0].get("clean_up_tokenization_spaces", False))
        super().__init__(str(path), max(vocab.values()) + 1, specials)
        # What its post-processor adds (transformers' default add_special_tokens=True).
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        bos, eos = self._specials.get("BOS"), self._specials.get("EOS")
        self.default_add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
        self.default_add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]

    @property
    def name(self) -> str:
        f = self._file
        return f"hf:{f.parent.name if f.name == 'tokenizer.json' else f.stem}"

    def _encode(self, text):
        return np.asarray(self._tok.encode(_as_text(text), add_special_tokens=False).ids,
                          dtype=np.int32)

    def _decode(self, ids, skip_special, added):
        # Appended specials are not in the tokenizer.json: the runs between them are decoded
        # apart (exact for byte-level BPE, whose decoding is concatenation).
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in added:
                text = self._tok.decode(run, skip_special_tokens=skip_special) if run else ""
                out += [_clean_up_spaces(text) if self._clean_up else text, added.get(i, "")]
                run = []
            else:
                run.append(i)
        return "".join(out)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (T5's spiece.model, LLaMA-2's tokenizer.model) through the
    `sentencepiece` package.

    `path`: the .model file or a folder holding spiece.model or tokenizer.model (and possibly
    transformers' tokenizer_config.json). Ids are SentencePiece's: PAD, BOS, EOS, UNK from
    pad_id()/bos_id()/eos_id()/unk_id() (a config's token names fill those it lacks, through
    piece_to_id); T5's `extra_ids` sentinels (<extra_id_i> = pieces + extra_ids - 1 - i) follow
    the pieces, as in transformers' T5Tokenizer. T5 convention (a T5 config, or a model without
    BOS): no BOS, EOS appended by add_eos (and by default in the original tokenizer); LLaMA
    convention otherwise: BOS by default. decode follows T5Tokenizer's (specials dropped when
    skip_special, else written next to the text; T5 strips the result).
    """

    def __init__(self, path: str | os.PathLike):
        p = pathlib.Path(path)
        file = p
        if p.is_dir():
            file = next((p / n for n in ("spiece.model", "tokenizer.model") if (p / n).is_file()),
                        p / "spiece.model")
        spm = _import("sentencepiece")
        self._sp = spm.SentencePieceProcessor(model_file=str(file))
        self._file = file
        sp = self._sp
        pieces = sp.get_piece_size()
        configs = [_read_json(file.parent / "tokenizer_config.json"),
                   _read_json(file.parent / "special_tokens_map.json")]
        cfg = configs[0]
        specials = {n: i for n, i in (("PAD", sp.pad_id()), ("BOS", sp.bos_id()),
                                      ("EOS", sp.eos_id()), ("UNK", sp.unk_id())) if i >= 0}
        for name in ("PAD", "BOS", "EOS"):
            token = _token_setting(configs, _CONFIG_KEYS[name])
            if name not in specials and isinstance(token, str):
                i = sp.piece_to_id(token)
                if i != sp.unk_id() or token == sp.id_to_piece(sp.unk_id()):
                    specials[name] = i
        extra = int(cfg.get("extra_ids", 0) or 0)
        vocab = pieces + extra
        specials.update({f"SENTINEL_{i}": pieces + extra - 1 - i for i in range(extra)})
        for i, tok_ in (cfg.get("added_tokens_decoder") or {}).items():   # explicit added ids
            content = tok_.get("content") if isinstance(tok_, dict) else tok_
            m = _SENTINEL_PIECE.fullmatch(str(content))
            if m:
                specials[f"SENTINEL_{int(m.group(1))}"] = int(i)
            vocab = max(vocab, int(i) + 1)
        self._pieces = pieces
        self._t5 = str(cfg.get("tokenizer_class", "")).startswith("T5") or (
            not cfg and sp.bos_id() < 0)
        super().__init__(str(path), vocab, specials)
        self._special_ids = {i: n for n, i in specials.items()}
        self.default_add_bos = bool(cfg.get("add_bos_token", not self._t5 and "BOS" in specials))
        self.default_add_eos = bool(cfg.get("add_eos_token", self._t5))
        self._clean_up = bool(cfg.get("clean_up_tokenization_spaces", False))

    @property
    def name(self) -> str:
        return f"sentencepiece:{self._file.stem}"

    def _piece(self, i: int) -> str:
        if i < self._pieces:
            return self._sp.id_to_piece(i)
        name = self._special_ids.get(i, "")
        return f"<extra_id_{name.removeprefix('SENTINEL_')}>" if name else ""

    def _encode(self, text):
        return np.asarray(self._sp.encode(_as_text(text)), dtype=np.int32)

    def _decode(self, ids, skip_special, added):
        # transformers' slow-tokenizer decode: ids outside the model file (T5's extra ids, an
        # appended special) split the text; each stretch between them is decoded as
        # T5Tokenizer.convert_tokens_to_string does (`_decode_pieces`); the parts are joined
        # with spaces (spaces_between_special_tokens).
        parts, run = [], []
        for i in ids:
            if skip_special and (i in self._special_ids or i in added):
                continue
            if i < self._pieces:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_pieces(run))
                run = []
            parts.append(added[i] if i in added else self._piece(i))
        if run or not parts:
            parts.append(self._decode_pieces(run))
        out = " ".join(p for p in parts if p)
        return _clean_up_spaces(out) if self._clean_up else out

    def _decode_pieces(self, ids):
        # T5Tokenizer.convert_tokens_to_string: pieces between specials decoded together; a
        # special written as its token, after a space unless another special precedes it.
        out, run, prev_special = "", [], False
        for i in ids:
            if i in self._special_ids:
                out += ("" if prev_special else " ") + self._sp.decode(run) + self._piece(i)
                run, prev_special = [], True
            else:
                run.append(i)
                prev_special = False
        out += self._sp.decode(run)
        return out.strip() if self._t5 else out


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer a config names: "byte"; a tokenizer.json file (`HFTokenizer`), a
    SentencePiece .model file (`SentencePieceTokenizer`), or a folder holding tokenizer.json
    (preferred, as transformers' AutoTokenizer) or spiece.model / tokenizer.model; each may end
    in "+NAME,NAME" to append those specials (`Tokenizer.spec`)."""
    allowed = ("allowed: 'byte', a tokenizer.json or SentencePiece .model file, or a folder "
               "holding tokenizer.json, spiece.model or tokenizer.model, optionally followed by "
               "'+NAME,...' (specials to append)")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer spec={spec!r} is not allowed; {allowed}")
    names: list[str] = []
    m = _SPEC_SUFFIX.fullmatch(spec)
    base = spec
    if m and not os.path.exists(spec):
        base, names = m.group(1), m.group(2).split(",")
    if base == "byte":
        tok: Tokenizer = ByteTokenizer()
    else:
        p = pathlib.Path(base).expanduser()
        if p.is_file() and p.suffix == ".json":
            tok = HFTokenizer(base)
        elif p.is_file() and p.suffix == ".model":
            tok = SentencePieceTokenizer(base)
        elif p.is_dir() and (p / "tokenizer.json").is_file():
            tok = HFTokenizer(base)
        elif p.is_dir() and any((p / n).is_file() for n in ("spiece.model", "tokenizer.model")):
            tok = SentencePieceTokenizer(base)
        else:
            what = ("is a folder without one" if p.is_dir() else
                    "is a file of another kind" if p.exists() else "does not exist")
            raise ValueError(f"tokenizer spec={spec!r} is not allowed: {str(p)!r} {what}; "
                             f"{allowed}")
    return tok.add_special_tokens(names) if names else tok


@functools.lru_cache(maxsize=8)
def cached_tokenizer(spec: str) -> Tokenizer:
    """`load_tokenizer(spec)`, built once per process: what the data sources share."""
    return load_tokenizer(spec)
