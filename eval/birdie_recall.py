"""Birdie at CPU scale: multi-query recall with the queries stated after the pairs, and the
phone book. Registers the figures `birdie_recall` and `birdie_phonebook`.

    python -m eval.figures --only birdie_recall --size quick|cpu|paper --seed S --out DIR
    python -m eval.figures --only birdie_phonebook --size quick|cpu|paper --seed S --out DIR

`birdie_recall` (issue 4, item 8) is the phone book shrunk until it is learnable on 2 CPU cores:
single-token keys and values, P pairs, then the queried keys, then the answers (the task and its
generators: train/data/recall.py). Every arm is one run of the shared trainer
(train/configs/birdie.py: RECALL_SIZES, recall_config) on dataset "recall": rows packed with a
mixture of pair counts (the figure's x-axis) and the loss on the answers; it is scored by answer
accuracy (argmax at each answer position, the earlier answers teacher-forced) on held-out
examples at each pair count. The arms have (nearly) equal parameter counts and see the same
number of training tokens:

- `transformer_ntp`: the baseline causal Transformer (models/transformer.py), no prefix;
- `transformer_birdie`: the same Transformer with prefix-LM attention (the prompt attended
  bidirectionally, causal after it), trained like `gated_birdie` below;
- `gated_ntp`: a causal gated SSM (every layer causal), no prefix;
- `gated_bidir`: the same gated SSM with alternating bidirectional/causal layers, trained with the
  prefix-LM layout above (the prompt is the bidirectional prefix, the answers are generated);
- `gated_birdie`: the bidirectional gated SSM pre-trained on Birdie's objective mixture chosen by
  the reward-driven controller (the trainer hook of train/objectives/birdie_controller.py), over
  the key-value text with the recall task as one more action, for the first `pretrain_frac` of
  the steps, then fine-tuned on the recall task for the rest (the hook's `finetune_at`);
- `gated_birdie_causal`: the same schedule with the causal gated SSM;
- `gated_birdie_paper`: `gated_birdie` with the paper's controller (hook kind "paper",
  train/objectives/birdie_paper_controller.py: the sequence reward model, uniform warm-up, the
  paper's evaluation schedule, cosine exploration with a hold) in place of the simple one, its
  schedule the paper's steps / 10 at the CPU sizes (train/configs/birdie.py:
  RECALL_PAPER_CONTROLLER).

The state is small and fixed (`state_width` channels per layer, half of them reverse channels in a
bidirectional layer): a causal model has to store all P pairs in it, a bidirectional one only the Q
that the reverse half has already seen asked (Arora et al. 2024, "Just read twice"). The SSMs have
three blocks, causal–bidirectional–causal ('cbc'): the first marks the queried key (the token
after [SEP]), the bidirectional one carries it back over the pairs in its reverse half, the last
stores only the matching value; with the MLPs their parameter count matches the two-layer
Transformer's. The `quick` size (the demo) cycles 'bc' instead (bidirectional–causal–
bidirectional over three blocks): there the bidirectional model left the loss plateau sooner and
on every seed tried (RECALL_SIZES). Each arm's workdir is kept in
OUT/runs/birdie_recall-SIZE-seedS-ARM-HASH: a killed figure run resumes, a finished one is scored
again without training.

JSON: {"accuracy": {MODEL: {PAIRS: acc}}, "params": {MODEL: n}, "tokens": {MODEL: n}, ...}.

`birdie_phonebook` is the paper's Fig. 1 in its full text format (eval/phonebook.py): digit
accuracy against the number of queried names for `transformer_ntp`, `gated_ntp`, `gated_birdie`,
`gated_birdie_causal` and `hawk_birdie`. Each arm is two runs of the shared trainer
(`phonebook_run`; sizes and phase configs in train/configs/birdie.py: PHONEBOOK_SIZES,
phonebook_phases): pre-training on phone-book text (Birdie's objectives with the controller hook
for the Birdie models, next-token prediction for the NTP baselines), then fine-tuning on the
lookup task from the pre-trained parameters (init_from); the workdirs are kept and reused. At
`quick`/`cpu` size it runs a reduced book (few entries, few steps) and reports what it gets;
`paper` is sized for accelerators.
JSON: {"digit_accuracy": {MODEL: {QUERIES: acc}}, ...}.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from eval import figures, phonebook
from models import ssm
from train import config_identity, trainer
from train import metrics as metrics_lib
from train.configs import birdie as birdie_config
from train.configs.birdie import ARMS, RECALL_MODELS
from train.data import birdie_data
from train.data import phonebook as phonebook_data
from train.data import pipeline
from train.data.recall import RecallTask, pad_rows, recall_example
from train.objectives import birdie, birdie_controller
PHONEBOOK_MODELS = ("transformer_ntp", "gated_ntp", "gated_birdie", "gated_birdie_causal",
                    "hawk_birdie")


# ---------------------------------------------------------------------------------------------
# Training: one trainer run per arm
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Trained:
    name: str
    model: Any
    params: Any
    with_prefix: bool                # the model reads the prefix field
    num_params: int
    tokens: int                      # training tokens seen (rows × row_length × steps)
    losses: list                     # (step, train loss on answer/label tokens)
    mixtures: list                   # Birdie arm: (step, mixture [K + 1]) from step 0 on
    action_names: list
    seconds: float                   # this call's seconds (0-ish when the run was finished)
    workdir: pathlib.Path


def run_dir(size: str, name: str, seed: int, out: pathlib.Path) -> pathlib.Path:
    """OUT/runs/birdie_recall-SIZE-seedS-NAME-HASH (HASH: the arm's trainer config, so a changed
    recipe trains into a new folder; a finished run is reused, a killed one resumes)."""
    h = config_identity.recipe_hash([birdie_config.recall_config(size, name, seed)])
    return pathlib.Path(out) / "runs" / f"birdie_recall-{size}-seed{seed}-{name}-{h}"


def read_curves(workdir: pathlib.Path) -> tuple[list, list]:
    """(losses [(step, loss)], mixtures [(step, weights)]) from a run's metrics.jsonl; a row
    written again after a resume replaces the earlier one of its step."""
    losses, mixtures = {}, {}
    for row in metrics_lib.read_metrics(workdir):
        if "loss" in row:
            losses[row["step"]] = row["loss"]
        if row.get("event") == "birdie_controller":
            mixtures[row["step"]] = list(row["mixture"].values())
    return sorted(losses.items()), sorted(mixtures.items())


def train_run(config, workdir: pathlib.Path, name: str = "") -> Trained:
    """Trains a recall run (a `recall_config`) in `workdir` through the trainer, on one device,
    and reads its curves back; a finished run is only restored."""
    t0 = time.time()
    summary = trainer.train(config, workdir, devices=jax.devices()[:1])
    seconds = time.time() - t0
    params = jax.device_get(summary["state"].params)
    losses, mixtures = read_curves(workdir)
    names: list = []
    if "hooks" in config:
        hook = birdie_controller.make_hook(config.hooks.birdie_controller, config)
        names = list(hook.names)
        start = np.asarray(birdie_controller.uniform_mixture(hook.cfg)).tolist()
        mixtures = [(0, start)] + mixtures      # the controller's initial mixture
    return Trained(name or config.name, summary["run"].model, params,
                   bool(config.data.with_prefix),
                   sum(x.size for x in jax.tree_util.tree_leaves(params)),
                   config.batch_size * config.seq_len * config.num_steps, losses, mixtures, names,
                   seconds, pathlib.Path(workdir))


def train_arm(size: str, name: str, seed: int, out: pathlib.Path) -> Trained:
    """Trains arm `name` of the recall figure at `size` (train/configs/birdie.py:
    recall_config) in `run_dir(size, name, seed, out)`."""
    return train_run(birdie_config.recall_config(size, name, seed),
                     run_dir(size, name, seed, out), name)


def recall_accuracy(tr: Trained, task: RecallTask, num_pairs: int, *, examples: int, rows: int,
                    row_length: int, seed: int) -> float:
    """Answer accuracy (argmax at each answer position) on `examples` held-out examples."""
    rng = np.random.default_rng([seed, 3, num_pairs])
    exs = [recall_example(rng, task, num_pairs) for _ in range(examples)]
    packed = birdie.pack(exs, row_length)
    keep = ("inputs", "segment_ids") + (("prefix",) if tr.with_prefix else ())
    predict = _predict_fn(tr.model)
    correct = total = 0.0
    for s in range(0, packed["inputs"].shape[0], rows):
        b = pad_rows({k: v[s: s + rows] for k, v in packed.items()}, rows)
        pred = np.asarray(predict(tr.params, {k: jnp.asarray(b[k]) for k in keep}))
        w = b["weights"]
        correct += float(((pred == b["targets"]) * w).sum())
        total += float(w.sum())
    return correct / total


@functools.lru_cache(maxsize=16)
def _predict_fn(model):
    """(params, batch) → argmax tokens [B, T], jitted once per model (Linen modules compare by
    value); the batch holds the fields the model reads (birdie.packed_logits)."""
    return jax.jit(lambda p, b: jnp.argmax(birdie.packed_logits(model.apply, p, b), -1))


# ---------------------------------------------------------------------------------------------
# The birdie_recall figure
# ---------------------------------------------------------------------------------------------
def recall_table(size: str, seed: int, out: pathlib.Path, *,
                 models: Optional[Sequence[str]] = None) -> dict:
    """Trains every arm at `size` (RECALL_SIZES; default its `models`) into OUT/runs and
    measures accuracy at every pair count: the figure's numbers."""
    s = birdie_config.RECALL_SIZES[size]
    models = models or s.get("models", RECALL_MODELS)
    task = birdie_config.recall_task(size)
    acc, params, tokens, seconds, curves, mixtures = {}, {}, {}, {}, {}, {}
    for name in tqdm(models, desc="birdie_recall arms", unit="arm", leave=False):
        tr = train_arm(size, name, seed, out)
        acc[name] = {int(P): recall_accuracy(tr, task, P, examples=s["eval_examples"],
                                             rows=s["rows"], row_length=s["row_length"],
                                             seed=seed + 1000)
                     for P in s["pairs"]}
        params[name], tokens[name] = tr.num_params, tr.tokens
        seconds[name], curves[name] = round(tr.seconds, 1), tr.losses
        if tr.mixtures:
            mixtures[name] = {"actions": tr.action_names, "history": tr.mixtures}
        print(f"{name}: {acc[name]} ({tr.seconds:.0f}s, {tr.num_params} params)", flush=True)
    return {"accuracy": acc, "no_binding_baseline": {int(P): no_binding_baseline(
                task, P, examples=s["eval_examples"], seed=seed + 1000) for P in s["pairs"]},
            "params": params, "tokens": tokens, "train_seconds": seconds,
            "loss_curves": curves, "mixtures": mixtures,
            "task": dataclasses.asdict(task), "chance": 1.0 / (task.value_range[1]
                                                              - task.value_range[0])}


