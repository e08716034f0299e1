"""MAC training (Tack et al. 2024, §3.2): stage 1 trains the base LM, stage 2 meta-trains g, h and
the prefix FFN with the base LM frozen.

Stage 2's batch is K documents and one question per document; the documents of the batch are the
bank for every question (the other K-1 act as distractors). Backpropagation dropout (§3.3): only
the first ⌊ρ·K⌋ documents are amortized with gradients (the rest under stop_gradient), and only
their questions are scored; the bank still holds all K modulations. The loss is next-token
cross-entropy on the answer tokens (and the EOS after them) only. Adam, constant learning rate
after a linear warm-up, global-norm clipping.

Auxiliary readouts (training only, `readout_weight` > 0): two linear heads, discarded after
training, read the answers' first tokens straight from the modulations — every relation's answer
from the document's φ (g's readout) and the asked answer from h's output z (h's readout) — and a
retrieval loss makes each question's code most cosine-similar to its own document's φ (the
score CMT's top-k selects by). They stand in for the pre-training of the paper's T5
amortization and aggregation networks: with the answer loss as the only signal, which reaches g
and h through the frozen LM's prefix attention, the chain stayed at the answer prior at CPU
scale; with the readouts it leaves it within a few hundred steps (README, MAC section).

Hierarchical term (`hierarchical_weight` > 0): the same questions are also answered through
hierarchical aggregation (chunks of W documents, their outputs a smaller bank, then a flat pass),
and that answer loss is added. h sees its own chunk outputs as a bank only there; trained flat
alone, hierarchical answers stayed at chance.

Batches are dicts of numpy/jax arrays:
    docs       [K, S] int32   document bytes, PAD-padded
    questions  [K, Q] int32   question bytes (h's input), PAD-padded
    qa         [K, L] int32   `question SEP answer EOS`, PAD-padded (the LM's input)
    qa_weights [K, L] float32 1 on the answer bytes and EOS
    doc_answers [K, R] int32  first answer token of each of the document's R questions
                              (g's readout; optional when readout_weight = 0)
Stage 1 batches: {"inputs", "targets", "weights"} [B, T] as `train/objectives/lm.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from models.mac import MAC, MACConfig, modulated_logits, slot_keys
from models.transformer import Transformer, TransformerConfig
from train import optim
from train.data import facts
from train.data import tokenizer as tok
from train.objectives.lm import token_losses


# ---------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------
def make_optimizer(lr: float, *, warmup_steps: int = 100, clip: float = 1.0,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam(W) with a linear warm-up to a constant `lr` and global-norm clipping (paper: Adam,
    constant lr, clipping), from the one factory (train/optim.py)."""
    tx, _ = optim.make_optimizer(optim.optim(lr=lr, warmup_steps=warmup_steps, clip_norm=clip,
                                             weight_decay=weight_decay))
    return tx


# ---------------------------------------------------------------------------------------------
# Stage 1: the base LM
# ---------------------------------------------------------------------------------------------
def lm_rows(records: Sequence[dict], length: int) -> dict:
    """Stage-1 rows `document EOS question SEP answer EOS` (loss on every real token).

    Teaches the base LM the QA format and how to read an answer from context in front of it,
    which is what the prefix later supplies.
    """
    rows = [np.concatenate([tok.encode(r["document"]), [tok.EOS], _qa_ids(r)])[: length + 1]
            for r in records]
    return _lm_rows(rows, length)


def _qa_ids(record: dict) -> np.ndarray:
    """`question SEP answer EOS` token ids of a record (its first answer)."""
    ans = record["answer"] if isinstance(record["answer"], str) else record["answer"][0]
    return np.concatenate([tok.encode(record["question"]), [tok.SEP], tok.encode(ans),
                           [tok.EOS]])


def _lm_rows(rows: Sequence[np.ndarray], length: int) -> dict:
    """Token rows (each ≤ length + 1) → PAD-filled next-token batch, loss on every real token."""
    arr = np.full((len(rows), length + 1), tok.PAD, np.int32)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
    inputs, targets = arr[:, :-1], arr[:, 1:]
    return {"inputs": inputs, "targets": targets,
            "weights": (targets != tok.PAD).astype(np.float32)}


