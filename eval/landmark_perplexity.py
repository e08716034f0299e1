"""Perplexity vs evaluation length (Mohtashami & Jaggi 2023, Table 1), the `landmark_perplexity` figure.

    python -m eval.figures --only landmark_perplexity --size cpu --seed 0 --out figures

Reuses (or trains) the two runs of the `landmark_passkey` figure (eval/passkey.py: the landmark LM
and the plain transformer, both trained on 256-token windows of the passkey/prose mixture), and
measures byte-level perplexity on the held-out prose of the local corpus (validation split of
train/data/text_corpus.py, documents EOS-joined and cut into consecutive windows of LENGTH + 1
tokens; every setting at a length scores the same windows, all LENGTH targets of each) under:

- `baseline_full`: the plain transformer with full attention;
- `landmark_full`: the landmark LM with full attention over the whole window (landmarks inserted);
- `landmark_k{K}`: the landmark LM with the official mem-cache inference (`memory_logits`,
  chunks of half the training context), K blocks retrieved per token and head, unbounded cache;
- `landmark_k{K}_cache{N}`: the same with a ring cache of only N blocks (older blocks forgotten).

Sizes in train/configs/landmark.py: PASSKEY_SIZES for the runs, PERPLEXITY_SIZES for the
lengths and windows. `prose_windows(..., tokenizer=)` cuts the same prose into another
tokenizer's ids (perplexity is then per token of that tokenizer); the figure's runs are bytes.

JSON {"perplexity": {SETTING: {LENGTH: ppl}}}.
"""
from __future__ import annotations

import pathlib
import time

import numpy as np

from eval import figures, metrics, passkey
from train.configs import landmark as landmark_configs
from train.data import passkey_data, text_corpus
from train.data import tokenizer as tok

# (name, top_k, cache_blocks); None: full attention.
MEMORY_SETTINGS = (("landmark_k2", 2, None), ("landmark_k4", 4, None),
                   ("landmark_k4_cache8", 4, 8))


def validate_size(size: str) -> None:
    """Checks the landmark_perplexity figure at `size` before any training: the passkey runs it
    reuses (`passkey.validate_size`), positive lengths and window counts, enough held-out prose
    for every length, and caches that hold the retrieved blocks. Raises a ValueError naming the
    field, its value and what is allowed."""
    sizes = landmark_configs.PERPLEXITY_SIZES
    if size not in sizes:
        raise ValueError(f"size={size!r} is not allowed; use one of {sorted(sizes)}")
    passkey.validate_size(size)
    s, where = sizes[size], f"PERPLEXITY_SIZES[{size!r}]"
    if not s["lengths"] or min(s["lengths"]) < 1 or s["windows"] < 1:
        raise ValueError(f"{where}: lengths={s['lengths']}, windows={s['windows']} are not "
                         "allowed; use lengths >= 1 and windows >= 1")
    have = sum(d.size for d in passkey_data.corpus_tokens("validation", 10))
    need = s["windows"] * (max(s["lengths"]) + 1)
    if need > have:
        raise ValueError(f"{where}.lengths={s['lengths']} is not allowed with windows="
                         f"{s['windows']}: {need} tokens of validation prose needed, {have} held")
    for name, k, cache in MEMORY_SETTINGS:
        if cache is not None and not 0 <= k <= cache:
            raise ValueError(f"MEMORY_SETTINGS {name}: top_k={k} is not allowed with "
                             f"cache_blocks={cache}; use 0 <= top_k <= cache_blocks")


def prose_windows(length: int, windows: int, *, validation_percent: int = 10,
                  tokenizer: tok.Tokenizer | None = None) -> np.ndarray:
    """tokens [windows, length + 1]: consecutive windows of the EOS-joined validation prose,
    encoded by `tokenizer` (default bytes)."""
    if tokenizer is None or tokenizer.spec == "byte":
        docs = passkey_data.corpus_tokens("validation", validation_percent)
    else:
        docs = [tokenizer.encode(r["text"], add_eos=True)
                for r in text_corpus.documents("validation", validation_percent)]
    stream = np.concatenate(docs)
    need = windows * (length + 1)
    if stream.size < need:
        raise ValueError(f"the validation prose has {stream.size} tokens; {windows} windows of "
                         f"length={length} need {need}")
    return stream[:need].reshape(windows, length + 1).astype(np.int32)


def window_perplexity(logits_fn, tokens_NxT1) -> float:
    """exp(mean NLL) of every target of every window; logits_fn(tokens [N, T]) -> [N, T, V]."""
    inputs, targets = tokens_NxT1[:, :-1], tokens_NxT1[:, 1:]
    nll, count = metrics.token_nll(logits_fn(inputs), targets)
    return metrics.perplexity(nll, count)


def figure_settings(size: str) -> dict:
    """The figure's recipe at `size`: the passkey figure's runs, the PERPLEXITY_SIZES entry and
    the memory settings."""
    return {"runs": passkey.figure_settings(size), "size": landmark_configs.PERPLEXITY_SIZES[size],
            "memory_settings": MEMORY_SETTINGS}


@figures.register("landmark_perplexity", settings=figure_settings)
def landmark_perplexity_figure(*, size: str, seed: int, out: pathlib.Path, **_) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate_size(size)
    out = pathlib.Path(out)
    s = landmark_configs.PERPLEXITY_SIZES[size]
    ppl: dict[str, dict[int, float]] = {}
    t0 = time.time()
    c, lm_params, lm_model, _ = passkey.train_or_reuse(size, seed, out)
    base = passkey.train_or_reuse(size, seed, out, baseline=True)   # None when shipped
    chunk_len = c.seq_len // 2
    for length in s["lengths"]:
        windows = prose_windows(length, s["windows"])
        scorers = {}
        if base is not None:
            _, base_params, base_model, _ = base
            scorers["baseline_full"] = (lambda x: passkey.full_attention_logits(
                base_model, base_params, x))
        scorers["landmark_full"] = lambda x: passkey.full_attention_logits(lm_model, lm_params, x)
        for name, k, cache in MEMORY_SETTINGS:
            scorers[name] = (lambda x, k=k, cache=cache: passkey.memory_inference_logits(
                lm_model, lm_params, x, top_k=k, chunk_len=chunk_len, cache_blocks=cache))
        for name, fn in scorers.items():
            ppl.setdefault(name, {})[int(length)] = window_perplexity(fn, windows)
    names = list(ppl)
    rows = [(n, length, ppl[n][length]) for n in names for length in s["lengths"]]
    figures.write_csv(out / "landmark_perplexity.csv", ["setting", "eval_length", "perplexity"],
                      rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for n in names:
        xs = list(s["lengths"])
        ax.plot(xs, [ppl[n][x] for x in xs], marker="o", label=n)
    ax.axvline(c.seq_len, color="gray", ls=":", label="training context")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="evaluation length (tokens)", ylabel="perplexity (bytes, held-out prose)",
           title=f"perplexity vs length ({s['windows']} windows per length)"
                 + passkey.shipped_title(size))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "landmark_perplexity.png", dpi=120)
    plt.close(fig)
    return {"perplexity": {n: {str(k): v for k, v in ppl[n].items()} for n in names},
            "train_context": int(c.seq_len), "windows": s["windows"],
            "seconds": round(time.time() - t0, 1)}
