"""DKVB value training and the class-incremental protocol (Träuble et al. 2023, Sec. 4.1).

Protocol, for DKVB and for its baselines alike: a stream of tasks (a few classes each), no task
identities, no regulariser that needs task boundaries, one optimizer carried across tasks —
SGD *without momentum* (with momentum, values fetched in an earlier task would keep moving after
they stop being fetched), learning rate 0.3, batch 256, global gradient-norm clip 1.0, label
smoothing 0.1, several epochs per task. DKVB values start at zero.

Locality is enforced, not only implied by the optimizer: a DKVB step zeroes the update of every
value its batch did not fetch (`Learner.local_update`), so an optimizer with momentum or weight
decay (`make_train_task(..., tx=...)`) still cannot move a value outside the fetched set. Under
the protocol's plain SGD those updates are already zero, so the mask changes no number.

Everything runs on precomputed frozen embeddings: for DKVB the key indices of a training set are
computed once (keys and projection are frozen), so an epoch is only gathers and scatter-adds. A
task is one jitted call: `lax.scan` over epochs, and within each over shuffled batches.

Learners:
- `dkvb_learner(model, codebooks)`: trainable {values, linear-decoder params}; usage counted.
- `probe_learner(num_classes, hidden=0|128)`: linear probe (hidden=0) or MLP with one hidden
  layer, on the same embeddings.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memory import codebook as cb
from models.kv_bottleneck import KVBottleneck
from train import optim


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """The paper's value-training protocol (Sec. 4.1 / App. B)."""

    learning_rate: float = 0.3  # SGD step size, no momentum
    batch_size: int = 256  # items per step (the last batch of a task may be smaller)
    clip_norm: float = 1.0  # global gradient-norm clip (0 disables)
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    epochs_per_task: int = 10  # passes over each task's data

    def validate(self) -> "ProtocolConfig":
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be a positive int")
        if self.clip_norm < 0:
            raise ValueError(f"clip_norm={self.clip_norm!r} must be >= 0 (0 disables clipping)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        if not isinstance(self.epochs_per_task, int) or self.epochs_per_task < 1:
            raise ValueError(f"epochs_per_task={self.epochs_per_task!r} must be a positive int")
        return self


def make_optimizer(cfg: ProtocolConfig) -> optax.GradientTransformation:
    """Global-norm clip then plain SGD (no momentum, no weight decay), from the one factory
    (train/optim.py)."""
    tx, _ = optim.make_optimizer(optim.optim("sgd", lr=cfg.learning_rate,
                                             clip_norm=cfg.clip_norm))
    return tx


def smoothed_cross_entropy(logits_BxV: jax.Array, y_B: jax.Array, weight_B: jax.Array,
                           label_smoothing: float) -> jax.Array:
    """Weighted mean over items of cross-entropy against label-smoothed targets (float32)."""
    V = logits_BxV.shape[-1]
    target_BxV = optax.smooth_labels(jax.nn.one_hot(y_B, V), label_smoothing)
    ce_B = optax.softmax_cross_entropy(logits_BxV.astype(jnp.float32), target_BxV)
    w = weight_B.astype(jnp.float32)
    return jnp.sum(ce_B * w) / jnp.maximum(jnp.sum(w), 1.0)


# --------------------------------------------------------------------------- learners


class Learner(NamedTuple):
    """What the protocol needs of a learner.

    features(state, x_NxD) -> per-item features for training (e.g. key indices for DKVB);
    loss(trainable, aux, feat_B, y_B, w_B, smoothing) -> (loss, new_aux);
    predict(state, x_NxD) -> logits_NxV at test time;
    local_update(updates, feat_B, w_B) -> updates with every entry the batch did not touch set
      to zero (None: the whole trainable pytree may move, as for the probes).
    """

    name: str
    features: Callable[[Any, jax.Array], jax.Array]
    loss: Callable[..., tuple[jax.Array, Any]]
    predict: Callable[[Any, jax.Array], jax.Array]
    local_update: Callable[[Any, jax.Array, jax.Array], Any] | None = None


class LearnerState(NamedTuple):
    trainable: Any  # what the optimizer updates
    aux: Any  # what training updates without gradient (DKVB: the codebooks' usage counts)
    opt_state: Any


def dkvb_learner(model: KVBottleneck, codebooks: cb.Codebooks, *,
                 rng: jax.Array | None = None) -> tuple[Learner, LearnerState]:
    """DKVB learner and its initial state (values and the linear decoder trainable).

    State: trainable = {"values": [C, K, d_v], "decoder": linear-decoder params or {}};
    aux = the codebooks (keys, projection frozen; usage counted in training).
    """
    variables = jax.jit(model.init)(rng if rng is not None else jax.random.PRNGKey(0),
                                    jnp.zeros((1, codebooks.embed_dim)), codebooks)
    decoder_params = variables.get("params", {})

    def apply(trainable, codebooks, idx_BxC):
        books = codebooks.replace(values_CxKxDv=trainable["values"])
        logits, _ = model.apply({"params": trainable["decoder"]}, None, books, idx_BxC=idx_BxC)
        return logits

    def features(state: LearnerState, z_NxD):
        # Unrestricted nearest key (training time): every key may be fetched.
        return model.apply({"params": state.trainable["decoder"]}, z_NxD, state.aux,
                           method=KVBottleneck.lookup)

    def loss(trainable, codebooks, idx_BxC, y_B, w_B, smoothing):
        logits = apply(trainable, codebooks, idx_BxC)
        new_books = codebooks.replace(usage_CxK=cb.count_usage(codebooks.usage_CxK, idx_BxC, w_B))
        return smoothed_cross_entropy(logits, y_B, w_B, smoothing), new_books

    def predict(state: LearnerState, z_NxD):
        books = state.aux.replace(values_CxKxDv=state.trainable["values"])
        idx = model.apply({"params": state.trainable["decoder"]}, z_NxD, books,
                          restrict_to_used=True, method=KVBottleneck.lookup)
        return apply(state.trainable, state.aux, idx)

    def local_update(updates, idx_BxC, w_B):
        # Only values fetched by a real item (w > 0) of this batch may change (paper Sec. 3:
        # localized updates); the linear decoder, if any, is global and left as it is.
        C, K = codebooks.num_codebooks, codebooks.num_keys
        fetched_CxK = cb.count_usage(jnp.zeros((C, K), jnp.float32), idx_BxC, w_B) > 0
        values = jnp.where(fetched_CxK[..., None], updates["values"], 0.0)
        return {**updates, "values": values.astype(updates["values"].dtype)}

    trainable = {"values": codebooks.values_CxKxDv, "decoder": decoder_params}
    learner = Learner("dkvb", jax.jit(features), loss, jax.jit(predict), local_update)
    return learner, LearnerState(trainable, codebooks, None)


class _Probe(nn.Module):
    num_classes: int
    hidden: int = 0

    @nn.compact
    def __call__(self, z_BxD):
        h = z_BxD.astype(jnp.float32)
        if self.hidden:
            h = nn.relu(nn.Dense(self.hidden, name="hidden")(h))
        return nn.Dense(self.num_classes, name="out")(h)


def probe_learner(rng: jax.Array, embed_dim: int, num_classes: int, *, hidden: int = 0,
                  name: str | None = None) -> tuple[Learner, LearnerState]:
    """Linear probe (hidden=0) or one-hidden-layer MLP on frozen embeddings."""
    if hidden < 0:
        raise ValueError(f"hidden={hidden!r} must be >= 0")
    module = _Probe(num_classes, hidden)
    params = jax.jit(module.init)(rng, jnp.zeros((1, embed_dim)))["params"]

    def features(state, z_NxD):
        return jnp.asarray(z_NxD, jnp.float32)

    def loss(trainable, aux, z_BxD, y_B, w_B, smoothing):
        return smoothed_cross_entropy(module.apply({"params": trainable}, z_BxD), y_B, w_B,
                                      smoothing), aux

    def predict(state, z_NxD):
        return module.apply({"params": state.trainable}, jnp.asarray(z_NxD, jnp.float32))

    nm = name or ("mlp" if hidden else "linear")
    return Learner(nm, jax.jit(features), loss, jax.jit(predict)), LearnerState(params, None, None)


# --------------------------------------------------------------------------- training


def make_train_task(learner: Learner, cfg: ProtocolConfig, *, epochs: int | None = None,
                    tx: optax.GradientTransformation | None = None):
    """Returns jitted `train_task(state, feats_N, y_N, w_N, rng) -> (state, mean_loss_per_epoch)`.

    Items with w == 0 are padding (so every task of a stream can share one compiled function);
    each epoch shuffles the real items and puts padding last; the last real batch may be partial.
    `tx` replaces the protocol's optimizer (`make_optimizer(cfg)`); the learner's
    `local_update` is applied to its updates either way.
    """
    cfg = cfg.validate()
    tx = make_optimizer(cfg) if tx is None else tx
    n_epochs = cfg.epochs_per_task if epochs is None else epochs

    def step(carry, batch):
        trainable, aux, opt_state = carry
        f_B, y_B, w_B = batch
        (loss, aux), g = jax.value_and_grad(learner.loss, has_aux=True)(
            trainable, aux, f_B, y_B, w_B, cfg.label_smoothing)
        upd, opt_state = tx.update(g, opt_state, trainable)
        if learner.local_update is not None:
            upd = learner.local_update(upd, f_B, w_B)
        return (optax.apply_updates(trainable, upd), aux, opt_state), loss

    @jax.jit
    def run(state: LearnerState, feats_N, y_N, w_N, rng):
        N = y_N.shape[0]
        B = min(cfg.batch_size, N)
        steps = -(-N // B)
        pad = steps * B - N
        opt_state = state.opt_state

        def epoch(carry, r):
            # Real items first in random order, padding (w == 0) last.
            order = jnp.argsort(jax.random.uniform(r, (N,)) + (w_N == 0) * 2.0)
            order = jnp.concatenate([order, jnp.full((pad,), order[-1])])
            ix = order.reshape(steps, B)
            w = jnp.concatenate([w_N[order[:N]], jnp.zeros((pad,), w_N.dtype)]).reshape(steps, B)
            carry, losses = jax.lax.scan(
                step, carry, (jnp.take(feats_N, ix, axis=0), y_N[ix], w))
            return carry, jnp.mean(losses)

        (trainable, aux, opt_state), losses = jax.lax.scan(
            epoch, (state.trainable, state.aux, opt_state), jax.random.split(rng, n_epochs))
        return LearnerState(trainable, aux, opt_state), losses

    def train_task(state: LearnerState, feats_N, y_N, w_N, rng):
        if state.opt_state is None:  # first task: the one optimizer state of the whole stream
            state = state._replace(opt_state=tx.init(state.trainable))
        return run(state, feats_N, y_N, w_N, rng)

    return train_task


def pad_to(n: int, *arrays: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Pads arrays along axis 0 to length n (repeating item 0); returns (arrays, weight_n)."""
    m = len(arrays[0])
    if m > n:
        raise ValueError(f"cannot pad {m} items to n={n}")
    out = [np.concatenate([a, np.repeat(a[:1], n - m, 0)]) if n > m else a for a in arrays]
    w = np.zeros((n,), np.float32)
    w[:m] = 1.0
    return out, w


def accuracy(logits_NxV: jax.Array, y_N: np.ndarray) -> float:
    return float(np.mean(np.asarray(jnp.argmax(logits_NxV, -1)) == np.asarray(y_N)))


def train_class_incremental(learner: Learner, state: LearnerState, tasks, cfg: ProtocolConfig,
                            rng: jax.Array, *, evaluate: Callable[[LearnerState], Any]):
    """Trains on `tasks` (a list of (z_NxD, y_N)) one after another with one optimizer.

    Returns (final state, [evaluate(state) after each task]). All tasks are padded to one length
    so the task step compiles once.
    """
    if not tasks:
        raise ValueError("tasks is empty; need at least one (z_NxD, y_N) task")
    train_task = make_train_task(learner, cfg)
    n_max = max(len(y) for _, y in tasks)
    results = []
    for t, (z, y) in enumerate(tasks):
        (z_p, y_p), w = pad_to(n_max, np.asarray(z), np.asarray(y, np.int32))
        feats = learner.features(state, jnp.asarray(z_p))
        state, _ = train_task(state, feats, jnp.asarray(y_p), jnp.asarray(w),
                              jax.random.fold_in(rng, t))
        results.append(evaluate(state))
    return state, results


def train_iid(learner: Learner, state: LearnerState, z_NxD, y_N, cfg: ProtocolConfig,
              rng: jax.Array, *, epochs: int | None = None) -> LearnerState:
    """Trains on all data at once, shuffled (the i.i.d. upper bound)."""
    train_task = make_train_task(learner, cfg, epochs=epochs)
    y = np.asarray(y_N, np.int32)
    feats = learner.features(state, jnp.asarray(z_NxD))
    state, _ = train_task(state, feats, jnp.asarray(y), jnp.ones(len(y), jnp.float32), rng)
    return state