def qa_only_rows(records: Sequence[dict], length: int) -> dict:
    """Stage-1 rows of `question SEP answer EOS` sequences with no document, packed greedily
    (loss on every real token); the first sequence of every row starts at position 0.

    Without them the base LM only ever saw a question after its document, so at MAC's layout
    (the question right after the prefix, no document) the frozen LM did not even produce the
    answer format: its no-memory answer loss was 3.05 nats/token instead of the answer prior
    (0.46), and stage 2 spent itself restoring the format. With them, the no-memory LM answers
    with the prior and the prefix only has to supply the document's facts.
    """
    rows, cur = [], []
    for s_ in (_qa_ids(r) for r in records):
        if cur and sum(map(len, cur)) + len(s_) > length + 1:
            rows.append(np.concatenate(cur))
            cur = []
        cur.append(s_[: length + 1])
    if cur:
        rows.append(np.concatenate(cur))
    return _lm_rows(rows, length)


def lm_loss(lm_cfg: TransformerConfig, lm_params, batch) -> jax.Array:
    """Mean next-token cross-entropy over weighted positions."""
    logits = Transformer(lm_cfg).apply({"params": lm_params}, batch["inputs"])
    ce, _ = token_losses(logits, batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.lru_cache(maxsize=8)
def _jitted_init(module: nn.Module):
    """`module.init`, jitted once per module: one compilation instead of an op-by-op init (on a
    cold cache several times faster; the same values)."""
    return jax.jit(module.init)


def init_lm(lm_cfg: TransformerConfig, key: jax.Array):
    """Unboxed base-LM params."""
    return nn.unbox(_jitted_init(Transformer(lm_cfg))(key, jnp.zeros((1, 8), jnp.int32))["params"])


def train_base_lm(lm_cfg: TransformerConfig, batches: Iterator[dict], *, num_steps: int,
                  key: jax.Array, lr: float = 3e-3, warmup_steps: int = 100,
                  log_every: int = 0, params=None) -> tuple[Any, list[float]]:
    """Stage 1: trains (or continues) the base LM on `batches`; returns (params, losses)."""
    params = init_lm(lm_cfg, key) if params is None else params
    opt = make_optimizer(lr, warmup_steps=warmup_steps)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(lm_cfg, p, batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    bar = tqdm(total=num_steps, desc="mac stage 1", unit="step", leave=False,
               disable=not log_every, dynamic_ncols=True)
    for i in range(num_steps):
        params, opt_state, loss = step(params, opt_state, next(batches))
        losses.append(float(loss))
        if log_every and (i + 1) % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}", refresh=False)
        bar.update(1)
    bar.close()
    return params, losses


# ---------------------------------------------------------------------------------------------
# The uniform fine-tuning baseline: one Adam step per document on the base LM's loss
# ---------------------------------------------------------------------------------------------
def finetune_optimizer() -> optax.GradientTransformation:
    """Adam whose learning rate lives in its state (`finetune_init` sets it), so one compiled
    `finetune_step` serves a learning-rate sweep."""
    return optax.inject_hyperparams(optax.adam)(learning_rate=0.0)


def finetune_init(lm_params, lr: float):
    """`finetune_optimizer`'s state for `lm_params` at learning rate `lr`."""
    state = finetune_optimizer().init(lm_params)
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return state


@functools.partial(jax.jit, static_argnames=("cfg",))
def finetune_step(cfg: MACConfig, lm_params, opt_state, doc_1xS):
    """One Adam step of the base LM on one document's next-token loss: (params, opt_state)."""
    batch = {"inputs": doc_1xS[:, :-1], "targets": doc_1xS[:, 1:],
             "weights": (doc_1xS[:, 1:] != tok.PAD).astype(jnp.float32)}
    g = jax.grad(lambda q: lm_loss(cfg.lm, q, batch))(lm_params)
    u, opt_state = finetune_optimizer().update(g, opt_state, lm_params)
    return optax.apply_updates(lm_params, u), opt_state


def uniform_finetune(cfg: MACConfig, lm_params, docs_NxS, *, lr: float):
    """The baseline: one Adam step per document, in stream order; returns the LM's params."""
    state, p = finetune_init(lm_params, lr), lm_params
    for i in range(docs_NxS.shape[0]):
        p, state = finetune_step(cfg, p, state, jnp.asarray(docs_NxS[i:i + 1]))
    return p


# ---------------------------------------------------------------------------------------------
# Stage 2: meta-training g, h and the prefix FFN
# ---------------------------------------------------------------------------------------------
def num_scored(rho: float, k: int) -> int:
    """⌊ρ·K⌋ documents get gradients (at least one)."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho={rho} is not allowed; backpropagation dropout needs 0 < ρ ≤ 1")
    return max(1, int(math.floor(rho * k + 1e-9)))


def qa_loss(cfg: MACConfig, lm_params, logits_BxLxV, qa_BxL, weights_BxL):
    """Answer-token cross-entropy: logits at t predict qa[t+1] where weights[t+1] = 1."""
    ce, correct = token_losses(logits_BxLxV[:, :-1], qa_BxL[:, 1:])
    w = weights_BxL[:, 1:].astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    return jnp.sum(ce * w) / denom, {"token_accuracy": jnp.sum(correct * w) / denom}


def curriculum_valid(k: int, K: int, bank_size) -> jax.Array:
    """[k, K] bool: question i sees its own document and the next bank_size-1 (cyclically).

    bank_size may be traced; bank_size ≥ K gives the whole batch (the paper's setting).
    """
    i = jnp.arange(k)[:, None]
    j = jnp.arange(K)[None, :]
    return ((j - i) % K) < bank_size


def loss_from_modulations(cfg: MACConfig, params, lm_params, phi_KxTxD, batch, rho: float,
                          bank_size=None):
    """Stage-2 loss given the batch's modulations [K, T, D] (gradients only through the first
    ⌊ρK⌋ of them; the rest are under stop_gradient but stay in the bank).

    bank_size (optional, may be traced): each question sees only its own document and the next
    bank_size-1 of the batch — a curriculum that first teaches the write/read path on small
    banks; None = all K documents.
    """
    loss, metrics, _ = _qa_loss_and_z(cfg, params, lm_params, phi_KxTxD, batch, rho, bank_size)
    return loss, metrics


def _qa_loss_and_z(cfg: MACConfig, params, lm_params, phi_KxTxD, batch, rho: float,
                   bank_size=None):
    """`loss_from_modulations`, also returning the question codes z0 and h's output z (both
    [⌊ρK⌋, T, D])."""
    K = phi_KxTxD.shape[0]
    k = num_scored(rho, K)
    phi = jnp.concatenate([phi_KxTxD[:k], jax.lax.stop_gradient(phi_KxTxD[k:])], axis=0)
    mac = MAC(cfg)
    valid = None if bank_size is None else curriculum_valid(k, K, bank_size)
    z0 = mac.apply({"params": params}, batch["questions"][:k], method=MAC.encode_question)
    z = mac.apply({"params": params}, z0, phi, valid, method=MAC.aggregate_z0)
    loss, metrics = _answer_loss(cfg, params, lm_params, z, batch, k)
    return loss, metrics, (z0, z)


def _answer_loss(cfg: MACConfig, params, lm_params, z_kxTxD, batch, k: int):
    """The frozen LM's answer loss on the first k QA rows, modulated by h's output z."""
    prefix_kv = MAC(cfg).apply({"params": params}, z_kxTxD, method=MAC.prefix)
    logits = modulated_logits(cfg, lm_params, batch["qa"][:k], prefix_kv)
    return qa_loss(cfg, lm_params, logits, batch["qa"][:k], batch["qa_weights"][:k])


def hierarchical_loss(cfg: MACConfig, params, lm_params, phi_KxTxD, z0_kxTxD, batch,
                      window: int, bank_size=None):
    """The answer loss through hierarchical aggregation with chunks of `window` documents, and
    h's output z [k, T, D]. Training it next to the flat loss teaches h to read its own chunk
    outputs as a bank (trained only flat, h left the hierarchical answers at chance)."""
    k, K = z0_kxTxD.shape[0], phi_KxTxD.shape[0]
    if not 2 <= window < K:
        raise ValueError(f"hierarchical window={window} is not allowed for a batch of K={K} "
                         f"documents; use 2 <= window < K")
    valid = None if bank_size is None else curriculum_valid(k, K, bank_size)
    z = MAC(cfg).apply({"params": params}, z0_kxTxD, phi_KxTxD, valid, window=window,
                       method=MAC.aggregate_z0)
    loss, metrics = _answer_loss(cfg, params, lm_params, z, batch, k)
    return loss, metrics, z


# ---------------------------------------------------------------------------------------------
# Auxiliary readouts (training only)
# ---------------------------------------------------------------------------------------------
def first_answer_tokens(qa_BxL, weights_BxL) -> jax.Array:
    """[B] (any leading axes) the first weighted token of each QA row: the answer's first byte."""
    first = jnp.argmax(jnp.asarray(weights_BxL) > 0, axis=-1)
    return jnp.take_along_axis(jnp.asarray(qa_BxL), first[..., None], axis=-1)[..., 0]


