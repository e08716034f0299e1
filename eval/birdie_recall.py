"""Birdie at CPU scale: multi-query recall with the queries stated after the pairs, and the
phone book. Registers the figures `birdie_recall` and `birdie_phonebook`.

    python -m eval.figures --only birdie_recall --size quick|cpu|paper --seed S --out DIR
    python -m eval.figures --only birdie_phonebook --size quick|cpu|paper --seed S --out DIR

`birdie_recall` (issue 4, item 8) is the phone book shrunk until it is learnable on 2 CPU cores:
single-token keys and values, P pairs, then the queried keys, then the answers (the task, its
generators and the arms' objective mixtures: train/data/recall.py). Every model is trained on a
mixture of pair counts (the figure's x-axis) packed into fixed rows (`birdie.pack`) with the loss
on the answers, and is scored by answer accuracy (argmax at each answer position, the earlier
answers teacher-forced) on held-out examples at each pair count. The models have (nearly) equal
parameter counts and see the same number of training tokens:

- `transformer_ntp`: the baseline causal Transformer (models/transformer.py), no prefix;
- `gated_ntp`: a causal gated SSM (every layer causal), no prefix;
- `gated_bidir`: the same gated SSM with alternating bidirectional/causal layers, trained with the
  prefix-LM layout above (the prompt is the bidirectional prefix, the answers are generated);
- `gated_birdie`: the bidirectional gated SSM pre-trained on Birdie's objective mixture chosen by
  the reward-driven controller (train/objectives/birdie_controller.py), over the key-value text
  with the recall task as one more action, for the first `pretrain_frac` of the steps, then
  fine-tuned on the recall task for the rest;
- `gated_birdie_causal`: the same schedule with the causal gated SSM.

The state is small and fixed (`state_width` channels per layer, half of them reverse channels in a
bidirectional layer): a causal model has to store all P pairs in it, a bidirectional one only the Q
that the reverse half has already seen asked (Arora et al. 2024, "Just read twice"). The SSMs have
three blocks, causal–bidirectional–causal ('cbc'): the first marks the queried key (the token
after [SEP]), the bidirectional one carries it back over the pairs in its reverse half, the last
stores only the matching value; with the MLPs their parameter count matches the two-layer
Transformer's. The `quick` size (the demo) cycles 'bc' instead, as train/configs/birdie.py does
(bidirectional–causal–bidirectional over three blocks): there the bidirectional model left the
loss plateau sooner and on every seed tried (see SIZES).

Training still uses a small self-contained jitted loop with the one optimizer factory
(`train.optim.make_optimizer`: AdamW, warm-up + cosine) rather than the shared trainer
(train/trainer.py). The trainer now runs Birdie's controller as a hook (train/configs/birdie.py),
but this figure's Birdie arms also have the task as one of the controller's actions and switch
to fine-tuning on it partway, which the trainer's configs do not express yet (issue 16).

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

import collections
import dataclasses
import functools
import itertools
import pathlib
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from eval import figures, phonebook
from models import layers, ssm
from models.transformer import Transformer, TransformerConfig
from train import config_identity, optim, trainer
from train.configs import birdie as birdie_config
from train.configs import common
from train.data import phonebook as phonebook_data
from train.data.recall import (ObjectiveMixture, RecallTask, pad_rows, recall_example,
                               recall_mixture)
from train.data import tokenizer as tok
from train.objectives import birdie
from train.objectives import birdie_controller as ctl
from train.objectives.lm import token_losses

RECALL_MODELS = ("transformer_ntp", "gated_ntp", "gated_bidir", "gated_birdie",
                 "gated_birdie_causal")
PHONEBOOK_MODELS = ("transformer_ntp", "gated_ntp", "gated_birdie", "gated_birdie_causal",
                    "hawk_birdie")


# ---------------------------------------------------------------------------------------------
# Sizes and models
# ---------------------------------------------------------------------------------------------
# Width-64 models: every model's embedding, untied head and (Transformer) weight matrices start at
# N(0, 0.125²) ≈ N(0, 1/D) instead of the 0.02 that suits D ≈ 768, with no weight decay. With
# the 0.02 init the models sat on the "random value from the prompt" plateau (the Transformer
# solved 2 pairs after 12k steps, never 8 in 24k); with this init the binding is learned within a
# few thousand steps (README, Birdie section).
_SMALL = dict(init_std=0.125, tie_embeddings=False, weight_decay=0.0)

SIZES: dict[str, dict[str, Any]] = {
    # task: RecallTask fields. pairs: the x-axis; train_pairs: the pair counts mixed in training.
    # rows × row_length tokens per step for `steps` steps, the same for every model.
    # SSMs: `ssm_layers` blocks cycling `bidir_pattern`, MLP `ssm_mlp` wide (parameters matched
    # to the `num_layers`-layer Transformer, `transformer_mlp` wide, default 4·width); the Birdie
    # arms pre-train for `pretrain_frac`. init_std / tie_embeddings / weight_decay: see _SMALL
    # (defaults 0.02 / True / 0.01).
    # quick (the demo): the paper's claim only, causal vs bidirectional gated SSM, 3,000 steps
    # at lr 2e-3, blocks 'bc' cycled (b-c-b, the trainer config's pattern). With 'cbc' the
    # bidirectional model's escape from the loss plateau (~0.8) depended on the seed: step
    # ~1,000 on seed 0, ~1,400 on seed 5, never within 3,000 on seed 13 (gap 0.043). With 'bc'
    # it left by step 750 / 975 / 1,150 on seeds 0 / 5 / 13 (1.0 at 2 / 4 / 6 pairs on each).
    # Not the levers on seed 13 (cbc): lr 3e-3 / 4e-3, rows 8 × 6,000 steps, no 1-pair
    # examples, a distinct query form; init std 0.05 left at ~2,150. `models`: the arms trained.
    "quick": dict(task=dict(num_queries=1, key_range=(0, 8), value_range=(64, 72),
                            query_offset=0),
                  pairs=(2, 4, 6), train_pairs=(1, 2, 4, 6), width=64, state_width=32,
                  num_layers=2, num_heads=4, ssm_layers=3, bidir_pattern="bc", ssm_mlp=176,
                  steps=3000, rows=24, row_length=64, lr=2e-3, eval_examples=256,
                  controller_every=50, pretrain_frac=0.5, models=("gated_ntp", "gated_bidir"),
                  **_SMALL),
    # cpu: the Birdie arms pre-train for the first quarter; with half, the 3,000 fine-tuning
    # steps (the decayed half of the schedule) did not leave the plateau (README). Up to 6 pairs
    # and 24 rows: at 8 pairs, or with 16 rows, the Transformer's escape from the plateau
    # depended on the seed (README, "Why 6 pairs and 24 rows").
    "cpu": dict(task=dict(num_queries=1, key_range=(0, 8), value_range=(64, 72),
                          query_offset=0),
                pairs=(2, 4, 6), train_pairs=(1, 2, 4, 6), width=64, state_width=32,
                num_layers=2, num_heads=4, ssm_layers=3, bidir_pattern="cbc", ssm_mlp=176,
                steps=6000, rows=24, row_length=64, lr=1e-3, eval_examples=512,
                controller_every=100, pretrain_frac=0.25, **_SMALL),
    "paper": dict(task=dict(num_queries=4, key_range=(0, 128), value_range=(128, 192),
                            query_offset=0),
                  pairs=(16, 32, 64, 96, 128), train_pairs=(8, 16, 32, 64, 96, 128),
                  width=512, state_width=256, num_layers=4, num_heads=8, ssm_layers=6,
                  bidir_pattern="cbc", ssm_mlp=1408, steps=20000, rows=64, row_length=1024,
                  lr=1e-3, eval_examples=2048, controller_every=500, pretrain_frac=0.5),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str             # "transformer" | "ssm"
    bidirectional: bool     # SSM: bidir_pattern (True) or all 'c'; True: gets the prefix
    mixer: str = "gated"    # SSM mixer
    birdie: bool = False    # pre-train on the controller's objective mixture, then fine-tune


SPECS = {
    "transformer_ntp": ModelSpec("transformer", False),
    "gated_ntp": ModelSpec("ssm", False),
    "gated_bidir": ModelSpec("ssm", True),
    "gated_birdie": ModelSpec("ssm", True, birdie=True),
    "gated_birdie_causal": ModelSpec("ssm", False, birdie=True),
    "hawk_birdie": ModelSpec("ssm", True, mixer="hawk", birdie=True),
}


def build_model(name: str, s: dict):
    """The Linen LM of model `name` at size dict `s`.

    The Transformer has `num_layers` layers (attention 4·D² + MLP 8·D² each). SSMs have
    `ssm_layers` (default num_layers) recurrent blocks of state width `state_width`, each followed
    by a GELU MLP of `ssm_mlp` (default 4·D) so that parameter counts match; bidirectional SSMs
    cycle `bidir_pattern` ('b' bidirectional, 'c' causal), causal ones are all 'c'."""
    spec = SPECS[name]
    if spec.family == "transformer":
        return Transformer(TransformerConfig(
            vocab_size=tok.VOCAB_SIZE, width=s["width"], num_layers=s["num_layers"],
            num_heads=s["num_heads"], mlp_hidden=s.get("transformer_mlp"), rope_interleaved=False,
            init_std=s.get("init_std", layers.DEFAULT_INIT_STD),
            tie_embeddings=s.get("tie_embeddings", True)))
    return ssm.BiSSMLM(ssm.SSMConfig(
        vocab_size=tok.VOCAB_SIZE, width=s["width"], state_width=s["state_width"],
        num_layers=s.get("ssm_layers", s["num_layers"]), mixer=spec.mixer,
        layer_pattern=s.get("bidir_pattern", "bc") if spec.bidirectional else "c",
        mlp_hidden=s.get("ssm_mlp", 4 * s["width"]),
        hawk_heads=4 if spec.mixer == "hawk" else 1,
        init_std=s.get("init_std", layers.DEFAULT_INIT_STD),
        tie_embeddings=s.get("tie_embeddings", True)))


def apply_fn(model, spec: ModelSpec):
    """(params, batch) → logits [B,T,V]: SSMs read segment ids and (bidirectional) the prefix;
    the Transformer gets segment ids only (it has no prefix)."""
    if spec.family == "transformer":
        return lambda p, b: model.apply({"params": p}, b["inputs"], segment_ids=b["segment_ids"])
    if spec.bidirectional:
        return lambda p, b: model.apply({"params": p}, b["inputs"], segment_ids=b["segment_ids"],
                                        prefix=b["prefix"])
    return lambda p, b: model.apply({"params": p}, b["inputs"], segment_ids=b["segment_ids"])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Trained:
    name: str
    model: Any
    params: Any
    spec: ModelSpec
    num_params: int
    tokens: int                      # training tokens seen (rows × row_length × steps)
    losses: list                     # (step, train loss on answer/label tokens)
    mixtures: list                   # Birdie arm: (step, mixture [K]) at each controller update
    action_names: list
    seconds: float


# Batches are packed in Python between training steps, PACK_CHUNK at a time while the device is
# idle. Packing on a thread beside the steps was slower on 2 cores, where XLA's threads use both:
# the recall task phase took 45–48 ms a step, against 34 ms with the batches ready.
PACK_CHUNK = 500


class TaskBatches:
    """Task-phase batches [i] for i in 0..n-1, packed on first use from a fresh generator
    seeded like `train_model`'s and kept: the arms that train on the task from step 0 with the
    same seed see the same batches, so a figure packs them once for all of them."""

    def __init__(self, mixture: "ObjectiveMixture", seed: int, rows: int, n: int):
        rng = train_rng(seed)
        self._pack = lambda: _model_batch(mixture.task_batch(rng, rows))
        self._items: list[dict] = []
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"batch {i} of {self.n}")
        while len(self._items) <= i:
            self._items.append(self._pack())
        return self._items[i]


def train_rng(seed: int) -> np.random.Generator:
    """The generator `train_model` draws its batches from."""
    return np.random.default_rng([seed, 1])


def _model_batch(batch: dict) -> dict:
    keep = ("inputs", "targets", "weights", "prefix", "segment_ids")
    return {k: jnp.asarray(batch[k]) for k in keep}


def train_model(name: str, s: dict, mixture: ObjectiveMixture, seed: int, *,
                pretrain_frac: float = 0.0, controller: bool = False,
                log: bool = True, task_batches: Optional[TaskBatches] = None) -> Trained:
    """Trains model `name` with AdamW: the first `pretrain_frac` of the steps on `mixture`
    (the reward-driven controller choosing the weights if `controller`, else uniform per class),
    the rest on its task (the mixture's last action). task_batches: the task batches of a run
    without pre-training, shared with other arms (else packed here)."""
    spec = SPECS[name]
    model = build_model(name, s)
    fwd = apply_fn(model, spec)
    rows, T, steps = s["rows"], s["row_length"], s["steps"]
    key = jax.random.key(seed)
    params = layers.unbox(jax.jit(model.init)(key, jnp.zeros((1, T), jnp.int32))["params"])
    # the trainer's optimizer (AdamW, warm-up over 5 % of the steps, cosine to lr/10, clip 1.0)
    tx, _ = optim.make_optimizer(common.optim(
        lr=s["lr"], warmup_steps=max(steps // 20, 1), b2=0.98,
        weight_decay=s.get("weight_decay", 0.01)), steps)
    opt = tx.init(params)

    def loss_fn(p, b):
        ce, _ = token_losses(fwd(p, b), b["targets"])
        w = b["weights"]
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def train_step(p, o, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    rng = train_rng(seed)
    K = mixture.num_actions
    pretrain = int(round(steps * pretrain_frac))
    if task_batches is not None and (pretrain or len(task_batches) != steps):
        raise ValueError(f"task_batches ({len(task_batches)} batches) can only replace the "
                         f"whole run's draws: pretrain_frac={pretrain_frac} must be 0 and "
                         f"steps={steps}")
    weights = np.asarray(birdie.uniform_mixture(mixture.objectives).tolist() + [0.0])
    mixtures, losses = [], []
    if controller and pretrain:
        ccfg = ctl.ControllerConfig(group_sizes=mixture.group_sizes, total_steps=pretrain,
                                    eval_every=s["controller_every"], history=64, hidden=32,
                                    train_steps=100, num_candidates=512)
        cstate = ctl.controller_init(ccfg, jax.random.key(seed + 7))
        val = [dict(_model_batch(b), oid=jnp.asarray(b["objective_ids"])) for b in
               mixture.validation(np.random.default_rng([seed, 2]), 4, rows)]

        @jax.jit
        def val_losses(p, b):
            return birdie.per_objective_losses(fwd(p, b), {**b, "objective_ids": b["oid"]}, K)

        weights = np.asarray(cstate.mixture)
        mixtures.append((0, weights.tolist()))

    def stretch(first: int):
        """(batches for steps first.., the step where the mixture next changes). They depend
        only on the mixture, not on the training state."""
        if first >= pretrain:
            if task_batches is not None:
                return iter(task_batches), steps
            return (_model_batch(mixture.task_batch(rng, rows))
                    for _ in range(steps - first)), steps
        until = pretrain
        if controller:
            until = next((u for u in range(first + 1, pretrain) if ctl.should_update(ccfg, u)),
                         pretrain)
        w = weights
        return (_model_batch(mixture.batch(rng, w, rows)) for _ in range(until - first)), until

    t0 = time.time()
    until, ready = 0, collections.deque()
    bar = tqdm(total=steps, desc=name, unit="step", leave=False, disable=not log,
               dynamic_ncols=True)
    for step in range(steps):
        if step == until:
            batches, until = stretch(step)
        if not ready:   # pack the next chunk while the device is idle (PACK_CHUNK)
            jax.block_until_ready(params)
            ready.extend(itertools.islice(batches, PACK_CHUNK))
        batch = ready.popleft()
        params, opt, loss = train_step(params, opt, batch)
        if controller and step < pretrain and ctl.should_update(ccfg, step + 1):
            tot, cnt = np.zeros(K), np.zeros(K)
            for b in val:
                m, c = jax.device_get(val_losses(params, b))
                tot += m * c
                cnt += c
            cstate = ctl.controller_update(ccfg, cstate, tot / np.maximum(cnt, 1), step + 1)
            weights = np.asarray(cstate.mixture)
            mixtures.append((step + 1, weights.tolist()))
        if step % 25 == 0 or step == steps - 1:
            losses.append((step, float(loss)))
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        bar.update(1)
    bar.close()
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return Trained(name, model, params, spec, n, rows * T * steps, losses, mixtures,
                   mixture.names, time.time() - t0)


def train_recall_model(name: str, s: dict, task: RecallTask, seed: int, *,
                       log: bool = True, task_batches: Optional[TaskBatches] = None) -> Trained:
    """A recall-figure arm: NTP/bidir arms train on the task throughout; Birdie arms spend the
    first `s['pretrain_frac']` of the same steps on the controller's objective mixture over the
    key-value text (the task one of its actions), then fine-tune on the task. task_batches:
    `recall_task_batches(s, task, seed)`, shared by the arms without pre-training."""
    spec = SPECS[name]
    return train_model(name, s, _recall_mixture_at(s, task), seed,
                       pretrain_frac=s["pretrain_frac"] if spec.birdie else 0.0,
                       controller=spec.birdie, log=log,
                       task_batches=None if spec.birdie else task_batches)


def _recall_mixture_at(s: dict, task: RecallTask) -> ObjectiveMixture:
    return recall_mixture(task, s.get("train_pairs", s["pairs"]), s["row_length"])


def recall_task_batches(s: dict, task: RecallTask, seed: int) -> TaskBatches:
    """The task batches every arm without pre-training draws at size `s` and `seed`."""
    return TaskBatches(_recall_mixture_at(s, task), seed, s["rows"], s["steps"])


def recall_accuracy(tr: Trained, task: RecallTask, num_pairs: int, *, examples: int, rows: int,
                    row_length: int, seed: int) -> float:
    """Answer accuracy (argmax at each answer position) on `examples` held-out examples."""
    rng = np.random.default_rng([seed, 3, num_pairs])
    exs = [recall_example(rng, task, num_pairs) for _ in range(examples)]
    packed = birdie.pack(exs, row_length)
    fwd = _predict_fn(tr)
    correct = total = 0.0
    for s in range(0, packed["inputs"].shape[0], rows):
        b = pad_rows({k: v[s: s + rows] for k, v in packed.items()}, rows)
        pred = np.asarray(fwd(tr.params, _model_batch(b)))
        w = b["weights"]
        correct += float(((pred == b["targets"]) * w).sum())
        total += float(w.sum())
    return correct / total


@functools.lru_cache(maxsize=16)
def _predict_cached(model, spec):
    fwd = apply_fn(model, spec)
    return jax.jit(lambda p, b: jnp.argmax(fwd(p, b), -1))


def _predict_fn(tr: Trained):
    return _predict_cached(tr.model, tr.spec)


# ---------------------------------------------------------------------------------------------
# The birdie_recall figure
# ---------------------------------------------------------------------------------------------
def recall_table(size: str, seed: int, *, models: Sequence[str] = RECALL_MODELS,
                 task: Optional[RecallTask] = None, log: bool = True) -> dict:
    """Trains every model and measures accuracy at every pair count: the figure's numbers."""
    s = SIZES[size]
    task = task or RecallTask(**s["task"])
    acc, params, tokens, seconds, curves, mixtures = {}, {}, {}, {}, {}, {}
    # The arms without pre-training share their task batches, packed once and kept for all of
    # them (17 bytes a token): not where they would not fit in memory (the paper size).
    shared = (recall_task_batches(s, task, seed)
              if s["steps"] * s["rows"] * s["row_length"] * 17 <= 2**31 else None)
    for name in models:
        tr = train_recall_model(name, s, task, seed, log=log, task_batches=shared)
        acc[name] = {int(P): recall_accuracy(tr, task, P, examples=s["eval_examples"],
                                             rows=s["rows"], row_length=s["row_length"],
                                             seed=seed + 1000)
                     for P in s["pairs"]}
        params[name], tokens[name] = tr.num_params, tr.tokens
        seconds[name], curves[name] = round(tr.seconds, 1), tr.losses
        if tr.mixtures:
            mixtures[name] = {"actions": tr.action_names, "history": tr.mixtures}
        if log:
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
    """The birdie_recall recipe at `size` (SIZES entry), hashed into provenance."""
    return SIZES[size]


@figures.register("birdie_recall", settings=figure_settings)
def birdie_recall_figure(*, size: str, seed: int, out: pathlib.Path, **_) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate_size(size)
    out = pathlib.Path(out)
    models = SIZES[size].get("models", RECALL_MODELS)
    res = recall_table(size, seed, models=models)
    pairs = SIZES[size]["pairs"]
    rows = [(m, P, res["accuracy"][m][P], res["params"][m], res["tokens"][m])
            for m in models for P in pairs]
    figures.write_csv(out / "birdie_recall.csv", ["model", "pairs", "accuracy", "params",
                                                  "train_tokens"], rows)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
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
    mix = res["mixtures"].get("gated_birdie")
    if mix:
        steps = [h[0] for h in mix["history"]]
        weights = np.array([h[1] for h in mix["history"]])
        groups: dict[str, np.ndarray] = {}
        for j, a in enumerate(mix["actions"]):
            g = a.split("_r")[0] if a.startswith(("infilling", "autoencoding")) else a
            groups[g] = groups.get(g, 0) + weights[:, j]
        ax[1].stackplot(steps, *groups.values(), labels=list(groups))
        ax[1].set(xlabel="step", ylabel="mixture weight", ylim=(0, 1),
                  title="gated_birdie: the controller's mixture")
        ax[1].legend(fontsize=6, loc="upper right")
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
    SIZES[size] (the task's ranges, every pair count against the key range, the longest example
    against row_length, the models' configs) and `birdie_phonebook`'s PHONEBOOK_SIZES[size]
    (queries within entries, the longest phone-book example against row_length). Raises a
    ValueError naming the field, its value and what is allowed."""
    for table, name in ((SIZES, "SIZES"), (birdie_config.PHONEBOOK_SIZES, "PHONEBOOK_SIZES")):
        if size not in table:
            raise ValueError(f"size={size!r} is not allowed; {name} has {sorted(table)}")
    s, where = SIZES[size], f"SIZES[{size!r}]"
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
    if not models or set(models) - set(SPECS):
        raise ValueError(f"{where}.models={models!r} is not allowed; use a non-empty subset of "
                         f"{sorted(SPECS)}")
    for name in models:
        build_model(name, s)                # the model configs check themselves
    s, where = birdie_config.PHONEBOOK_SIZES[size], f"PHONEBOOK_SIZES[{size!r}]"
    _check_common(s, where)
    if not s["queries"] or not 1 <= min(s["queries"]) <= max(s["queries"]) <= s["entries"]:
        raise ValueError(f"{where}.queries={tuple(s['queries'])} is not allowed; use "
                         f"1..entries={s['entries']}")
    longest = phonebook_data.max_example_length(s["entries"], max(s["queries"]))
    if longest > s["row_length"]:
        raise ValueError(f"{where}.row_length={s['row_length']} is not allowed: a book of "
                         f"{s['entries']} entries with {max(s['queries'])} queries makes "
                         f"examples of up to {longest} tokens")
    for name in PHONEBOOK_MODELS:
        for c in birdie_config.phonebook_phases(size, name, 0):
            trainer.validate_config(c)
            trainer.build_model(c.model)    # the model configs check themselves


def phonebook_figure_settings(size: str) -> dict:
    """The birdie_phonebook recipe at `size` (train/configs/birdie.py PHONEBOOK_SIZES entry),
    hashed into provenance."""
    return birdie_config.PHONEBOOK_SIZES[size]


def phonebook_run(size: str, name: str, seed: int, out: pathlib.Path):
    """Trains arm `name` of the phone-book figure through the trainer, pre-training then
    fine-tuning (train/configs/birdie.py: phonebook_phases), in
    OUT/runs/birdie_phonebook-SIZE-seedS-NAME-HASH/{pretrain,finetune} (HASH: the phases'
    recipe, so a changed recipe trains into a new folder; a finished run is reused). Returns
    (model, params) of the fine-tuned run."""
    pre, tune = birdie_config.phonebook_phases(size, name, seed)
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
def birdie_phonebook_figure(*, size: str, seed: int, out: pathlib.Path, **_) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate_size(size)
    out = pathlib.Path(out)
    s = birdie_config.PHONEBOOK_SIZES[size]
    acc, exact, nparams = {}, {}, {}
    for name in PHONEBOOK_MODELS:
        model, params = phonebook_run(size, name, seed, out)
        model_fn = phonebook.model_fn_for(model)
        if isinstance(model, ssm.BiSSMLM) and not SPECS[name].bidirectional:
            # a causal SSM has no prefix: the same model sees every position as generated
            inner = model_fn
            model_fn = lambda p, t, sg, pre: inner(p, t, sg, jnp.zeros_like(pre))  # noqa: E731
        acc[name], exact[name] = {}, {}
        for q in s["queries"]:
            r = phonebook.evaluate(model_fn, params, seed=seed + 1000, entries=s["entries"],
                                   queries=q, examples=s["eval_examples"],
                                   batch_size=min(8, s["eval_examples"]))
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
           title=f"phone book, {s['entries']} entries ({size})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "birdie_phonebook.png", dpi=120)
    plt.close(fig)
    return {"digit_accuracy": acc, "exact_match": exact, "params": nparams,
            "entries": s["entries"], "steps": s["steps"]}
