"""DKVB value training for the shared trainer (Träuble et al. 2023, Sec. 4.1): model "dkvb" with
memory "dkvb_codebooks" and objective "dkvb"; the baselines' model "probe" with objective "probe".

Protocol, for DKVB and for its baselines alike (train/configs/dkvb.py): a stream of tasks (a few
classes each), one trainer phase per task in one workdir, no task identities, no regulariser
that needs task boundaries, one optimizer carried across tasks — SGD *without momentum* (with
momentum, values fetched in an earlier task would keep moving after they stop being fetched),
learning rate 0.3 for DKVB's values and 1e-3 for the probes (the official sweeps; the toy and
split-digits figures train their probes at 0.3), batch 256, global gradient-norm clip 1.0, label
smoothing 0.1, several epochs per task. DKVB values start at zero.

Locality: a value no item of a batch fetched gets a zero gradient, and under plain SGD a zero
update, so it stays exactly where it is; `check_config` refuses any other optimizer for DKVB
(momentum or weight decay would move unfetched values).

The memory (`init_codebooks`, TrainState.memory["dkvb_codebooks"]) holds the frozen random
projection and the keys, initialised by EMA k-means on another distribution's embeddings
(DATA_DIR/keys.npz), and the usage counts of the keys, which every training step updates
(aux["memory"]); at evaluation each input snaps to its nearest *used* key. Batches are
"embeddings" batches {"z": [B, D], "y": [B]} (train/data/embeddings.py).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memory import codebook as cb
from models.kv_bottleneck import KVBottleneck
from train.data import embeddings


def smoothed_cross_entropy(logits_BxV: jax.Array, y_B: jax.Array,
                           label_smoothing: float) -> jax.Array:
    """[B] cross-entropy against label-smoothed targets (float32)."""
    V = logits_BxV.shape[-1]
    target_BxV = optax.smooth_labels(jax.nn.one_hot(y_B, V), label_smoothing)
    return optax.softmax_cross_entropy(logits_BxV.astype(jnp.float32), target_BxV)


# --------------------------------------------------------------------------- models


class DKVBModel(nn.Module):
    """The trainable part of a DKVB classifier: values [C, K, d_v] (zero at init) and, with the
    "linear" decoder, its parameters (under "bottleneck"). The codebooks' keys, projection and
    usage are the run's memory (`init_codebooks`); `logits` combines the two."""
    num_classes: int
    num_codebooks: int
    num_keys: int
    decoder: str = "vote"

    def setup(self):
        self.values = self.param("values", nn.initializers.zeros,
                                 (self.num_codebooks, self.num_keys, self.num_classes),
                                 jnp.float32)
        self.bottleneck = KVBottleneck(num_classes=self.num_classes, decoder=self.decoder)

    def __call__(self, z_BxD):
        """Init path: creates the parameters (every item fetches key 0)."""
        idx = jnp.zeros((z_BxD.shape[0], self.num_codebooks), jnp.int32)
        return self.bottleneck(None, self._books(None, z_BxD.shape[1]), idx_BxC=idx)[0]

    def _books(self, memory, embed_dim: int) -> cb.Codebooks:
        C, K = self.num_codebooks, self.num_keys
        if memory is None:   # init: only the values and the decoder are needed
            memory = {"projection": jnp.zeros((C, embed_dim, 1)), "keys": jnp.zeros((C, K, 1)),
                      "usage": jnp.zeros((C, K), jnp.int32)}
        return cb.Codebooks(projection_CxDxDk=memory["projection"], keys_CxKxDk=memory["keys"],
                            values_CxKxDv=self.values, usage_CxK=memory["usage"])

    def logits(self, z_BxD, memory, *, restrict_to_used: bool):
        """(logits [B, V], fetched key indices [B, C]) with the codebooks of `memory`."""
        books = self._books(memory, z_BxD.shape[1])
        idx = self.bottleneck.lookup(z_BxD, books, restrict_to_used=restrict_to_used)
        return self.bottleneck(None, books, idx_BxC=idx)


class Probe(nn.Module):
    """The baselines on the same embeddings: a linear probe (hidden=0) or an MLP with one hidden
    ReLU layer."""
    num_classes: int
    hidden: int = 0

    @nn.compact
    def __call__(self, z_BxD):
        h = z_BxD.astype(jnp.float32)
        if self.hidden:
            h = nn.relu(nn.Dense(self.hidden, name="hidden")(h))
        return nn.Dense(self.num_classes, name="out")(h)


def build_dkvb(model_cfg: dict) -> DKVBModel:
    """train.trainer.MODELS["dkvb"]: {num_classes, num_codebooks, num_keys, decoder}."""
    return DKVBModel(num_classes=model_cfg["num_classes"],
                     num_codebooks=model_cfg["num_codebooks"], num_keys=model_cfg["num_keys"],
                     decoder=model_cfg.get("decoder", "vote"))


def build_probe(model_cfg: dict) -> Probe:
    """train.trainer.MODELS["probe"]: {num_classes, hidden}."""
    hidden = model_cfg.get("hidden", 0)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise ValueError(f"model.hidden={hidden!r} must be an integer >= 0")
    return Probe(num_classes=model_cfg["num_classes"], hidden=hidden)