def init_readouts(cfg: MACConfig, relations: int) -> dict:
    """Zero-initialised linear heads: "g" [T·D, R, V] (every relation's answer from φ) and "h"
    [T·D, V] (the asked answer from h's output)."""
    F, V = cfg.num_tokens * cfg.width, cfg.lm.vocab_size
    return {"g": jnp.zeros((F, relations, V), jnp.float32), "h": jnp.zeros((F, V), jnp.float32)}


def _standardize(x_BxTxD) -> jax.Array:
    x = x_BxTxD.reshape(x_BxTxD.shape[0], -1).astype(jnp.float32)
    x = x - jnp.mean(x, -1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


READOUT_TEMPERATURE = 0.1  # of the question ↔ document cosine similarities


def _h_readout(readouts: dict, z_kxTxD, answers_k) -> tuple[jax.Array, jax.Array]:
    """(h's readout CE, its logits [k, V]): the asked answer from h's output z."""
    logits = _standardize(z_kxTxD) @ readouts["h"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, answers_k).mean(), logits


def readout_losses(readouts: dict, phi_KxTxD, z0_kxTxD, z_kxTxD, doc_answers_kxR, answers_k):
    """(g's readout CE + h's readout CE + retrieval CE, metrics).

    g's readout: every relation's answer from the first k documents' standardized, flattened φ;
    h's readout: the asked answer from h's output z; retrieval: question i's code z0 picks its
    own document i among all K of the bank by the cosine similarity of mean-pooled codes
    (`slot_keys`, the CMT top-k score), which teaches g and h to encode the entity on both sides.
    """
    k = z_kxTxD.shape[0]
    g_logits = jnp.einsum("bf,frv->brv", _standardize(phi_KxTxD[:k]), readouts["g"])
    h_ce, h_logits = _h_readout(readouts, z_kxTxD, answers_k)
    g_ce = optax.softmax_cross_entropy_with_integer_labels(g_logits, doc_answers_kxR).mean()
    sim = slot_keys(z0_kxTxD) @ slot_keys(phi_KxTxD).T / READOUT_TEMPERATURE   # [k, K]
    r_ce = optax.softmax_cross_entropy_with_integer_labels(sim, jnp.arange(k)).mean()
    return g_ce + h_ce + r_ce, {
        "g_readout_accuracy": jnp.mean(jnp.argmax(g_logits, -1) == doc_answers_kxR),
        "h_readout_accuracy": jnp.mean(jnp.argmax(h_logits, -1) == answers_k),
        "retrieval_accuracy": jnp.mean(jnp.argmax(sim, -1) == jnp.arange(k))}


def meta_loss(cfg: MACConfig, params, lm_params, batch, rho: float, bank_size=None,
              readouts: Optional[dict] = None, readout_weight: float = 0.0,
              hierarchical_window: int = 0, hierarchical_weight: float = 0.0):
    """Stage-2 loss: amortize the K documents (the last K-⌊ρK⌋ without gradients), score the
    first ⌊ρK⌋ questions against the whole bank; with `readouts` (init_readouts) and
    readout_weight > 0, plus readout_weight · `readout_losses` (g's and h's readouts and the
    retrieval loss) on the first ⌊ρK⌋ documents and questions. hierarchical_window W > 0 and
    hierarchical_weight > 0 add weight · the answer loss through hierarchical aggregation with
    chunks of W documents (`hierarchical_loss`), and h's readout of its output."""
    K = batch["docs"].shape[0]
    k = num_scored(rho, K)
    mac = MAC(cfg)
    phi_head = mac.apply({"params": params}, batch["docs"][:k], method=MAC.amortize)
    if k < K:
        phi_tail = mac.apply({"params": jax.lax.stop_gradient(params)}, batch["docs"][k:],
                             method=MAC.amortize)
        phi = jnp.concatenate([phi_head, jax.lax.stop_gradient(phi_tail)], axis=0)
    else:
        phi = phi_head
    loss, metrics, (z0, z) = _qa_loss_and_z(cfg, params, jax.lax.stop_gradient(lm_params), phi,
                                            batch, rho, bank_size)
    metrics = dict(metrics, qa_loss=loss)
    answers = first_answer_tokens(batch["qa"][:k], batch["qa_weights"][:k])
    use_readouts = readouts is not None and readout_weight > 0
    if use_readouts:
        aux, m = readout_losses(readouts, phi, z0, z, batch["doc_answers"][:k], answers)
        loss = loss + readout_weight * aux
        metrics.update(m)
    if hierarchical_window and hierarchical_weight > 0:
        h_loss, m, z_h = hierarchical_loss(cfg, params, jax.lax.stop_gradient(lm_params), phi,
                                           z0, batch, hierarchical_window, bank_size)
        loss = loss + hierarchical_weight * h_loss
        metrics.update(hierarchical_qa_loss=h_loss,
                       hierarchical_token_accuracy=m["token_accuracy"])
        if use_readouts:
            loss = loss + readout_weight * hierarchical_weight * _h_readout(readouts, z_h,
                                                                             answers)[0]
    return loss, metrics


def init_mac(cfg: MACConfig, key: jax.Array, *, doc_len: int = 16, q_len: int = 8):
    """Unboxed MAC params."""
    docs = jnp.zeros((2, doc_len), jnp.int32)
    qs = jnp.zeros((2, q_len), jnp.int32)
    return nn.unbox(_jitted_init(MAC(cfg))(key, docs, qs)["params"])


@functools.lru_cache(maxsize=8)
def cached_meta_step(cfg: MACConfig, lr: float, warmup_steps: int, clip: float, rho: float,
                     readout_weight: float = 0.0, hierarchical_weight: float = 0.0
                     ) -> tuple[optax.GradientTransformation, Callable]:
    """(optimizer, jitted step) shared by runs with the same settings (one compilation per
    hierarchical window)."""
    opt = make_optimizer(lr, warmup_steps=warmup_steps, clip=clip)
    return opt, make_meta_step(cfg, opt, rho, readout_weight, hierarchical_weight)


def make_meta_step(cfg: MACConfig, opt: optax.GradientTransformation, rho: float,
                   readout_weight: float = 0.0, hierarchical_weight: float = 0.0) -> Callable:
    """jitted (trainable, opt_state, lm_params, batch, bank_size, window=0) → (trainable,
    opt_state, metrics); trainable is {"mac": MAC params, "readouts": init_readouts(...) or
    None}; `window` (static) is the hierarchical term's chunk size (0: none)."""

    @functools.partial(jax.jit, static_argnames=("window",))
    def step(trainable, opt_state, lm_params, batch, bank_size, window=0):
        def loss_fn(t):
            return meta_loss(cfg, t["mac"], lm_params, batch, rho, bank_size,
                             readouts=t["readouts"], readout_weight=readout_weight,
                             hierarchical_window=window,
                             hierarchical_weight=hierarchical_weight)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "grad_norm": optim.global_norm(grads["mac"]),
                                      "bank_size": bank_size, **aux}

    return step


