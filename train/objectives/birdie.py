"""Birdie's objectives, the UL2 and next-token baselines, packing, the reward, the trainer loss.

Blouir et al. 2024, "Birdie: Advancing State Space Models with Reward-Driven Objectives and
Curricula". Every objective is a pure function of (tokens, key) → `Example(inputs, labels,
prefix)`: it builds a (prompt, target) pair, the prompt starting with the objective's paradigm
token (an `Objective` may move it to the prompt's end: `ObjectiveSettings.paradigm_placement`),
and `make_example` lays it out as

    inputs  = prompt ++ [START_GENERATING] ++ target[:-1]
    labels  = [IGNORE] * len(prompt) ++ target          (labels[t] is the token after inputs[t])
    prefix  = [True] * len(prompt) ++ [False] * len(target)

so a bidirectional model reads the prompt both ways and generates the target causally. `pack`
puts several examples in each row with segment ids; `trainer_loss` is the trainer's objective
(train/trainer.py OBJECTIVES['birdie']).

Keys: a JAX PRNG key (typed or raw uint32), or an int seed. Objectives run on the host in numpy
(their outputs have data-dependent lengths); the key seeds a numpy Generator, so one key gives one
output.

    ex = infilling(tokens, jax.random.key(0), corruption_rate=0.15, mean_span=3)
    batch = pack([ex, ...], row_length=512)   # {"inputs","targets","weights","prefix",...} [R,T]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from train.data import tokenizer as tok
from train.objectives.lm import token_losses

# ---------------------------------------------------------------------------------------------
# Token ids: the one table of Birdie's special tokens (all in the tokenizer's PARADIGM range
# 293..308, except the sentinels, SEP and EOS which the tokenizer names itself).
# ---------------------------------------------------------------------------------------------
BIRDIE_TOKENS: dict[str, int] = {
    # paradigm tokens, the first (or, by ObjectiveSettings.paradigm_placement, last) token
    # of every prompt
    "NTP": tok.paradigm(0),
    "PREFIX_LM": tok.paradigm(1),
    "INFILLING": tok.paradigm(2),
    "AUTOENCODING": tok.paradigm(3),
    "AUTOENCODING_DESHUFFLING": tok.paradigm(4),
    "DESHUFFLING": tok.paradigm(5),
    "COPYING": tok.paradigm(6),
    "SELECTIVE_COPYING": tok.paradigm(7),
    "UL2_R": tok.paradigm(8),
    "UL2_X": tok.paradigm(9),
    "UL2_S": tok.paradigm(10),
    # structure
    "START_GENERATING": tok.paradigm(11),   # [SG]: first non-prefix input of every example
    "SC_START": tok.paradigm(12),           # selective copying: [START] pre [END] post ...
    "SC_END": tok.paradigm(13),
    "SC_CONTEXT": tok.paradigm(14),
    "SC_SEP": tok.SEP,                      # between copied spans
    "SC_DONE": tok.EOS,                     # after the last copied span
}
START_GENERATING = BIRDIE_TOKENS["START_GENERATING"]
IGNORE = -1  # label of positions that carry no loss (the prompt)
QUERY_POSITIONS = ("before", "after", "either")      # selective copying: query vs context
# Objective settings the controller can choose, each value its own configuration (an action),
# instead of their being drawn per example (ObjectiveSettings.controlled).
CONTROLLABLE = ("length_bins", "copying_length", "selective_copying_context",
                "selective_copying_query", "selective_copying_spans")
PARADIGM_PLACEMENTS = ("prepend", "append", "either")  # paradigm token: first or last of prompt


def sentinel(i: int) -> int:
    """Span i's sentinel; ids cycle through the tokenizer's 32 sentinels for longer inputs."""
    return tok.sentinel(i % tok.NUM_SENTINELS)


SENTINELS = frozenset(range(tok.FIRST_SENTINEL, tok.FIRST_SENTINEL + tok.NUM_SENTINELS))


class Example(NamedTuple):
    """One laid-out example, all [L]: inputs int32, labels int32 (IGNORE on the prompt),
    prefix bool (True on the prompt)."""
    inputs: np.ndarray
    labels: np.ndarray
    prefix: np.ndarray


def make_example(prompt, target) -> Example:
    """prompt ++ [SG] ++ target[:-1] as inputs, target aligned as labels (prompt ignored)."""
    prompt = np.asarray(prompt, np.int32).reshape(-1)
    target = np.asarray(target, np.int32).reshape(-1)
    if target.size == 0:
        raise ValueError("target is empty; an example needs at least one target token")
    n = prompt.size
    inputs = np.empty(n + target.size, np.int32)
    inputs[:n], inputs[n], inputs[n + 1:] = prompt, START_GENERATING, target[:-1]
    labels = np.full(n + target.size, IGNORE, np.int32)
    labels[n:] = target
    prefix = np.zeros(n + target.size, bool)
    prefix[:n] = True
    return Example(inputs, labels, prefix)


def split_example(ex: Example) -> tuple[np.ndarray, np.ndarray]:
    """The (prompt, target) an example was made from."""
    p = int(ex.prefix.sum())
    return ex.inputs[:p], ex.labels[p:]


def _key_words(key) -> list[int]:
    """A JAX PRNG key (typed or raw uint32) as the uint32 words that seed a numpy Generator."""
    key = jnp.asarray(key) if not isinstance(key, np.ndarray) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, np.uint32).ravel().tolist()


def _rng(key) -> np.random.Generator:
    if isinstance(key, (int, np.integer)):
        return np.random.default_rng(int(key))
    return np.random.default_rng(_key_words(key))


def _text(tokens) -> np.ndarray:
    t = np.asarray(tokens)
    if t.ndim != 1:
        raise ValueError(f"tokens has shape {t.shape}; allowed: rank 1 [L]")
    return t.astype(np.int32)


def _largest_fit(n_max: int, n_min: int, length_fn: Callable[[int], int],
                 max_length: Optional[int], what: str) -> int:
    """The largest n in [n_min, n_max] with length_fn(n) <= max_length (length_fn nondecreasing)."""
    if n_max < n_min:
        raise ValueError(f"{what}: tokens has {n_max} tokens; needs at least {n_min}")
    if max_length is None or length_fn(n_max) <= max_length:
        return n_max
    if length_fn(n_min) > max_length:
        raise ValueError(f"{what}: max_length={max_length} is too small; the shortest example "
                         f"needs {length_fn(n_min)} tokens")
    lo, hi = n_min, n_max  # length_fn(lo) fits, length_fn(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length_fn(mid) <= max_length:
            lo = mid
        else:
            hi = mid
    return lo


def _window(text: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random contiguous window of n tokens."""
    start = int(rng.integers(0, text.size - n + 1))
    return text[start: start + n]


