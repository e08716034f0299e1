"""Passkey retrieval (Mohtashami & Jaggi 2023, Sec. 4.2 and Fig. 3b), and the `landmark_passkey` figure.

    python -m eval.passkey --workdir RUN --seed S --lengths 256,512,1024,2048 --trials N \
        [--baseline_workdir RUN2] [--top_k 4] [--chunk_len 128]
    python -m eval.passkey --protocol official --workdir RUN [--base HF_DIR] [--seed S] \
        [--lengths 0,100,...] [--trials 50] [--top_k 5] [--chunk_len 250]

`--protocol official` is the official zero-shot LLaMA test (eval/passkey_official.py:
`official_prompt`, generation of 10 tokens, the first integer scored, 50 trials per filler length
0 … 38000 characters): the landmark run (RUN: family 'landmark', e.g.
train/configs/landmark.py:hf=...) with the block memory (`landmark_memory`), and the base model
(`base`: the Hugging Face weights directory HF_DIR, or RUN itself when it is a transformer run)
with full attention; prompts are encoded by the run's tokenizer (--tokenizer overrides). It
prints one JSON line {"protocol": "official", "accuracy": {METHOD: {N_GARBAGE: acc}},
"prompt_tokens", ...}. The default protocol, `figure`, is the one below.

prints one JSON line {"train_context", "accuracy": {METHOD: {LENGTH: acc}}, ...}. A landmark run
(train/configs/landmark.py:tiny) is scored as `landmark_memory` (the official mem-cache inference,
`models.landmark_memory.memory_logits`, unbounded cache) and `landmark_full` (the same weights
with plain full attention over the whole prompt, landmarks inserted); a plain transformer run
(`tiny_baseline`, given as --workdir or --baseline_workdir) is scored as `baseline`.

The prompt is the paper's (train/data/passkey_data.py): filler, the key line at a uniformly random
depth, the question; LENGTH is the prompt's length in bytes (= tokens with the byte tokenizer),
keys are random 5-digit numbers, and a trial is right when the whole answer " K" is produced.
Another tokenizer (`tokenizer=`; the CLI takes the run's data.tokenizer) encodes the prompt and
the answer apart, so the answer's tokens are the ones scored; rows are right-padded to the
longest.

Decoding. A trial is scored by greedy decoding, computed exactly with one teacher-forced pass:
the model reads prompt + " K" and the trial is right iff the argmax at each answer position is
the next answer token. By induction this is the same event as "greedy decoding produces " K"".
For memory inference the answer tokens join the prompt's chunk schedule; since a chunk is causal
(each row depends only on earlier rows and the cache before the chunk; per-token-and-head
retrieval), this equals a greedy decoder that appends each generated token to the current chunk
and recomputes that chunk (tests/eval/test_passkey.py checks it against an explicit greedy loop).

The figure (`python -m eval.figures --only landmark_passkey`) trains the landmark LM and the
baseline on the passkey/prose mixture with the shared trainer (or reuses the runs it finds in
`run_dir`: OUT/runs/NAME-SIZE-seedSEED-HASH, HASH naming the recipe), then evaluates both at
lengths up to 8× the training context (sizes and the runs' phase configs in
train/configs/landmark.py: PASSKEY_SIZES, passkey_phase_configs):
JSON {"train_context": int, "accuracy": {METHOD: {LENGTH: acc}}}.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval import cli, figures, passkey_official
from models import landmark, landmark_memory
from train import checkpoint as ckpt_lib
from train import config_identity
from train import trainer
from train.configs import landmark as landmark_configs
from train.data import passkey_data
from train.data import pipeline
from train.data import tokenizer as tok

METHODS = ("landmark_memory", "landmark_full", "baseline")

official_prompt = passkey_official.official_prompt   # the official LLaMA test's prompt

TOP_K = 4   # blocks retrieved per token and head (the paper evaluates k = 2 and 4)


# ---------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------
def encode_trials(length: int, trials: int, seed: int, *, num_digits: int = 5,
                  intro: bool = False, tokenizer: Optional[tok.Tokenizer] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, L] int32, answer [N, L] bool): each trial's prompt of `length` bytes and its
    answer " K", encoded apart by `tokenizer` (default: bytes) and right-padded to the longest
    row (PAD, or EOS where the tokenizer has none); `answer` marks the answer's tokens.

    Key and depth are random per trial, drawn from (seed, length). With bytes every row is
    length + 1 + num_digits tokens, the answer the last 1 + num_digits."""
    tokenizer = tokenizer or tok.ByteTokenizer()
    rng = np.random.default_rng([seed, length, 0x9a55])
    rows = []
    for _ in range(trials):
        key = passkey_data.random_key(rng, num_digits)
        prompt, answer = passkey_data.make_prompt(length, key, float(rng.random()),
                                                  num_digits=num_digits, intro=intro)
        rows.append((tokenizer.encode(prompt), tokenizer.encode(answer)))
    width = max(len(p) + len(a) for p, a in rows)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.special("EOS")
    tokens = np.full((trials, width), pad, np.int32)
    is_answer = np.zeros((trials, width), bool)
    for i, (p, a) in enumerate(rows):
        tokens[i, :len(p) + len(a)] = np.concatenate([p, a])
        is_answer[i, len(p):len(p) + len(a)] = True
    return tokens, is_answer