def meta_train(cfg: MACConfig, lm_params, batches: Iterator[dict], *, num_steps: int,
               key: jax.Array, lr: float = 1e-3, warmup_steps: int = 100, clip: float = 1.0,
               rho: float = 1.0, curriculum_steps: int = 0, curriculum_start: int = 0,
               readout_weight: float = 0.0, hierarchical_windows: Sequence[int] = (),
               hierarchical_weight: float = 0.0,
               log_every: int = 0, params=None,
               on_log: Optional[Callable[[int, dict], None]] = None) -> tuple[Any, list[dict]]:
    """Stage 2: meta-trains MAC against the frozen `lm_params`; returns (params, history).

    curriculum_steps > 0 grows each question's bank linearly from 1 document to the whole
    batch over that many steps (see `loss_from_modulations`), after `curriculum_start` steps on
    a bank of one document (its own); with curriculum_steps = 0 the bank is the whole batch
    from step `curriculum_start` on. readout_weight > 0 adds the auxiliary readouts (module
    docstring; the batches then need "doc_answers"); their heads are trained alongside and
    dropped at the end. hierarchical_windows (W, ...) with hierarchical_weight > 0 add the
    hierarchical answer loss (`hierarchical_loss`), step i using chunks of W = windows[i mod n]
    documents.
    """
    if curriculum_start < 0 or curriculum_steps < 0:
        raise ValueError(f"curriculum_start={curriculum_start}, curriculum_steps="
                         f"{curriculum_steps} are not allowed; both must be >= 0")
    if not readout_weight >= 0:
        raise ValueError(f"readout_weight={readout_weight!r} is not allowed; it must be >= 0")
    first = next(batches)
    if params is None:
        params = init_mac(cfg, key, doc_len=first["docs"].shape[1],
                          q_len=first["questions"].shape[1])
    readouts = None
    if readout_weight > 0:
        if "doc_answers" not in first:
            raise ValueError("readout_weight > 0 needs batches with 'doc_answers' [K, R] "
                             "(meta_batches of encode_docs output)")
        readouts = init_readouts(cfg, first["doc_answers"].shape[1])
    K = first["docs"].shape[0]
    if not hierarchical_weight >= 0:
        raise ValueError(f"hierarchical_weight={hierarchical_weight!r} is not allowed; it must "
                         f"be >= 0")
    windows = tuple(int(w) for w in hierarchical_windows) if hierarchical_weight > 0 else ()
    for w in windows:
        if not 2 <= w < K:
            raise ValueError(f"hierarchical_windows={tuple(hierarchical_windows)} is not "
                             f"allowed for a batch of K={K} documents; use 2 <= W < K")
    opt, step = cached_meta_step(cfg, float(lr), int(warmup_steps), float(clip), float(rho),
                                 float(readout_weight), float(hierarchical_weight))
    trainable = {"mac": params, "readouts": readouts}
    opt_state = opt.init(trainable)
    history, t0 = [], time.time()
    batch = first
    bar = tqdm(total=num_steps, desc="mac stage 2", unit="step", leave=False,
               disable=not log_every, dynamic_ncols=True)
    for i in range(num_steps):
        if i < curriculum_start:
            frac = 0.0
        else:
            frac = min(1.0, (i - curriculum_start) / curriculum_steps) if curriculum_steps else 1.0
        bank_size = jnp.int32(1 + round((K - 1) * frac))
        window = windows[i % len(windows)] if windows else 0
        trainable, opt_state, m = step(trainable, opt_state, lm_params, batch, bank_size,
                                       window=window)
        history.append({k: float(v) for k, v in m.items()})
        if log_every and (i + 1) % log_every == 0:
            mean = {k: float(np.mean([h[k] for h in history[-log_every:]])) for k in history[-1]}
            mean["seconds"] = round(time.time() - t0, 1)
            bar.set_postfix(loss=f"{mean['loss']:.4f}", refresh=False)
            if on_log is not None:
                on_log(i + 1, mean)
        bar.update(1)
        if i + 1 < num_steps:
            batch = next(batches)
    bar.close()
    return trainable["mac"], history