def no_binding_baseline(task: RecallTask, num_pairs: int, *, examples: int, seed: int) -> float:
    """Expected accuracy of answering with a uniformly random value of the prompt's pairs (the
    plateau of a model that has learned to copy a value but not which key it belongs to), on
    the same held-out examples as `recall_accuracy`."""
    rng = np.random.default_rng([seed, 3, num_pairs])
    hits = []
    for _ in range(examples):
        ex = recall_example(rng, task, num_pairs)
        prompt, target = birdie.split_example(ex)
        off = 1 + (task.num_queries + 1 if task.queries_before else 0)
        values = prompt[off: off + 2 * num_pairs][1::2]
        hits += [float(np.mean(values == t)) for t in target]
    return float(np.mean(hits))


def figure_settings(size: str) -> dict:
    """The birdie_recall recipe at `size`, hashed into provenance: its RECALL_SIZES entry and
    every arm's trainer config (at seed 0; the seed is recorded beside the hash)."""
    s = birdie_config.RECALL_SIZES[size]
    return {"size": s, "runs": {m: birdie_config.recall_config(size, m, 0)
                                for m in s.get("models", RECALL_MODELS)}}


@figures.register("birdie_recall", settings=figure_settings)
def birdie_recall_figure(*, size: str, seed: int, out: pathlib.Path, **_) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate_size(size)
    out = pathlib.Path(out)
    s = birdie_config.RECALL_SIZES[size]
    models = s.get("models", RECALL_MODELS)
    res = recall_table(size, seed, out, models=models)
    pairs = s["pairs"]
    rows = [(m, P, res["accuracy"][m][P], res["params"][m], res["tokens"][m])
            for m in models for P in pairs]
    figures.write_csv(out / "birdie_recall.csv", ["model", "pairs", "accuracy", "params",
                                                  "train_tokens"], rows)
    mixed = [m for m in ("gated_birdie", "gated_birdie_paper") if res["mixtures"].get(m)]
    fig, ax = plt.subplots(1, 1 + max(len(mixed), 1), figsize=(5 + 5 * max(len(mixed), 1), 3.6))
    for m in models:
        ax[0].plot(pairs, [res["accuracy"][m][P] for P in pairs], "o-", label=m)
    ax[0].axhline(res["chance"], color="gray", ls=":", label="chance")
    ax[0].plot(pairs, [res["no_binding_baseline"][P] for P in pairs], "k--", lw=1,
               label="a random value of the prompt")
    ax[0].set(xlabel="key-value pairs in the prompt", ylabel="answer accuracy", ylim=(0, 1.02),
              xscale="log", title=f"recall, queries after the pairs ({size})")
    ax[0].minorticks_off()
    ax[0].set_xticks(pairs, [str(P) for P in pairs])
    ax[0].legend(fontsize=7)
    for i, m in enumerate(mixed):
        mix = res["mixtures"][m]
        steps = [h[0] for h in mix["history"]]
        weights = np.array([h[1] for h in mix["history"]])
        groups: dict[str, np.ndarray] = {}
        for j, a in enumerate(mix["actions"]):
            g = a.split("_r")[0] if a.startswith(("infilling", "autoencoding")) else a
            groups[g] = groups.get(g, 0) + weights[:, j]
        ax[1 + i].stackplot(steps, *groups.values(), labels=list(groups), step="post")
        ax[1 + i].set(xlabel="step", ylabel="mixture weight", ylim=(0, 1),
                      title=f"{m}: the controller's mixture")
        ax[1 + i].legend(fontsize=6, loc="upper right")
    if not mixed:
        ax[1].axis("off")
    fig.tight_layout()
    fig.savefig(out / "birdie_recall.png", dpi=120)
    plt.close(fig)
    res["accuracy"] = {m: {str(P): a for P, a in d.items()} for m, d in res["accuracy"].items()}
    res["no_binding_baseline"] = {str(P): a for P, a in res["no_binding_baseline"].items()}
    return res