def make_trials(length: int, trials: int, seed: int, *, num_digits: int = 5,
                intro: bool = False) -> np.ndarray:
    """tokens [N, length + 1 + num_digits] int32 (bytes): prompt of `length` bytes, then the
    answer " K" (`encode_trials` with the byte tokenizer)."""
    return encode_trials(length, trials, seed, num_digits=num_digits, intro=intro)[0]


def answer_correct(logits_NxTxV, tokens_NxT, prompt_len: int) -> np.ndarray:
    """bool [N]: the argmax at every answer position equals the next answer token."""
    logits = np.asarray(logits_NxTxV)
    pred = logits[:, prompt_len - 1:-1].argmax(-1)
    return np.all(pred == np.asarray(tokens_NxT)[:, prompt_len:], axis=-1)


def answers_correct(logits_NxTxV, tokens_NxT, answer_NxT) -> np.ndarray:
    """bool [N]: the argmax before every answer token (answer_NxT True) equals that token."""
    logits = np.asarray(logits_NxTxV)
    hit = logits[:, :-1].argmax(-1) == np.asarray(tokens_NxT)[:, 1:]
    return np.all(hit | ~np.asarray(answer_NxT)[:, 1:], axis=-1)


# ---------------------------------------------------------------------------------------------
# Scorers: tokens [N, T] → logits [N, T, V]
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model",))
def _full_logits(model, params, tokens_BxT):
    if isinstance(model, landmark.LandmarkLM):
        lc = model.config
        F = lc.mem_freq
        B, T = tokens_BxT.shape
        aug = landmark.insert_landmarks(tokens_BxT, F, lc.landmark_id)
        is_lm = jnp.broadcast_to(landmark.landmark_mask(aug.shape[1], F), aug.shape)
        logits = model.apply({"params": params}, aug, is_landmark=is_lm)
        raw = jnp.arange(T) + jnp.arange(T) // F            # where raw token t lands
        return jnp.take(logits, raw, axis=1)
    return model.apply({"params": params}, tokens_BxT)


def full_attention_logits(model, params, tokens, *, batch: int = 8) -> np.ndarray:
    """Logits [N, T, V] of plain full attention (a `Transformer`, or a `LandmarkLM` with landmarks
    inserted and dropped again), `batch` rows at a time."""
    out = [np.asarray(_full_logits(model, params, jnp.asarray(tokens[i:i + batch])))
           for i in range(0, len(tokens), batch)]
    return np.concatenate(out)


def memory_inference_logits(model, params, tokens, *, top_k: int = TOP_K, chunk_len: int = 128,
                            cache_blocks: Optional[int] = None, batch: int = 16,
                            selection: str = "per_token_and_head") -> np.ndarray:
    """Logits [N, T, V] of the official mem-cache inference (`memory_logits`)."""
    out = [np.asarray(landmark_memory.memory_logits(
               params, model.config, jnp.asarray(tokens[i:i + batch]), chunk_len=chunk_len,
               top_k=top_k, cache_blocks=cache_blocks, selection=selection))
           for i in range(0, len(tokens), batch)]
    return np.concatenate(out)


