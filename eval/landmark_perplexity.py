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

Table 1 of any trained run (`main`):

    python -m eval.landmark_perplexity --workdir RUN [--grid official|tiny] [--windows N]

evaluates the official grid (lm_benchmark/eval_cmd_generator.py, the pg19_landmark rows:
evaluation lengths 512 / 2048 / 4096, chunks (`--mid_length`) of 250 (and 300, 350), caches of
10 … 80 blocks (`--mem_cache_size`), top-k 2, 3, 4, the three selection methods; OFFICIAL_GRID)
plus full attention at every length, on held-out windows of the run's own dataset
(`held_out_windows`: the evaluation split of data.name 'text' or 'tfds' (e.g. pg19), the prose
of 'passkey', tokenized by the run's data.tokenizer, EOS after each document, consecutive
windows of LENGTH + 1 tokens). A transformer run (the baseline, or the Transformer-XL
baseline trained by train/configs/landmark.py:tiny_xl|paper_xl) is scored with full attention
and read as Transformer-XL (XL_GRIDS: the official pg19_xl rows, `--lm_cache kv
--mem_cache_size 256 --mid_length 256` at 2048 and 4096 tokens;
train/objectives/transformer_xl.py: xl_logits). Prints one JSON line {"perplexity": {SETTING:
{LENGTH: ppl}}, "grid", "windows", "workdir"}; SETTING is "full",
"k{K}_cache{N}_chunk{C}_{selection}" or "xl_cache{N}_chunk{C}" (N tokens).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import NamedTuple

import numpy as np

from eval import cli, figures, metrics, passkey
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


# ---------------------------------------------------------------------------------------------
# Table 1 of any run: the official evaluation grid
# ---------------------------------------------------------------------------------------------
class Setting(NamedTuple):
    """One memory-inference evaluation (official eval.py flags in brackets)."""
    length: int          # tokens per window (--eval_seq_length)
    chunk: int           # raw tokens per chunk (--mid_length)
    cache: int           # blocks the cache holds (--mem_cache_size)
    top_k: int           # blocks retrieved (--cache_topk)
    selection: str = "per_token_and_head"   # --cache_selection_method

    @property
    def name(self) -> str:
        return f"k{self.top_k}_cache{self.cache}_chunk{self.chunk}_{self.selection}"


# lm_benchmark/eval_cmd_generator.py, the pg19_landmark rows (duplicates dropped), in its order.
OFFICIAL_GRID = (
    Setting(512, 250, 10, 2),
    Setting(2048, 250, 40, 2), Setting(2048, 350, 40, 2), Setting(2048, 300, 40, 3),
    Setting(2048, 250, 20, 4), Setting(2048, 250, 40, 4),
    Setting(4096, 250, 40, 4), Setting(4096, 250, 80, 2), Setting(4096, 250, 80, 4),
    Setting(2048, 250, 40, 2, "max_over_heads"), Setting(2048, 250, 40, 4, "max_over_heads"),
    Setting(4096, 250, 80, 4, "max_over_heads"),
    Setting(2048, 250, 40, 2, "max_over_tokens"), Setting(2048, 250, 40, 4, "max_over_tokens"),
    Setting(4096, 250, 80, 4, "max_over_tokens"),
)
# CPU: two short lengths, a cache of 3 blocks and top-1 (so the choice matters), the three
# selection methods (tests; blocks of 50).
TINY_GRID = (
    Setting(200, 50, 3, 1), Setting(200, 50, 3, 1, "max_over_heads"),
    Setting(200, 50, 3, 1, "max_over_tokens"),
)
FULL_LENGTHS = {"official": (512, 2048, 4096), "tiny": (200,)}
GRIDS = {"official": OFFICIAL_GRID, "tiny": TINY_GRID}


class XLSetting(NamedTuple):
    """One Transformer-XL evaluation (official eval.py flags with --lm_cache kv)."""
    length: int          # tokens per window (--eval_seq_length)
    chunk: int           # tokens per piece (--mid_length)
    cache: int           # earlier tokens each piece sees (--mem_cache_size)

    @property
    def name(self) -> str:
        return f"xl_cache{self.cache}_chunk{self.chunk}"