# ---------------------------------------------------------------------------------------------
# The birdie_phonebook figure (the paper's Fig. 1, full text format)
# ---------------------------------------------------------------------------------------------
def _check_common(s: dict, where: str) -> None:
    """The size fields both Birdie figures share (`where` names the table and size)."""
    for name in ("width", "state_width", "num_layers", "num_heads", "steps", "rows",
                 "row_length", "eval_examples", "controller_every"):
        v = s[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}.{name}={v!r} is not allowed; use an integer >= 1")
    if s["width"] % s["num_heads"]:
        raise ValueError(f"{where}.width={s['width']} is not allowed; it must be divisible by "
                         f"num_heads={s['num_heads']}")
    if not 0.0 <= s["pretrain_frac"] < 1.0:
        raise ValueError(f"{where}.pretrain_frac={s['pretrain_frac']} is not allowed; use "
                         "0 <= f < 1 (the task phase needs steps)")
    if not s["lr"] > 0:
        raise ValueError(f"{where}.lr={s['lr']} is not allowed; use lr > 0")


def validate_size(size: str) -> None:
    """Checks both figures of this module at `size` before any training: `birdie_recall`'s
    RECALL_SIZES[size] (the task's ranges, every pair count against the key range, the longest
    example against row_length, the models' configs) and `birdie_phonebook`'s PHONEBOOK_SIZES[size]
    (queries within entries, the longest phone-book example against row_length). Raises a
    ValueError naming the field, its value and what is allowed."""
    for table, name in ((birdie_config.RECALL_SIZES, "RECALL_SIZES"),
                        (birdie_config.PHONEBOOK_SIZES, "PHONEBOOK_SIZES")):
        if size not in table:
            raise ValueError(f"size={size!r} is not allowed; {name} has {sorted(table)}")
    s, where = birdie_config.RECALL_SIZES[size], f"RECALL_SIZES[{size!r}]"
    _check_common(s, where)
    task = RecallTask(**s["task"])
    for field in ("pairs", "train_pairs"):
        for P in s.get(field, s["pairs"]):
            try:
                task.check_pairs(P)
            except ValueError as e:
                raise ValueError(f"{where}.{field}={tuple(s.get(field, s['pairs']))}: "
                                 f"{e}") from None
            if task.length(P) > s["row_length"]:
                raise ValueError(f"{where}.{field}={tuple(s.get(field, s['pairs']))} is not "
                                 f"allowed: {P} pairs make examples of {task.length(P)} tokens > "
                                 f"row_length={s['row_length']}")
    if set(s.get("bidir_pattern", "bc")) - {"b", "c"}:
        raise ValueError(f"{where}.bidir_pattern={s['bidir_pattern']!r} is not allowed; use the "
                         "letters 'b' and 'c'")
    models = s.get("models", RECALL_MODELS)
    if not models or set(models) - set(ARMS):
        raise ValueError(f"{where}.models={models!r} is not allowed; use a non-empty subset of "
                         f"{sorted(ARMS)}")
    for name in models:
        c = birdie_config.recall_config(size, name, 0)
        trainer.validate_config(c)
        trainer.build_model(c.model)        # the model configs check themselves
        trainer.build_hooks(c)              # the controller's settings check themselves
        pipeline.make_source(c.data, split="train", seq_len=c.seq_len)   # the data's
    s, where = birdie_config.PHONEBOOK_SIZES[size], f"PHONEBOOK_SIZES[{size!r}]"
    for field in ("entries", "train_entries"):
        lo, hi = s[field]
        if not 1 <= lo <= hi:
            raise ValueError(f"{where}.{field}={tuple(s[field])} is not allowed; use (lo, hi) "
                             "with 1 <= lo <= hi")
    fewest = min(s["entries"][0], s["train_entries"][0])
    if not s["queries"] or not 1 <= min(s["queries"]) <= max(s["queries"]) <= fewest:
        raise ValueError(f"{where}.queries={tuple(s['queries'])} is not allowed; use "
                         f"1..entries={fewest}")
    for field in ("finetune_steps", "finetune_rows", "row_length", "eval_examples"):
        if not (isinstance(s[field], int) and s[field] >= 1):
            raise ValueError(f"{where}.{field}={s[field]!r} is not allowed; use an int >= 1")
    if not s["finetune_lr"] > 0:
        raise ValueError(f"{where}.finetune_lr={s['finetune_lr']} is not allowed; use > 0")
    if s["tokenizer"] == "byte":   # other tokenizers: BirdieSource checks each book as it is made
        most = max(s["entries"][1], s["train_entries"][1])
        longest = phonebook_data.max_example_length(most, max(s["queries"]))
        if longest > s["row_length"]:
            raise ValueError(f"{where}.row_length={s['row_length']} is not allowed: a book of "
                             f"{most} entries with {max(s['queries'])} queries makes "
                             f"examples of up to {longest} tokens")
    if size != "paper":
        total = s["pretrain_steps"] + s["finetune_steps"]
        _check_common(dict(s, steps=total, pretrain_frac=s["pretrain_steps"] / total), where)
    for name in PHONEBOOK_MODELS:
        for c in birdie_config.phonebook_phases(size, name, 0, tokenizer=s["tokenizer"] or "byte"):
            trainer.validate_config(c)
            trainer.build_model(c.model)    # the model configs check themselves