def passkey_accuracy(scorer, lengths: Sequence[int], trials: int, seed: int, *,
                     num_digits: int = 5, intro: bool = False,
                     tokenizer: Optional[tok.Tokenizer] = None) -> dict:
    """{length: accuracy} of `scorer(tokens [N, T]) -> logits [N, T, V]` (prompts of `length`
    bytes, encoded by `tokenizer`, default bytes)."""
    acc = {}
    for length in lengths:
        tokens, answer = encode_trials(length, trials, seed, num_digits=num_digits, intro=intro,
                                       tokenizer=tokenizer)
        acc[int(length)] = float(answers_correct(scorer(tokens), tokens, answer).mean())
    return acc


def evaluate_run(model, params, lengths, trials, seed, *, top_k: int = TOP_K,
                 chunk_len: int = 128, num_digits: int = 5, intro: bool = False,
                 methods: Optional[Sequence[str]] = None,
                 tokenizer: Optional[tok.Tokenizer] = None) -> dict:
    """{METHOD: {LENGTH: acc}} for one trained model: a LandmarkLM → landmark_memory and
    landmark_full; a Transformer → baseline. `tokenizer`: the model's (default bytes)."""
    params = jax.device_get(params)
    kw = dict(num_digits=num_digits, intro=intro, tokenizer=tokenizer)
    if isinstance(model, landmark.LandmarkLM):
        scorers = {"landmark_memory": functools.partial(
                       memory_inference_logits, model, params, top_k=top_k, chunk_len=chunk_len),
                   "landmark_full": functools.partial(full_attention_logits, model, params)}
    else:
        scorers = {"baseline": functools.partial(full_attention_logits, model, params)}
    return {m: passkey_accuracy(f, lengths, trials, seed, **kw) for m, f in scorers.items()
            if methods is None or m in methods}


# ---------------------------------------------------------------------------------------------
# Training the figure's runs
# ---------------------------------------------------------------------------------------------
def validate_size(size: str) -> None:
    """Checks the landmark_passkey figure at `size` before any training: phases in increasing
    step order with shortest prompts that fit the window, both runs' trainer configs and data,
    and evaluation lengths that hold a prompt. Raises a ValueError naming the field, its value
    and what is allowed."""
    sizes = landmark_configs.PASSKEY_SIZES
    if size not in sizes:
        raise ValueError(f"size={size!r} is not allowed; use one of {sorted(sizes)}")
    s, where = sizes[size], f"PASSKEY_SIZES[{size!r}]"
    if "shipped" in s:
        src_size, src_seed = s["shipped"]
        if src_size not in sizes or "shipped" in sizes[src_size]:
            raise ValueError(f"{where}.shipped={s['shipped']} is not allowed; name a size that "
                             "trains its own run")
        validate_size(src_size)
        check_shipped(size)
        c = landmark_configs.passkey_config(src_size, src_seed)
        shortest = passkey_data.fixed_length(c.data.num_digits, intro=c.data.intro)
        _check_evaluation(s, where, shortest, c.seq_len)
        return
    ends = [end for end, _ in s["phases"]]
    if not ends or ends[0] < 1 or any(b <= a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"{where}.phases={s['phases']} is not allowed; use one or more "
                         "(last step, shortest prompt) with last steps >= 1 and increasing")
    for phase in range(len(ends)):
        for baseline in (False, True):
            c = landmark_configs.passkey_config(size, 0, baseline=baseline, phase=phase)
            trainer.validate_config(c)
            trainer.build_model(c.model)
            pipeline.make_source(c.data, split="train", seq_len=c.seq_len)
    shortest = passkey_data.fixed_length(c.data.num_digits, intro=c.data.intro)
    full = c.seq_len - c.data.num_digits
    for _, min_length in s["phases"]:
        if min_length is not None and not shortest <= min_length <= full:
            raise ValueError(f"{where}.phases={s['phases']} is not allowed: a shortest prompt of "
                             f"{min_length} bytes must lie in {shortest}..{full} "
                             "(seq_len - digits)")
    _check_evaluation(s, where, shortest, c.seq_len)


def _check_evaluation(s: dict, where: str, shortest: int, seq_len: int) -> None:
    if not s["lengths"] or min(s["lengths"]) < shortest:
        raise ValueError(f"{where}.lengths={s['lengths']} is not allowed; every length must be "
                         f">= {shortest} bytes (the shortest prompt)")
    if s["trials"] < 1 or seq_len // 2 < 1:
        raise ValueError(f"{where}.trials={s['trials']}, seq_len={seq_len} are not allowed; "
                         "use trials >= 1 and seq_len >= 2 (memory chunks are seq_len // 2)")