# --------------------------------------------------------------------------- memory


def init_codebooks(settings, config, key: jax.Array) -> dict:
    """train.trainer.MEMORY["dkvb_codebooks"]: a random projection per codebook and keys learnt
    by EMA k-means (`cb.init_keys_ema`) on DATA_DIR/keys.npz's embeddings projected by it (data
    from another distribution than the values'), zero usage. Settings: key_dim,
    key_init_epochs, key_init_decay, key_init_batch; C and K are the model's."""
    z_keys, _ = embeddings.load(str(config.data.data_dir), "keys")
    m = config.model
    r_books, r_keys = jax.random.split(key)
    books = cb.init_codebooks(r_books, embed_dim=z_keys.shape[1],
                              num_codebooks=m.num_codebooks, num_keys=m.num_keys,
                              key_dim=settings.key_dim, value_dim=m.num_classes)
    q = cb.project(jnp.asarray(z_keys), books.projection_CxDxDk)
    ema = cb.init_keys_ema(r_keys, q, num_keys=m.num_keys, decay=settings.key_init_decay,
                           epochs=settings.key_init_epochs, batch_size=settings.key_init_batch)
    return {"projection": books.projection_CxDxDk, "keys": ema.keys_CxKxDk,
            "usage": books.usage_CxK}


# --------------------------------------------------------------------------- objectives


def dkvb_loss(apply_fn, params, batch, rng, *, step=None, memory=None,
              label_smoothing: float = 0.1):
    """train.trainer.OBJECTIVES["dkvb"]: label-smoothed cross-entropy of the values fetched by
    each item's nearest key (training: any key; the fetched keys' usage counted and returned as
    aux["memory"]); at evaluation (step None) each item snaps to its nearest used key and the
    loss is the plain cross-entropy."""
    del rng
    model = getattr(apply_fn, "__self__", None)
    if not isinstance(model, DKVBModel):
        raise ValueError("objective 'dkvb' needs model.family='dkvb' (apply_fn of a DKVBModel); "
                         f"got {type(model).__name__}")
    books = memory["dkvb_codebooks"]
    z, y = jnp.asarray(batch["z"], jnp.float32), jnp.asarray(batch["y"], jnp.int32)
    training = step is not None
    logits, idx = apply_fn({"params": params}, z, books, restrict_to_used=not training,
                           method=DKVBModel.logits)
    ce = smoothed_cross_entropy(logits, y, label_smoothing if training else 0.0)
    aux = {"weight": jnp.float32(y.shape[0]),
           "correct": jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32))}
    if training:
        usage = cb.count_usage(books["usage"], jax.lax.stop_gradient(idx))
        aux["memory"] = {"dkvb_codebooks": {**books, "usage": usage}}
    return jnp.sum(ce), aux


def probe_loss(apply_fn, params, batch, rng, *, step=None, memory=None,
               label_smoothing: float = 0.1):
    """train.trainer.OBJECTIVES["probe"]: label-smoothed cross-entropy of a `Probe` (plain at
    evaluation)."""
    del rng, memory
    logits = apply_fn({"params": params}, jnp.asarray(batch["z"], jnp.float32))
    y = jnp.asarray(batch["y"], jnp.int32)
    ce = smoothed_cross_entropy(logits, y, label_smoothing if step is not None else 0.0)
    return jnp.sum(ce), {"weight": jnp.float32(y.shape[0]),
                         "correct": jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32))}


def check_config(config) -> None:
    """train.trainer.OBJECTIVE_CHECKS["dkvb"]: DKVB's values stay local only under plain SGD,
    and its memory must be there."""
    name = config.optim.get("name", "adamw")
    if name != "sgd":
        raise ValueError(f"optim.name={name!r} is not allowed for objective 'dkvb': values no "
                         "item fetched stay fixed only under plain SGD (momentum or weight decay "
                         "would move them); use 'sgd'")
    if "dkvb_codebooks" not in config.get("memory", {}):
        raise ValueError("objective 'dkvb' needs config.memory.dkvb_codebooks (its keys)")


@functools.lru_cache(maxsize=16)
def _classes_fn(model):
    """Jitted (params, memory, z) -> predicted classes of `model`, compiled once per model (a
    figure predicts after every task of every learner)."""
    if isinstance(model, DKVBModel):
        def logits(p, m, x):
            return model.apply({"params": p}, x, m["dkvb_codebooks"], restrict_to_used=True,
                               method=DKVBModel.logits)[0]
    else:
        def logits(p, m, x):
            return model.apply({"params": p}, x)
    return jax.jit(lambda p, m, x: jnp.argmax(logits(p, m, x), -1))


def predict(model, params, memory, z_NxD, *, batch_size: int = 4096) -> np.ndarray:
    """[N] predicted classes of embeddings z by a trained DKVB (its nearest used keys) or probe."""
    z = np.asarray(z_NxD, np.float32)
    fn = _classes_fn(model)
    out = [np.asarray(fn(params, memory, jnp.asarray(z[i:i + batch_size])))
           for i in range(0, len(z), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)