# ---------------------------------------------------------------------------------------------
# Batches from the fact stream (or any records with document/question/answer)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Lengths:
    doc: int = 112        # S: document bytes
    question: int = 32    # Q: question bytes (h's input)
    qa: int = 40          # L: `question SEP answer EOS`
    lm: int = 160         # stage-1 row length

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"lengths.{f.name}={v!r} must be a positive integer")


def encode_docs(docs: Sequence[dict], lengths: Lengths) -> dict:
    """Pre-encoded fact-stream documents: docs [N, S], and per relation r questions [N, R, Q],
    qa [N, R, L], qa_weights [N, R, L], doc_answers [N, R] (each answer's first token)."""
    n_rel = len(docs[0]["qas"])
    doc_tok = facts.encode_documents([d["document"] for d in docs], lengths.doc)
    qs = [qa["question"] for d in docs for qa in d["qas"]]
    ans = [qa["answer"] for d in docs for qa in d["qas"]]
    q_tok = facts.encode_questions(qs, lengths.question).reshape(len(docs), n_rel, -1)
    qa_tok, qa_w = facts.encode_qa(qs, ans, lengths.qa)
    answers = np.asarray(first_answer_tokens(qa_tok, qa_w), np.int32)
    return {"docs": doc_tok, "questions": q_tok,
            "qa": qa_tok.reshape(len(docs), n_rel, -1),
            "qa_weights": qa_w.reshape(len(docs), n_rel, -1),
            "doc_answers": answers.reshape(len(docs), n_rel)}