def phonebook_figure_settings(size: str) -> dict:
    """The birdie_phonebook recipe at `size` (train/configs/birdie.py PHONEBOOK_SIZES entry),
    hashed into provenance."""
    return birdie_config.PHONEBOOK_SIZES[size]


def phonebook_run(size: str, name: str, seed: int, out: pathlib.Path, *,
                  tokenizer: str | None = None, tfds_name: str = ""):
    """Trains arm `name` of the phone-book figure through the trainer, pre-training then
    fine-tuning (train/configs/birdie.py: phonebook_phases; tokenizer, tfds_name: see there), in
    OUT/runs/birdie_phonebook-SIZE-seedS-NAME-HASH/{pretrain,finetune} (HASH: the phases'
    recipe, so a changed recipe trains into a new folder; a finished run is reused). Returns
    (model, params) of the fine-tuned run."""
    pre, tune = birdie_config.phonebook_phases(size, name, seed, tokenizer=tokenizer,
                                               tfds_name=tfds_name)
    h = config_identity.recipe_hash([pre, tune])
    root = pathlib.Path(out) / "runs" / f"birdie_phonebook-{size}-seed{seed}-{name}-{h}"
    one = jax.devices()[:1]
    trainer.train(pre, root / "pretrain", devices=one)
    tune.init_from = str(root / "pretrain")
    summary = trainer.train(tune, root / "finetune", devices=one)
    return summary["run"].model, jax.device_get(summary["state"].params)