# ---------------------------------------------------------------------------------------------
# Span masks (T5's random_spans_noise_mask)
# ---------------------------------------------------------------------------------------------
def _span_counts(n: int, corruption_rate: float, mean_span: float) -> tuple[int, int]:
    num_noise = int(np.clip(round(n * corruption_rate), 1, n - 1))
    num_spans = int(np.clip(round(num_noise / mean_span), 1, min(num_noise, n - num_noise)))
    return num_noise, num_spans


def _random_partition(total: int, parts: int, rng) -> np.ndarray:
    """`parts` positive integers summing to `total`, uniformly among such compositions."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)


def span_segments(n: int, corruption_rate: float, mean_span: float, rng):
    """[(start, end, is_noise)] covering 0..n: clean, noise, clean, noise, ... (T5's layout)."""
    num_noise, num_spans = _span_counts(n, corruption_rate, mean_span)
    noise = _random_partition(num_noise, num_spans, rng)
    clean = _random_partition(n - num_noise, num_spans, rng)
    segs, pos = [], 0
    for c, z in zip(clean, noise):
        segs.append((pos, pos + c, False))
        segs.append((pos + c, pos + c + z, True))
        pos += c + z
    return segs


# ---------------------------------------------------------------------------------------------
# The objectives: (tokens [L], key) → Example
# ---------------------------------------------------------------------------------------------
def next_token_prediction(tokens, key, *, max_length: Optional[int] = None,
                          paradigm: Optional[int] = BIRDIE_TOKENS["NTP"]) -> Example:
    """The whole text is the target. paradigm=None: plain NTP (empty prompt: inputs start at SG)."""
    text = _text(tokens)
    head = [] if paradigm is None else [paradigm]
    n = _largest_fit(text.size, 1, lambda n: n + len(head), max_length, "next_token_prediction")
    return make_example(head, _window(text, n, _rng(key)))


def prefix_lm(tokens, key, *, max_length: Optional[int] = None, low: float = 0.5,
              high: float = 1.0, min_side: int = 4,
              paradigm: int = BIRDIE_TOKENS["PREFIX_LM"]) -> Example:
    """Prompt = text[:s], target = text[s:], s uniform in [low, high]·L, ≥ min_side each side."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"prefix_lm low={low}, high={high}: need 0 <= low <= high <= 1")
    text = _text(tokens)
    rng = _rng(key)
    n = _largest_fit(text.size, 2 * min_side, lambda n: n + 1, max_length, "prefix_lm")
    text = _window(text, n, rng)
    s = int(round(rng.uniform(low, high) * n))
    s = int(np.clip(s, min_side, n - min_side))
    return make_example(np.concatenate([[paradigm], text[:s]]), text[s:])


def _pick_length_bin(n: int, length_bins, rng) -> int:
    if not length_bins:
        return n
    return min(n, int(length_bins[int(rng.integers(len(length_bins)))]))


def infilling(tokens, key, *, corruption_rate: float = 0.15, mean_span: float = 3.0,
              length_bins: Sequence[int] = (), max_length: Optional[int] = None,
              paradigm: int = BIRDIE_TOKENS["INFILLING"]) -> Example:
    """Span corruption: each noise span becomes a sentinel in the prompt; the target lists
    sentinel_i span_i in order (T5). length_bins: the text is first cut to a random bin's length."""
    _check_rate(corruption_rate, mean_span, "infilling")
    text = _text(tokens)
    rng = _rng(key)
    n_max = _pick_length_bin(text.size, length_bins, rng)

    def length(n):
        return n + 2 * _span_counts(n, corruption_rate, mean_span)[1] + 1

    n = _largest_fit(n_max, 2, length, max_length, "infilling")
    text = _window(text, n, rng)
    prompt, target, k = [paradigm], [], 0
    for s, e, noisy in span_segments(n, corruption_rate, mean_span, rng):
        if noisy:
            prompt.append(sentinel(k))
            target.append(sentinel(k))
            target.extend(text[s:e])
            k += 1
        else:
            prompt.extend(text[s:e])
    return make_example(prompt, target)


def autoencoding(tokens, key, *, corruption_rate: float = 0.15, mean_span: float = 3.0,
                 deshuffle: bool = False, max_length: Optional[int] = None,
                 paradigm: Optional[int] = None) -> Example:
    """Masked spans (one sentinel each) in the prompt; the target is the whole original text.
    deshuffle=True also shuffles the clean chunks (each with the sentinel after it):
    autoencoding + deshuffling. Sentinels are numbered in prompt order after shuffling."""
    _check_rate(corruption_rate, mean_span, "autoencoding")
    if paradigm is None:
        paradigm = BIRDIE_TOKENS["AUTOENCODING_DESHUFFLING" if deshuffle else "AUTOENCODING"]
    text = _text(tokens)
    rng = _rng(key)

    def length(n):
        noise, spans = _span_counts(n, corruption_rate, mean_span)
        return 1 + (n - noise + spans) + n

    n = _largest_fit(text.size, 2, length, max_length, "autoencoding")
    text = _window(text, n, rng)
    segs = span_segments(n, corruption_rate, mean_span, rng)
    pieces = [text[s:e] for s, e, noisy in segs if not noisy]   # clean chunk i, then span i
    order = rng.permutation(len(pieces)) if deshuffle else np.arange(len(pieces))
    prompt = [paradigm]
    for k, i in enumerate(order):
        prompt.extend(pieces[i])
        prompt.append(sentinel(k))
    return make_example(prompt, text)


def _partial_permutation(k: int, fraction: float, rng) -> np.ndarray:
    """[k] a new order of k units: round(fraction·k) of them (at least 2) chosen, then permuted
    among themselves; the others stay where they are. fraction 1: a permutation of all k."""
    if fraction >= 1.0:
        return rng.permutation(k)
    m = int(np.clip(round(fraction * k), 2, k))
    chosen = np.sort(rng.choice(k, m, replace=False))
    order = np.arange(k)
    order[chosen] = chosen[rng.permutation(m)]
    return order


def deshuffling(tokens, key, *, fraction: float = 1.0, mean_chunk: float = 8.0,
                max_length: Optional[int] = None,
                paradigm: int = BIRDIE_TOKENS["DESHUFFLING"]) -> Example:
    """A `fraction` of the text's units shuffled among their own positions; the target is the
    original. Units are single tokens (mean_chunk=1: the paper's deshuffling, fraction 0.5 or 1)
    or chunks of mean length mean_chunk (the compact settings: chunks of 8, all shuffled)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"deshuffling fraction={fraction} is not allowed; allowed: (0, 1]")
    if mean_chunk < 1:
        raise ValueError(f"deshuffling mean_chunk={mean_chunk} is not allowed; allowed: >= 1")
    text = _text(tokens)
    rng = _rng(key)
    n = _largest_fit(text.size, 2, lambda n: 2 * n + 1, max_length, "deshuffling")
    text = _window(text, n, rng)
    if mean_chunk == 1:   # single tokens: no partition to draw
        shuffled = text[_partial_permutation(n, fraction, rng)]
    else:
        k = int(np.clip(round(n / mean_chunk), 2, n))
        sizes = _random_partition(n, k, rng)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        order = _partial_permutation(k, fraction, rng)
        shuffled = np.concatenate([text[bounds[i]:bounds[i + 1]] for i in order])
    return make_example(np.concatenate([[paradigm], shuffled]), text)


def copying(tokens, key, *, length_bins: Sequence[int] = (), max_length: Optional[int] = None,
            paradigm: int = BIRDIE_TOKENS["COPYING"]) -> Example:
    """[COPY] text → text. length_bins: the text is first cut to a random bin's length (none:
    the longest that fits)."""
    text = _text(tokens)
    rng = _rng(key)
    n_max = _pick_length_bin(text.size, length_bins, rng)
    n = _largest_fit(n_max, 1, lambda n: 2 * n + 1, max_length, "copying")
    text = _window(text, n, rng)
    return make_example(np.concatenate([[paradigm], text]), text)


def selective_copying(tokens, key, *, max_spans: int = 4, delimiter_length: tuple = (2, 6),
                      span_length: tuple = (2, 16), query_position: str = "before",
                      length_bins: Sequence[int] = (), max_length: Optional[int] = None,
                      paradigm: int = BIRDIE_TOKENS["SELECTIVE_COPYING"]) -> Example:
    """[SC] query [CONTEXT] text → span1 [SEP] span2 ... [DONE]; query: ([START] pre [END] post)*.

    1..max_spans spans of the text (non-overlapping, each with its pre/post delimiters) are asked
    in random order; span_i is the text between pre_i and post_i. query_position "after" puts
    the query after the context ([SC] [CONTEXT] text query), "either" draws one of the two,
    half each (the paper's setting); the target is the same. length_bins: the context is at
    most a random bin's length (none: the longest that fits).
    """
    if query_position not in QUERY_POSITIONS:
        raise ValueError(f"selective_copying query_position={query_position!r} is not allowed; "
                         f"allowed: {QUERY_POSITIONS}")
    dmin, dmax = delimiter_length
    smin, smax = span_length
    if not (1 <= dmin <= dmax and 1 <= smin <= smax and max_spans >= 1):
        raise ValueError(f"selective_copying delimiter_length={delimiter_length}, span_length="
                         f"{span_length}, max_spans={max_spans}: need 1 <= min <= max, "
                         "max_spans >= 1")
    text = _text(tokens)
    rng = _rng(key)
    n_max = max(_pick_length_bin(text.size, length_bins, rng), min(text.size, 2 * dmin + smin))
    worst = max_spans * (3 + 2 * dmax + smax) + 2   # query, separators, [CONTEXT], paradigm
    n = _largest_fit(n_max, 2 * dmin + smin, lambda n: n + worst, max_length,
                     "selective_copying")
    text = _window(text, n, rng)
    # Place windows pre|span|post left to right with random gaps, up to k of them.
    k = int(rng.integers(1, max_spans + 1))
    wins = [(int(rng.integers(dmin, dmax + 1)), int(rng.integers(smin, smax + 1)),
             int(rng.integers(dmin, dmax + 1))) for _ in range(k)]
    while wins and sum(map(sum, wins)) > n:
        wins.pop()
    if not wins:  # the text is too short for the drawn sizes: the smallest window fits
        wins = [(dmin, smin, dmin)]
    slack = n - sum(map(sum, wins))
    gaps = np.sort(rng.integers(0, slack + 1, len(wins)))
    spans, pos, used = [], 0, 0
    for (lp, ls, lq), g in zip(wins, gaps):
        start = pos + (int(g) - used)
        used = int(g)
        pre = text[start: start + lp]
        span = text[start + lp: start + lp + ls]
        post = text[start + lp + ls: start + lp + ls + lq]
        spans.append((pre, span, post))
        pos = start + lp + ls + lq
    order = rng.permutation(len(spans))
    query, target = [], []
    for j, i in enumerate(order):
        pre, span, post = spans[i]
        query += [BIRDIE_TOKENS["SC_START"], *pre, BIRDIE_TOKENS["SC_END"], *post]
        if j:
            target.append(BIRDIE_TOKENS["SC_SEP"])
        target.extend(span)
    target.append(BIRDIE_TOKENS["SC_DONE"])
    # drawn last, so "before" (no draw) gives the examples of the query-first layout bit for bit
    after = query_position == "after" or (query_position == "either" and rng.random() < 0.5)
    context = [BIRDIE_TOKENS["SC_CONTEXT"], *text]
    prompt = [paradigm] + (context + query if after else query + context)
    return make_example(prompt, target)


def _check_rate(rate, span, what):
    if not 0.0 < rate < 1.0:
        raise ValueError(f"{what} corruption_rate={rate} must be in (0, 1)")
    if span < 1:
        raise ValueError(f"{what} mean_span={span} must be >= 1")


OBJECTIVE_FNS: dict[str, Callable[..., Example]] = {
    "next_token_prediction": next_token_prediction,
    "prefix_lm": prefix_lm,
    "infilling": infilling,
    "autoencoding": autoencoding,
    "deshuffling": deshuffling,
    "copying": copying,
    "selective_copying": selective_copying,
}


# ---------------------------------------------------------------------------------------------
# The objectives' settings (Birdie §3.1 and Appendix; issue 21)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
    """How Birdie's objective set is built; the defaults are the paper's (PAPER_SETTINGS).

    COMPACT_SETTINGS: deshuffling of chunks (mean 8, all shuffled), query-first selective
    copying with spans 2-16 and delimiters 2-6, the paradigm token always first, the UL2 S split
    uniform in [0, 1]: the settings the CPU figures' recipes were tuned on (README, Birdie).
    """
    # Where the published birdie_rl package differs, these follow the paper (issue 21) and say so.
    # Deshuffling: one configuration per fraction of units shuffled (chosen positions permuted
    # among themselves); the paper shuffles 50 % or 100 % of the tokens (the package's example
    # config uses 75 % and 25 % of the characters).
    deshuffle_fractions: tuple = (0.5, 1.0)
    # Deshuffling's unit: 1 = single tokens (the paper); > 1 = chunks of this mean length.
    deshuffle_mean_chunk: float = 1.0
    # Selective copying: the query "before" or "after" the context, or "either" (drawn per
    # example, half each; the package makes the two layouts separate configurations).
    selective_copying_query: str = "either"
    # Selective copying: copied span lengths and delimiter lengths, inclusive (min, max); the
    # paper's 4-32 and 1-8 (the package draws spans around a mean, delimiters of 2-16 tokens).
    selective_copying_spans: tuple = (4, 32)
    selective_copying_delimiters: tuple = (1, 8)
    # The paradigm token of every objective (UL2's R/X/S too): "prepend" (first prompt token),
    # "append" (last prompt token, just before [START_GENERATING]) or "either" (appended half of
    # the time, drawn per example's key): the paper's; the package always prepends it.
    paradigm_placement: str = "either"
    # UL2's S-denoiser: the prompt's share of the text, drawn uniformly in [low, high]; the
    # paper (and the package) split at 75 %.
    ul2_s_prefix: tuple = (0.75, 0.75)
    # Settings the controller chooses rather than the data drawing them per example (the paper's
    # action space: all of CONTROLLABLE): each value becomes a configuration of its own.
    # "length_bins": infilling's text length, one configuration per length bin;
    # "copying_length": copying's text length, per length bin (uncontrolled: the longest fit);
    # "selective_copying_context": its context length, per length bin (uncontrolled: longest);
    # "selective_copying_query": "either" becomes a "before" and an "after" configuration;
    # "selective_copying_spans": span lengths in doubling ranges of selective_copying_spans
    # (4-32: 4-7, 8-15, 16-32). A setting with one value gives the configuration as uncontrolled.
    controlled: tuple = CONTROLLABLE

    def __post_init__(self):
        def bad(field, allowed):
            return ValueError(f"objective_settings.{field}={getattr(self, field)!r} is not "
                              f"allowed; allowed: {allowed}")

        def convert(field, fn, allowed):
            try:
                object.__setattr__(self, field, fn(getattr(self, field)))
            except (TypeError, ValueError):
                raise bad(field, allowed) from None

        def pair(kind):
            def fn(v):
                if isinstance(v, (str, bytes)) or len(v) != 2:
                    raise ValueError
                return kind(v[0]), kind(v[1])
            return fn

        def floats(v):
            if isinstance(v, (str, bytes)):
                raise ValueError
            return tuple(float(f) for f in v)

        fractions = "a tuple of distinct fractions in (0, 1]"
        convert("deshuffle_fractions", floats, fractions)
        fr = self.deshuffle_fractions
        if not fr or len(set(fr)) != len(fr) or not all(0.0 < f <= 1.0 for f in fr):
            raise bad("deshuffle_fractions", fractions)
        convert("deshuffle_mean_chunk", float, ">= 1 (1: single tokens)")
        if not self.deshuffle_mean_chunk >= 1.0:
            raise bad("deshuffle_mean_chunk", ">= 1 (1: single tokens)")
        if self.selective_copying_query not in QUERY_POSITIONS:
            raise bad("selective_copying_query", QUERY_POSITIONS)
        if self.paradigm_placement not in PARADIGM_PLACEMENTS:
            raise bad("paradigm_placement", PARADIGM_PLACEMENTS)
        for field in ("selective_copying_spans", "selective_copying_delimiters"):
            convert(field, pair(int), "a pair of integers 1 <= min <= max")
            lo, hi = getattr(self, field)
            if not 1 <= lo <= hi:
                raise bad(field, "a pair of integers 1 <= min <= max")
        def names(v):
            if isinstance(v, (str, bytes)):
                raise ValueError
            return tuple(str(x) for x in v)

        controllable = f"a tuple of distinct names from {CONTROLLABLE}"
        convert("controlled", names, controllable)
        if len(set(self.controlled)) != len(self.controlled) \
                or not set(self.controlled) <= set(CONTROLLABLE):
            raise bad("controlled", controllable)
        convert("ul2_s_prefix", pair(float), "a pair of fractions 0 <= low <= high <= 1")
        lo, hi = self.ul2_s_prefix
        if not 0.0 <= lo <= hi <= 1.0:
            raise bad("ul2_s_prefix", "a pair of fractions 0 <= low <= high <= 1")

    @classmethod
    def from_mapping(cls, fields) -> "ObjectiveSettings":
        """The settings of a mapping or ConfigDict of fields (missing ones: the paper's)."""
        if isinstance(fields, cls):
            return fields
        given = dict(fields.items())
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ValueError(f"objective_settings fields {unknown} are unknown; allowed: "
                             f"{allowed}")
        return cls(**given)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PAPER_SETTINGS = ObjectiveSettings()
COMPACT_SETTINGS = ObjectiveSettings(
    deshuffle_fractions=(1.0,), deshuffle_mean_chunk=8.0, selective_copying_query="before",
    selective_copying_spans=(2, 16), selective_copying_delimiters=(2, 6),
    paradigm_placement="prepend", ul2_s_prefix=(0.0, 1.0), controlled=())


def _side_rng(key, stream: int) -> np.random.Generator:
    """A generator seeded by (key, stream): draws independent of the objective's own (`_rng`)."""
    words = [int(key)] if isinstance(key, (int, np.integer)) else _key_words(key)
    return np.random.default_rng(words + [stream])


_PLACEMENT_STREAM = 0x9A7AD16   # non-zero: SeedSequence pads short entropy with zeros


def paradigm_last(placement: str, key) -> bool:
    """Whether an example drawn with `key` has its paradigm token last ("either": half of the
    keys, from a stream of the key independent of the objective's draws)."""
    if placement == "either":
        return bool(_side_rng(key, _PLACEMENT_STREAM).random() < 0.5)
    return placement == "append"


def move_paradigm_last(ex: Example) -> Example:
    """The example with its first prompt token (the paradigm token) moved to the prompt's end,
    just before [START_GENERATING]; labels and prefix are unchanged."""
    p = int(ex.prefix.sum())
    if p < 2:
        return ex
    inputs = ex.inputs.copy()
    inputs[:p] = np.roll(ex.inputs[:p], -1)
    return Example(inputs, ex.labels, ex.prefix)


# ---------------------------------------------------------------------------------------------
# Objective configurations and mixtures
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Objective:
    """One configuration of one objective: `fn` is a key of OBJECTIVE_FNS, `group` the class the
    controller scales by 1/(its size), `kwargs` the function's keyword arguments, `placement`
    where the paradigm token goes (PARADIGM_PLACEMENTS; drawn per example's key)."""
    name: str
    fn: str
    group: str
    kwargs: tuple = ()
    placement: str = "prepend"

    def __post_init__(self):
        if self.fn not in OBJECTIVE_FNS:
            raise ValueError(f"objective fn={self.fn!r} is not allowed; use one of "
                             f"{sorted(OBJECTIVE_FNS)}")
        if self.placement not in PARADIGM_PLACEMENTS:
            raise ValueError(f"objective placement={self.placement!r} is not allowed; "
                             f"allowed: {PARADIGM_PLACEMENTS}")

    def __call__(self, tokens, key, *, max_length: Optional[int] = None) -> Example:
        ex = OBJECTIVE_FNS[self.fn](tokens, key, max_length=max_length, **dict(self.kwargs))
        if self.placement != "prepend" and paradigm_last(self.placement, key):
            ex = move_paradigm_last(ex)
        return ex


INFILL_LENGTH_BINS = (64, 128, 256, 512, 1024)


def _placed(objs: Sequence[Objective], placement: str) -> tuple[Objective, ...]:
    """The objectives with their paradigm token placed by `placement` (PARADIGM_PLACEMENTS)."""
    return tuple(dataclasses.replace(o, placement=placement) for o in objs)


def span_ranges(lo: int, hi: int) -> tuple:
    """[lo, hi] cut into doubling ranges, the last one absorbing what would not double:
    (4, 32) → ((4, 7), (8, 15), (16, 32)); (1, 4) → ((1, 1), (2, 4))."""
    out, s = [], lo
    while s <= hi:
        e = 2 * s - 1
        if e >= hi or 2 * (e + 1) - 1 > hi:
            e = hi
        out.append((s, e))
        s = e + 1
    return tuple(out)


def _variants(name: str, kwargs: dict, choices: Sequence[tuple]) -> list[tuple[str, dict]]:
    """(name, kwargs) of every combination of `choices` [(tag, key, values)]: a choice with one
    value adds neither a name part nor (when its value is None) a keyword."""
    out = [(name, dict(kwargs))]
    for tag, key, values in choices:
        values = list(values)
        step = []
        for n, kw in out:
            for v in values:
                shown = "-".join(map(str, v)) if isinstance(v, tuple) else v
                part = "" if len(values) == 1 else f"_{tag}{shown}"
                step.append((n + part, kw if v is None else {**kw, key: v}))
        out = step
    return out


def birdie_objectives(*, length_bins: Sequence[int] = INFILL_LENGTH_BINS,
                      settings: ObjectiveSettings = PAPER_SETTINGS) -> tuple[Objective, ...]:
    """Birdie's action space: 7 objective classes.

    Uncontrolled (COMPACT_SETTINGS): 18 configurations plus one per deshuffling fraction beyond
    the first. Each setting in `settings.controlled` multiplies its objective's configurations
    by its values (ObjectiveSettings.controlled), the class staying the same: the paper's
    settings with 4 length bins give 72."""
    bins = tuple(int(b) for b in length_bins)
    ctl = set(settings.controlled)

    def per_bin(setting):   # one bin per configuration, or (when uncontrolled) as before
        return [(b,) for b in bins] if setting in ctl and len(bins) > 1 else [None]

    objs = [Objective("next_token_prediction", "next_token_prediction", "next_token_prediction"),
            Objective("prefix_lm", "prefix_lm", "prefix_lm")]
    infill_bins = per_bin("length_bins") if bins else [None]
    for rate in (0.05, 0.15, 0.5):
        for span in (3, 8, 32):
            base = {"corruption_rate": rate, "mean_span": float(span), "length_bins": bins}
            for name, kw in _variants(f"infilling_r{int(rate * 100)}_s{span}", base,
                                      [("b", "length_bins", infill_bins)]):
                objs.append(Objective(name, "infilling", "infilling", tuple(kw.items())))
    for deshuffle in (False, True):
        for rate, span in ((0.15, 3), (0.5, 8)):
            tag = "autoencoding_deshuffling" if deshuffle else "autoencoding"
            objs.append(Objective(f"{tag}_r{int(rate * 100)}_s{span}", "autoencoding",
                                  "autoencoding", (("corruption_rate", rate),
                                                   ("mean_span", float(span)),
                                                   ("deshuffle", deshuffle))))
    fractions = settings.deshuffle_fractions
    for f in fractions:
        name = "deshuffling" if len(fractions) == 1 else f"deshuffling_p{f * 100:g}"
        objs.append(Objective(name, "deshuffling", "deshuffling",
                              (("fraction", f), ("mean_chunk", settings.deshuffle_mean_chunk))))
    for name, kw in _variants("copying", {}, [("b", "length_bins", per_bin("copying_length"))]):
        objs.append(Objective(name, "copying", "copying", tuple(kw.items())))
    query = settings.selective_copying_query
    queries = (["before", "after"] if query == "either" and "selective_copying_query" in ctl
               else [query])
    spans = (span_ranges(*settings.selective_copying_spans)
             if "selective_copying_spans" in ctl else (settings.selective_copying_spans,))
    base = {"span_length": settings.selective_copying_spans,
            "delimiter_length": settings.selective_copying_delimiters, "query_position": query}
    for name, kw in _variants("selective_copying", base,
                              [("q", "query_position", queries), ("s", "span_length", spans),
                               ("c", "length_bins", per_bin("selective_copying_context"))]):
        objs.append(Objective(name, "selective_copying", "selective_copying",
                              tuple(kw.items())))
    return _placed(objs, settings.paradigm_placement)


def ul2_objectives(*, settings: ObjectiveSettings = PAPER_SETTINGS) -> tuple[Objective, ...]:
    """UL2's mixture of denoisers (Tay et al. 2022): R (rate 15%, spans 3, 8), X (50% with spans
    3, 8, 64; 15% with span 64), S (prefix-LM, the prompt settings.ul2_s_prefix of the text:
    75 % in the paper). Sampled uniformly over the 7 (`uniform_mixture`)."""
    R, X, S = (BIRDIE_TOKENS[k] for k in ("UL2_R", "UL2_X", "UL2_S"))
    objs = []
    for tag, paradigm, rate, span in (("r", R, 0.15, 3), ("r", R, 0.15, 8), ("x", X, 0.5, 3),
                                      ("x", X, 0.5, 8), ("x", X, 0.5, 64), ("x", X, 0.15, 64)):
        objs.append(Objective(f"ul2_{tag}_r{int(rate * 100)}_s{span}", "infilling", f"ul2_{tag}",
                              (("corruption_rate", rate), ("mean_span", float(span)),
                               ("paradigm", paradigm))))
    low, high = settings.ul2_s_prefix
    objs.append(Objective("ul2_s", "prefix_lm", "ul2_s",
                          (("low", low), ("high", high), ("paradigm", S))))
    return _placed(objs, settings.paradigm_placement)


def ntp_objectives() -> tuple[Objective, ...]:
    """The plain next-token baseline: no paradigm token, no prefix."""
    return (Objective("plain_ntp", "next_token_prediction", "plain_ntp", (("paradigm", None),)),)


def group_sizes(objectives: Sequence[Objective]) -> np.ndarray:
    """[K] number of configurations in each objective's class."""
    groups = [o.group for o in objectives]
    return np.array([groups.count(g) for g in groups], np.int32)


def uniform_mixture(objectives: Sequence[Objective], *, by_group: bool = True) -> np.ndarray:
    """[K] probabilities: equal per class, split evenly inside a class (by_group), else equal."""
    K = len(objectives)
    if not by_group:
        return np.full(K, 1.0 / K)
    sizes = group_sizes(objectives)
    p = 1.0 / sizes
    return p / p.sum()


def sample_example(objectives: Sequence[Objective], mixture, tokens, key, *,
                   max_length: Optional[int] = None) -> tuple[int, Example]:
    """Draws an objective from `mixture` [K] and applies it: (objective index, example)."""
    mixture = np.asarray(mixture, np.float64)
    if mixture.shape != (len(objectives),) or (mixture < 0).any() or mixture.sum() <= 0:
        raise ValueError(f"mixture has shape {mixture.shape} (sum {mixture.sum():.3g}); needs "
                         f"[{len(objectives)}] non-negative weights with a positive sum")
    rng = _rng(key)
    i = int(rng.choice(len(objectives), p=mixture / mixture.sum()))
    sub = int(rng.integers(0, 2**31 - 1))
    return i, objectives[i](tokens, sub, max_length=max_length)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
def pack(examples: Iterable[Example], row_length: int, *, objective_ids: Optional[Iterable[int]]
         = None, num_rows: Optional[int] = None) -> dict[str, np.ndarray]:
    """Packs examples, in order, into rows of `row_length` (next-fit) → arrays [R, T]:

    inputs int32 (PAD after the last sample), targets int32 (labels; PAD where ignored),
    weights float32 (1 on label positions), prefix bool, segment_ids int32 (1, 2, ... per row;
    0 on padding), objective_ids int32 (-1 on padding; given ids, else 0).
    num_rows: pad with empty rows to (or fail above) this many.
    """
    if row_length <= 0:
        raise ValueError(f"row_length={row_length} must be positive")
    ids = None if objective_ids is None else list(objective_ids)
    rows: list[list[tuple[Example, int]]] = [[]]
    used = 0
    for j, ex in enumerate(examples):
        L = ex.inputs.size
        if L > row_length:
            raise ValueError(f"example {j} has length {L} > row_length={row_length}; pass "
                             "max_length=row_length to the objective")
        if used + L > row_length:
            rows.append([])
            used = 0
        rows[-1].append((ex, 0 if ids is None else ids[j]))
        used += L
    if not rows[-1]:
        rows.pop()
    R = len(rows) if num_rows is None else num_rows
    if len(rows) > R:
        raise ValueError(f"{len(rows)} rows needed; num_rows={num_rows}")
    out = {
        "inputs": np.full((R, row_length), tok.PAD, np.int32),
        "targets": np.full((R, row_length), tok.PAD, np.int32),
        "weights": np.zeros((R, row_length), np.float32),
        "prefix": np.zeros((R, row_length), bool),
        "segment_ids": np.zeros((R, row_length), np.int32),
        "objective_ids": np.full((R, row_length), -1, np.int32),
    }
    for r, row in enumerate(rows):
        pos = 0
        for s, (ex, oid) in enumerate(row, start=1):
            sl = slice(pos, pos + ex.inputs.size)
            labelled = ex.labels != IGNORE
            out["inputs"][r, sl] = ex.inputs
            out["targets"][r, sl] = np.where(labelled, ex.labels, tok.PAD)
            out["weights"][r, sl] = labelled
            out["prefix"][r, sl] = ex.prefix
            out["segment_ids"][r, sl] = s
            out["objective_ids"][r, sl] = oid
            pos = sl.stop
    return out


def pack_row(draw: Callable[[], tuple[Example, int]], row_length: int, *,
             with_prefix: bool = True) -> dict[str, np.ndarray]:
    """One packed row: `pack`'s fields [row_length] (no `prefix` unless with_prefix), filled with
    the examples of draw() -> (example, objective id) until the next one does not fit (it is
    dropped). A first example longer than the row is pack's ValueError."""
    exs, ids, used = [], [], 0
    while True:
        ex, oid = draw()
        if exs and used + ex.inputs.size > row_length:
            break
        exs.append(ex)
        ids.append(oid)
        used += ex.inputs.size
    row = {k: v[0] for k, v in pack(exs, row_length, objective_ids=ids, num_rows=1).items()}
    if not with_prefix:
        del row["prefix"]
    return row


# ---------------------------------------------------------------------------------------------
# Reward (Birdie §3.2)
# ---------------------------------------------------------------------------------------------
def reward(old_loss: float, new_loss: float) -> float:
    """r = clip(−100·e·tanh(e·S·ΔL³), −1, 1), ΔL = (new − old)/old, S = √(old·new).

    A loss that falls gives a positive reward, saturating for large relative drops.
    """
    old, new = float(old_loss), float(new_loss)
    if not (old > 0 and new > 0 and math.isfinite(old) and math.isfinite(new)):
        raise ValueError(f"reward(old_loss={old_loss}, new_loss={new_loss}): losses must be "
                         "finite and > 0")
    d = (new - old) / old
    s = math.sqrt(old * new)
    r = float(np.clip(-100.0 * math.e * math.tanh(math.e * s * d ** 3), -1.0, 1.0))
    return r + 0.0  # −0.0 → 0.0


def reward_jnp(old_BxK, new_BxK) -> jax.Array:
    """`reward` elementwise on arrays (float32), for jitted controller updates."""
    old = jnp.asarray(old_BxK, jnp.float32)
    new = jnp.asarray(new_BxK, jnp.float32)
    d = (new - old) / old
    s = jnp.sqrt(old * new)
    return jnp.clip(-100.0 * math.e * jnp.tanh(math.e * s * d ** 3), -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# The trainer's loss
# ---------------------------------------------------------------------------------------------
def packed_logits(apply_fn, params, batch) -> jax.Array:
    """[B, T, V] of a packed batch: apply_fn({'params': p}, inputs, segment_ids=..., prefix=...)
    with the keys the batch has (a model without a prefix gets batches without one)."""
    kwargs: dict[str, Any] = {}
    for name in ("segment_ids", "prefix"):
        if name in batch:
            kwargs[name] = batch[name]
    return apply_fn({"params": params}, batch["inputs"], **kwargs)


def trainer_loss(apply_fn, params, batch, rng, *, step=None, memory=None):
    """Weighted next-token loss on packed Birdie batches (train/trainer.py OBJECTIVES['birdie']).

    Calls apply_fn({'params': p}, inputs, segment_ids=..., prefix=...) with the keys the batch
    has; returns (sum of weighted losses, {"weight", "correct"} sums) as train/objectives/lm.py.
    """
    del rng, step, memory
    ce, correct = token_losses(packed_logits(apply_fn, params, batch), batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(ce * w), {"weight": jnp.sum(w), "correct": jnp.sum(correct * w)}


def per_objective_losses(logits_BxTxV, batch, num_objectives: int) -> tuple[jax.Array, jax.Array]:
    """(mean loss [K], weight [K]) per objective id, for the controller's validation losses."""
    ce, _ = token_losses(logits_BxTxV, batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    onehot = jax.nn.one_hot(batch["objective_ids"], num_objectives, dtype=jnp.float32)
    tot = jnp.einsum("bt,btk->k", ce * w, onehot)
    cnt = jnp.einsum("bt,btk->k", w, onehot)
    return tot / jnp.maximum(cnt, 1.0), cnt