def meta_batches(encoded: dict, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless stage-2 batches: K distinct random documents, one random question each."""
    rng = np.random.default_rng(seed)
    n, n_rel = encoded["questions"].shape[:2]
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} documents available")
    while True:
        idx = rng.choice(n, size=batch_size, replace=False)
        rel = rng.integers(n_rel, size=batch_size)
        batch = {"docs": encoded["docs"][idx], "questions": encoded["questions"][idx, rel],
                 "qa": encoded["qa"][idx, rel], "qa_weights": encoded["qa_weights"][idx, rel]}
        if "doc_answers" in encoded:
            batch["doc_answers"] = encoded["doc_answers"][idx]
        yield batch


def lm_batches(docs: Sequence[dict], batch_size: int, length: int, seed: int, *,
               qa_only_fraction: float = 0.0) -> Iterator[dict]:
    """Endless stage-1 batches of `document EOS question SEP answer EOS` rows, and (a fraction
    `qa_only_fraction` of the rows, in expectation) packed `question SEP answer EOS` rows
    without the document (`qa_only_rows`)."""
    if not 0.0 <= qa_only_fraction < 1.0:
        raise ValueError(f"qa_only_fraction={qa_only_fraction} is not allowed; use 0 <= f < 1")
    recs = facts.qa_records(docs, questions_per_doc=None)
    rows = lm_rows(recs, length)
    if qa_only_fraction > 0:
        qrows = qa_only_rows(recs, length)
        # Repeat the (shorter) packed rows so that they make up the requested fraction.
        n_doc, n_q = rows["inputs"].shape[0], qrows["inputs"].shape[0]
        want = int(round(n_doc * qa_only_fraction / (1.0 - qa_only_fraction)))
        reps = np.arange(max(want, 1)) % n_q
        rows = {k: np.concatenate([rows[k], qrows[k][reps]]) for k in rows}
    rng = np.random.default_rng(seed)
    n = rows["inputs"].shape[0]
    while True:
        idx = rng.integers(n, size=batch_size)
        yield {k: v[idx] for k, v in rows.items()}