# Not in the demo: at a demo's minutes no model reads a phone book (every quick run scored
# 0.0); `--size cpu` or `--only birdie_phonebook --size quick` still run it.
@figures.register("birdie_phonebook", settings=phonebook_figure_settings, in_demo=False)
def birdie_phonebook_figure(*, size: str, seed: int, out: pathlib.Path,
                            tokenizer: str | None = None, tfds_name: str = "", **_) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate_size(size)
    out = pathlib.Path(out)
    s = birdie_config.PHONEBOOK_SIZES[size]
    tokenizer = tokenizer or s["tokenizer"]
    acc, exact, nparams = {}, {}, {}
    for name in PHONEBOOK_MODELS:
        model, params = phonebook_run(size, name, seed, out, tokenizer=tokenizer,
                                      tfds_name=tfds_name)
        model_fn = phonebook.model_fn_for(model)
        if isinstance(model, ssm.BiSSMLM) and not ARMS[name].bidirectional:
            # a causal SSM has no prefix: the same model sees every position as generated
            inner = model_fn
            model_fn = lambda p, t, sg, pre: inner(p, t, sg, jnp.zeros_like(pre))  # noqa: E731
        acc[name], exact[name] = {}, {}
        for q in s["queries"]:
            r = phonebook.evaluate(model_fn, params, seed=seed + 1000,
                                   entries=tuple(s["entries"]), queries=q,
                                   examples=s["eval_examples"],
                                   batch_size=min(8, s["eval_examples"]),
                                   tokenizer=birdie_data.eval_tokenizer(tokenizer))
            acc[name][str(q)], exact[name][str(q)] = r["digit_accuracy"], r["exact_match"]
        nparams[name] = sum(x.size for x in jax.tree_util.tree_leaves(params))
        print(f"{name}: digit accuracy {acc[name]}", flush=True)
    figures.write_csv(out / "birdie_phonebook.csv", ["model", "queries", "digit_accuracy",
                                                     "exact_match"],
                      [(m, q, acc[m][str(q)], exact[m][str(q)]) for m in PHONEBOOK_MODELS
                       for q in s["queries"]])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m in PHONEBOOK_MODELS:
        ax.plot(s["queries"], [acc[m][str(q)] for q in s["queries"]], "o-", label=m)
    ax.axhline(0.1, color="gray", ls=":", label="chance (10%)")
    ax.set(xlabel="phone numbers asked", ylabel="digit accuracy", ylim=(0, 1.02),
           title=f"phone book, {s['entries'][0]}–{s['entries'][1]} entries ({size})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "birdie_phonebook.png", dpi=120)
    plt.close(fig)
    return {"digit_accuracy": acc, "exact_match": exact, "params": nparams,
            "entries": list(s["entries"]), "train_entries": list(s["train_entries"]),
            "pretrain_steps": s["pretrain_steps"] or birdie_config.get_config("paper").num_steps,
            "finetune_steps": s["finetune_steps"]}