# eval_cmd_generator.py, the pg19_xl rows; tiny: pieces and a cache of 50 tokens at 200.
XL_GRIDS = {"official": (XLSetting(2048, 256, 256), XLSetting(4096, 256, 256)),
            "tiny": (XLSetting(200, 50, 50),)}


def held_out_windows(config, length: int, windows: int) -> np.ndarray:
    """tokens [windows, length + 1]: consecutive windows of the run's held-out stream (module
    docstring), tokenized by its data.tokenizer."""
    from train import trainer
    from train.data import pipeline
    data = config.data
    tokenizer = tok.load_tokenizer(data.get("tokenizer", "byte"))
    if data.name == "passkey":
        records = text_corpus.documents("validation", data.validation_percent)
    elif data.name in ("text", "tfds"):
        # the documents themselves, also for runs trained on random windows of their stream
        docs = pipeline.resolve_data_config(data, {"windows": "packed"})
        records, _ = pipeline.make_source(docs, split=trainer.eval_split(config),
                                          seq_len=int(config.seq_len))
    else:
        raise ValueError(f"data.name={data.name!r} has no held-out text; Table 1 reads 'text', "
                         "'tfds' or 'passkey' runs")
    need, have, docs = windows * (length + 1), 0, []
    for i in range(len(records)):
        ids = tokenizer.encode(records[i]["text"], add_eos=True)
        docs.append(ids)
        have += len(ids)
        if have >= need:
            break
    if have < need:
        raise ValueError(f"windows={windows} of length={length} need {need} held-out tokens; "
                         f"the run's {data.name!r} evaluation split has {have}")
    return np.concatenate(docs)[:need].reshape(windows, length + 1).astype(np.int32)


def table1(model, params, config, *, grid: str = "official", windows: int = 8) -> dict:
    """{SETTING: {LENGTH: perplexity}}: full attention at FULL_LENGTHS[grid], and for a
    LandmarkLM every Setting of GRIDS[grid] (`memory_logits`, lm_benchmark positions), for a
    Transformer every XLSetting of XL_GRIDS[grid] (`xl_logits`)."""
    import functools

    import jax

    from models import landmark
    from train.objectives import transformer_xl
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is not allowed; use one of {sorted(GRIDS)}")
    if not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows={windows!r} must be a positive integer")
    is_landmark = isinstance(model, landmark.LandmarkLM)
    settings = GRIDS[grid] if is_landmark else ()
    xl_settings = () if is_landmark else XL_GRIDS[grid]
    lengths = sorted(set(FULL_LENGTHS[grid]) | {s.length for s in settings + xl_settings})
    data = {n: held_out_windows(config, n, windows) for n in lengths}
    out: dict[str, dict[int, float]] = {}
    for n in FULL_LENGTHS[grid]:
        out.setdefault("full", {})[n] = window_perplexity(
            lambda x: passkey.full_attention_logits(model, params, x), data[n])
    for s in settings:
        out.setdefault(s.name, {})[s.length] = window_perplexity(
            lambda x, s=s: passkey.memory_inference_logits(
                model, params, x, top_k=s.top_k, chunk_len=s.chunk, cache_blocks=s.cache,
                selection=s.selection), data[s.length])
    for s in xl_settings:
        fn = jax.jit(functools.partial(transformer_xl.xl_logits, model.apply, piece_len=s.chunk,
                                       cache_len=s.cache))
        out.setdefault(s.name, {})[s.length] = window_perplexity(
            lambda x, fn=fn: fn(params, x), data[s.length])
    return out


def main(argv=None) -> int:
    from train import trainer
    p = argparse.ArgumentParser(description="Table 1: perplexity over the official grid")
    p.add_argument("--workdir", required=True, help="a trained run (landmark or transformer)")
    p.add_argument("--grid", default="official", choices=sorted(GRIDS))
    p.add_argument("--windows", type=int, default=8, help="held-out windows per length")
    a = p.parse_args(argv)
    config, params, model = trainer.restore_for_eval(a.workdir)
    ppl = table1(model, params, config, grid=a.grid, windows=a.windows)
    print(json.dumps({"perplexity": {k: {str(n): v for n, v in d.items()} for k, d in ppl.items()},
                      "grid": a.grid, "windows": a.windows, "workdir": a.workdir}))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