def run_dir(size: str, seed: int, out: pathlib.Path, *, baseline: bool = False) -> pathlib.Path:
    """OUT/runs/NAME-SIZE-seedSEED-HASH, the folder of the figure's landmark (or baseline) run:
    HASH (train/config_identity.py: recipe_hash) covers every phase's config and end step, so a
    changed recipe trains into a new folder and a folder is only reused by its own recipe."""
    name = "landmark_baseline" if baseline else "landmark"
    h = config_identity.recipe_hash(
        landmark_configs.passkey_phase_configs(size, seed, baseline=baseline))
    return pathlib.Path(out) / "runs" / f"{name}-{size}-seed{seed}-{h}"


def train_or_reuse(size: str, seed: int, out: pathlib.Path, *, baseline: bool = False):
    """(config, params, model, workdir) of the figure's landmark (or baseline) run in `run_dir`
    (for a `shipped` size: the committed landmark run, and None for the baseline):
    trained with the shared trainer phase by phase (each phase resumes the previous one's final
    checkpoint; phases the run has already passed are skipped), or restored if it is finished.
    The trainer refuses a workdir whose run was trained under another config."""
    if "shipped" in landmark_configs.PASSKEY_SIZES[size]:
        return None if baseline else load_shipped(size)
    workdir = run_dir(size, seed, out, baseline=baseline)
    configs = landmark_configs.passkey_phase_configs(size, seed, baseline=baseline)
    done = None
    if (workdir / "checkpoints").exists():
        ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
        done = ckpt.latest_step()
        ckpt.close()
    for phase, c in enumerate(configs):
        if phase < len(configs) - 1 and done is not None and done >= c.num_steps:
            continue
        changes = landmark_configs.PASSKEY_PHASE_CHANGES if len(configs) > 1 else ()
        summary = trainer.train(c, workdir, devices=jax.devices()[:1], allow_changes=changes)
    return c, jax.device_get(summary["state"].params), summary["run"].model, workdir


# Committed runs that a `shipped` size evaluates instead of training (results/checkpoints/NAME,
# NAME = the run folder's name under the recipe's run_dir, so it carries the recipe hash).
REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED_DIR = REPO / "results" / "checkpoints"


def shipped_dir(size: str) -> pathlib.Path:
    """results/checkpoints/NAME: the committed landmark run of PASSKEY_SIZES[size]['shipped']
    (train/configs/landmark.py)."""
    src_size, src_seed = landmark_configs.PASSKEY_SIZES[size]["shipped"]
    return SHIPPED_DIR / run_dir(src_size, src_seed, pathlib.Path(".")).name


def check_shipped(size: str) -> dict:
    """The stored config of the committed run of `size`; a ValueError (one line) if it is missing
    or was trained under another recipe than the one that names it."""
    shipped = landmark_configs.PASSKEY_SIZES[size]["shipped"]
    src_size, src_seed = shipped
    workdir = shipped_dir(size)
    if not (workdir / "config.json").exists() or not (workdir / "checkpoints").exists():
        raise ValueError(
            f"PASSKEY_SIZES[{size!r}].shipped={shipped} names no committed run: "
            f"{workdir} is missing; train it with `python -m eval.figures --only "
            f"landmark_passkey --size {src_size} --seed {src_seed} --out OUT` and copy "
            f"OUT/runs/{workdir.name} there")
    stored = json.loads((workdir / "config.json").read_text())
    config_identity.check_compatible(stored, landmark_configs.passkey_config(src_size, src_seed),
                                     where=f"shipped run {workdir}")
    return stored


def shipped_title(size: str) -> str:
    """A figure title's second line naming the committed run a shipped size evaluates ("" for a
    size that trains its own)."""
    if "shipped" not in landmark_configs.PASSKEY_SIZES[size]:
        return ""
    src_size, src_seed = landmark_configs.PASSKEY_SIZES[size]["shipped"]
    return f"\nshipped checkpoint: {src_size} recipe, training seed {src_seed}"


def load_shipped(size: str):
    """(config, params, model, workdir) of the committed landmark run of `size`, restored on
    one device after `check_shipped`."""
    src_size, src_seed = landmark_configs.PASSKEY_SIZES[size]["shipped"]
    check_shipped(size)
    workdir = shipped_dir(size)
    _, params, model = trainer.restore_for_eval(workdir)
    config = landmark_configs.passkey_config(src_size, src_seed)
    return config, jax.device_get(params), model, workdir


