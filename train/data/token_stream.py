"""The official `lm_benchmark` training layout (Mohtashami & Jaggi 2023; epfml/landmark-attention):
one token stream per split, training windows at uniformly random offsets of it.

    stream = token_stream(records, tokenizer, add_bos=False, cache_dir="")   # int32 [N]
    source = StreamWindows(stream, seq_len=T, split="train", eos_id=..., mask_after_eos=True,
                           mem_freq=50)

What the official code does, and where:
- `lm_benchmark/data/pg19/prepare.py` (`_read_directory`): every document of a split tokenized,
  EOS (GPT-2's `<|endoftext|>`) after each, all concatenated into one stream (`train.bin`).
- `data/utils.py` (`add_mem_tokens`, via `data/pg19.py: prepare_pg19_data`): a landmark after
  every `mem_freq`-th token *of the stream* (stream index t with t % mem_freq == mem_freq - 1),
  so a window's landmarks sit where the stream puts them, not at the start of each row.
- `lm_benchmark/optim/utils.py` (`get_batch`): each row a window at a uniformly random offset
  (`torch.randint(len(data) - seq_length - 1)`), targets the next tokens (a token followed by a
  landmark predicts the token after it), target -1 (ignored) where the *input* is a landmark or
  EOS: the last token of a document does not predict the first token of the next one.

Here the stream holds no landmarks: a row is T raw tokens at a random offset o of the stream plus
`stream_phase` [T] = (o + t) mod mem_freq, and the landmark objective (train/objectives/landmark.py)
inserts a landmark after every input whose phase is mem_freq - 1, i.e. exactly where the official
stream has them. Differences from the official windows: a window holds T raw tokens (the official
512 counts the landmarks among them) and never starts at a landmark.

Record i of a split is a fixed function of (split, i) (its offset drawn from a NumPy generator
seeded with both), so the pipeline's shuffle, sharding and checkpointing work unchanged; an epoch
is N // T windows.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from train.data import tokenizer as tok_lib

WINDOWS = ("packed", "random")


def token_stream(records: Sequence[Mapping[str, Any]], tokenizer: tok_lib.Tokenizer, *,
                 add_bos: bool = False, cache_dir: str = "", key: str = "") -> np.ndarray:
    """ids [N] (uint16 when the vocabulary fits, as the official .bin files; else int32): every
    record's "text" in source order, tokenized, EOS after each (BOS before with add_bos),
    concatenated (official prepare.py). With `cache_dir`, the stream is written once to
    cache_dir/stream-<hash of key and tokenizer>.npy (key: what identifies the split) and read
    memory-mapped (grain workers reopen the file instead of copying it); "" keeps it in memory.
    One process tokenizes the whole split: build it once before a multi-host run (or on a disk
    the hosts share)."""
    path = None
    if cache_dir:
        digest = hashlib.sha256(f"{key}|{tokenizer.spec}|bos={add_bos}".encode()).hexdigest()[:16]
        path = pathlib.Path(os.path.expanduser(cache_dir)) / f"stream-{digest}.npy"
        if path.exists():
            return np.load(path, mmap_mode="r")
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.int32
    parts = [np.asarray(tokenizer.encode(records[i]["text"], add_bos=add_bos, add_eos=True),
                        dtype) for i in range(len(records))]
    stream = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    if path is None:
        return stream
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, stream)
    os.replace(tmp, path)          # atomic: processes building the same stream agree
    return np.load(path, mmap_mode="r")


class StreamWindows:
    """Random-access source: record i = {inputs, targets, weights [, stream_phase]} [T] of the
    window at offset o_i (uniform in [0, N - T - 1], from a generator seeded with (split, i)).

    weights: 1, or 0 where the input is EOS and mask_after_eos (official get_batch).
    stream_phase (mem_freq > 0): int32 [T], (o_i + t) mod mem_freq; a landmark follows input t
    where it is mem_freq - 1 (official add_mem_tokens).
    """

    def __init__(self, stream: np.ndarray, *, seq_len: int, split: str, eos_id: int,
                 mask_after_eos: bool, mem_freq: int = 0):
        if not isinstance(mem_freq, int) or mem_freq < 0:
            raise ValueError(f"data.stream_mem_freq={mem_freq!r} must be an integer >= 0 "
                             "(0: rows carry no stream_phase)")
        if stream.shape[0] < seq_len + 2:
            raise ValueError(f"data.windows='random' needs a stream longer than seq_len + 1 = "
                             f"{seq_len + 1} tokens; split {split!r} has {stream.shape[0]}")
        self._stream, self._T, self._eos = stream, seq_len, eos_id
        self._mask, self._F = bool(mask_after_eos), mem_freq
        self._salt = zlib.crc32(split.encode())

    def __len__(self) -> int:
        return max(1, (self._stream.shape[0] - 1) // self._T)

    def offset(self, index: int) -> int:
        rng = np.random.default_rng([int(index), self._salt])
        return int(rng.integers(0, self._stream.shape[0] - self._T - 1))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        o, T = self.offset(index), self._T
        window = np.asarray(self._stream[o:o + T + 1], np.int32)
        inputs, targets = window[:-1], window[1:]
        weights = np.ones(T, np.float32)
        if self._mask:
            weights[inputs == self._eos] = 0.0
        out = {"inputs": inputs, "targets": targets, "weights": weights}
        if self._F:
            out["stream_phase"] = ((o + np.arange(T)) % self._F).astype(np.int32)
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self._stream, np.memmap) and self._stream.filename:
            state["_stream"] = str(self._stream.filename)    # reopened, not copied
        return state

    def __setstate__(self, state):
        if isinstance(state["_stream"], str):
            state["_stream"] = np.load(state["_stream"], mmap_mode="r")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"StreamWindows(tokens={self._stream.shape[0]}, seq_len={self._T}, "
                f"mem_freq={self._F}, mask_after_eos={self._mask})")