def figure_settings(size: str) -> dict:
    """The figure's recipe at `size`: both runs' trainer configs per phase (seed 0) and the
    PASSKEY_SIZES entry; for a shipped size, the committed run's folder name (it carries the
    recipe hash) and the recipe that trained it."""
    s = landmark_configs.PASSKEY_SIZES[size]
    if "shipped" in s:
        return {"size": s, "top_k": TOP_K, "shipped_run": shipped_dir(size).name,
                "recipe": figure_settings(s["shipped"][0])}
    phases = landmark_configs.passkey_phase_configs(size, 0)
    baseline = landmark_configs.passkey_phase_configs(size, 0, baseline=True)
    return {"size": s, "top_k": TOP_K, "landmark": [c.to_dict() for c in phases],
            "baseline": [c.to_dict() for c in baseline]}


@figures.register("landmark_passkey", settings=figure_settings)
def landmark_passkey_figure(*, size: str, seed: int, out: pathlib.Path, **_) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate_size(size)
    out = pathlib.Path(out)
    s = landmark_configs.PASSKEY_SIZES[size]
    accuracy, seconds = {}, {}
    for baseline in (False, True):
        t0 = time.time()
        run = train_or_reuse(size, seed, out, baseline=baseline)
        if run is None:                    # a shipped size ships no baseline
            continue
        c, params, model, _ = run
        accuracy.update(evaluate_run(model, params, s["lengths"], s["trials"], seed + 1,
                                     chunk_len=c.seq_len // 2,
                                     num_digits=c.data.num_digits, intro=c.data.intro))
        seconds["baseline" if baseline else "landmark"] = round(time.time() - t0, 1)
    train_context = int(c.seq_len)
    methods = [m for m in METHODS if m in accuracy]
    rows = [(m, n, accuracy[m][n]) for m in methods for n in s["lengths"]]
    figures.write_csv(out / "landmark_passkey.csv", ["method", "prompt_length", "accuracy"], rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    labels = {"landmark_memory": f"landmark + memory (k={TOP_K})",
              "landmark_full": "landmark, full attention", "baseline": "transformer (baseline)"}
    for m, marker in zip(methods, "os^"):
        xs = list(s["lengths"])
        ax.plot(xs, [accuracy[m][n] for n in xs], marker=marker, label=labels[m])
    ax.axvline(train_context, color="gray", ls=":", label="training context")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="prompt length (tokens)", ylabel="passkey accuracy", ylim=(-0.02, 1.02),
           title=f"passkey retrieval ({s['trials']} trials per length, seed {seed})"
                 + shipped_title(size))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "landmark_passkey.png", dpi=120)
    plt.close(fig)
    numbers = {"train_context": train_context,
               "accuracy": {m: {str(n): a for n, a in accuracy[m].items()} for m in methods},
               "trials": s["trials"], "top_k": TOP_K, "seconds": seconds}
    if "shipped" in s:
        numbers["shipped_checkpoint"] = {"size": s["shipped"][0], "seed": s["shipped"][1],
                                         "path": str(shipped_dir(size).relative_to(REPO))}
    return numbers


def _official(a) -> dict:
    """--protocol official: the landmark run with memory, the base model with full attention."""
    from models import pretrained
    generators, tokenizer, base_dir = {}, None, a.base
    if a.workdir:
        config, params, model = trainer.restore_for_eval(a.workdir)
        tokenizer = tok.load_tokenizer(a.tokenizer or config.data.get("tokenizer", "byte"))
        if isinstance(model, landmark.LandmarkLM):
            generators["landmark_memory"] = lambda rows, n: passkey_official.memory_generate(
                model, params, rows, n, top_k=a.top_k or passkey_official.TOP_K,
                chunk_len=a.chunk_len or passkey_official.CHUNK_LEN, selection=a.selection)
        else:
            generators["base"] = lambda rows, n: passkey_official.full_generate(
                model, params, rows, n, pad_id=_pad(tokenizer))
    if base_dir:
        base_model, base_params = pretrained.from_hf(base_dir)
        if tokenizer is None:
            tokenizer = tok.load_tokenizer(a.tokenizer or pretrained.resolve(base_dir))
        if tokenizer.vocab_size > base_model.cfg.vocab_size:   # the run's added tokens (LANDMARK)
            base_params = pretrained.resize_params_vocab(base_params, tokenizer.vocab_size)
            base_model = type(base_model)(base_model.cfg.replace(
                vocab_size=tokenizer.vocab_size))
        generators["base"] = lambda rows, n: passkey_official.full_generate(
            base_model, base_params, rows, n, pad_id=_pad(tokenizer))
    lengths = ([int(x) for x in a.lengths.split(",")] if a.lengths
               else list(passkey_official.LENGTHS))
    res = passkey_official.run(generators, tokenizer, lengths=lengths,
                               trials=a.trials or passkey_official.TRIALS, seed=a.seed)
    return {"protocol": "official",
            "accuracy": {m: {str(n): v for n, v in accs.items()}
                         for m, accs in res["accuracy"].items()},
            "prompt_tokens": {str(n): v for n, v in res["prompt_tokens"].items()},
            "trials": a.trials or passkey_official.TRIALS, "seed": a.seed,
            "top_k": a.top_k or passkey_official.TOP_K,
            "chunk_len": a.chunk_len or passkey_official.CHUNK_LEN, "selection": a.selection,
            "workdir": a.workdir, "base": base_dir, "tokenizer": tokenizer.spec}


def _pad(tokenizer: tok.Tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.special("EOS")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Passkey retrieval accuracy of trained runs")
    p.add_argument("--protocol", default="figure", choices=("figure", "official"),
                   help="figure: byte-length prompts scored teacher-forced (the landmark_passkey "
                        "figure); official: the official LLaMA test (eval/passkey_official.py)")
    p.add_argument("--workdir", default=None, help="a landmark run (or a transformer run)")
    p.add_argument("--baseline_workdir", default=None, help="a plain transformer run to compare")
    p.add_argument("--base", default=None,
                   help="official: a Hugging Face weights directory scored with full attention")
    p.add_argument("--tokenizer", default=None,
                   help="official: the tokenizer spec (default: the run's data.tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", default=None,
                   help="comma-separated prompt lengths in tokens (figure; default "
                        "256,512,1024,2048) or filler lengths in characters (official; default "
                        "the official 0..38000)")
    p.add_argument("--trials", type=int, default=None, help="trials per length (default 50)")
    p.add_argument("--top_k", type=int, default=None,
                   help=f"blocks retrieved (default {TOP_K}; official {passkey_official.TOP_K})")
    p.add_argument("--chunk_len", type=int, default=None,
                   help="raw tokens per memory-inference chunk (default: half the training "
                        f"context; official {passkey_official.CHUNK_LEN})")
    p.add_argument("--selection", default="per_token_and_head",
                   choices=landmark_memory.SELECTIONS,
                   help="official: block selection (max_over_tokens: the official offload mode)")
    a = p.parse_args(argv)
    if a.protocol == "official":
        if not a.workdir and not a.base:
            raise ValueError("--protocol official needs --workdir RUN and/or --base HF_DIR")
        print(json.dumps(_official(a)))
        return 0
    if not a.workdir:
        raise ValueError("--workdir is required (a landmark or transformer run)")
    lengths = [int(x) for x in (a.lengths or "256,512,1024,2048").split(",")]
    trials = a.trials or 50
    top_k = a.top_k or TOP_K
    accuracy, train_context = {}, None
    for wd in [a.workdir] + ([a.baseline_workdir] if a.baseline_workdir else []):
        config, params, model = trainer.restore_for_eval(wd)
        train_context = train_context or int(config.seq_len)
        data = config.data
        accuracy.update(evaluate_run(
            model, params, lengths, trials, a.seed, top_k=top_k,
            chunk_len=a.chunk_len or max(int(config.seq_len) // 2, 1),
            num_digits=int(data.get("num_digits", 5)), intro=bool(data.get("intro", False)),
            tokenizer=tok.load_tokenizer(data.get("tokenizer", "byte"))))
    print(json.dumps({"train_context": train_context,
                      "accuracy": {m: {str(n): v for n, v in accs.items()}
                                   for m, accs in accuracy.items()},
                      "trials": trials, "seed": a.seed, "top_k": top_k,
                      "workdir": a.workdir, "baseline_workdir": a.baseline_workdir}))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
