"""MAC's training objectives (Tack et al. 2024, §3.2) for the shared trainer (train/trainer.py).

Stage 1, the base LM, is an ordinary trainer run (model "transformer", objective "lm") on the
"mac_lm" rows (train/data/mac_data.py). Stage 2 meta-trains g, h and the prefix FFN with the base
LM frozen: model "mac" (`MetaModel`: params {"lm", "mac", "readouts"}, "lm" frozen through the
optimizer, train/optim.py `frozen`), objective "mac_meta" (`meta_objective`) on "mac_meta"
batches. `train/configs/mac.py` holds both stages; the trainer runs stage 1 into WORKDIR/base_lm
first (config.base_lm) and starts stage 2's "lm" from it.

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

Stage-2 batches (`meta_loss`) are dicts of arrays:
    docs       [K, S] int32   document bytes, PAD-padded
    questions  [K, Q] int32   question bytes (h's input), PAD-padded
    qa         [K, L] int32   `question SEP answer EOS`, PAD-padded (the LM's input)
    qa_weights [K, L] float32 1 on the answer bytes and EOS
    doc_answers [K, R] int32  first answer token of each of the document's R questions
                              (g's readout; optional when readout_weight = 0)
    answers    [K] int32      first answer token of the question asked (h's readout; optional
                              when readout_weight = 0)
`meta_objective` takes "mac_meta" batches, which hold all R questions of each document
([K, R, Q], [K, R, L]), and draws the one asked from the step's RNG.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from models.mac import MAC, MACConfig, modulated_logits, slot_keys
from models.t5 import T5Config
from models.transformer import Transformer, TransformerConfig
from train.data import tokenizer as tok
from train.objectives.lm import token_losses


# ---------------------------------------------------------------------------------------------
# The base LM
# ---------------------------------------------------------------------------------------------
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


def _finetune_update(loss_fn, lm_params, opt_state, clip_norm):
    """One Adam step on loss_fn(params), the gradient first clipped to global norm `clip_norm`."""
    g = jax.grad(loss_fn)(lm_params)
    g = jax.tree.map(lambda x: x * jnp.minimum(1.0, clip_norm / (optax.global_norm(g) + 1e-12)),
                     g)
    u, opt_state = finetune_optimizer().update(g, opt_state, lm_params)
    return optax.apply_updates(lm_params, u), opt_state


@functools.partial(jax.jit, static_argnames=("cfg",))
def finetune_step(cfg: MACConfig, lm_params, opt_state, doc_1xS):
    """One Adam step of the base LM on one document's next-token loss: (params, opt_state)."""
    batch = {"inputs": doc_1xS[:, :-1], "targets": doc_1xS[:, 1:],
             "weights": (doc_1xS[:, 1:] != tok.PAD).astype(jnp.float32)}
    return _finetune_update(lambda q: lm_loss(cfg.lm, q, batch), lm_params, opt_state, jnp.inf)


@functools.partial(jax.jit, static_argnames=("lm_cfg",))
def lm_finetune_step(lm_cfg: TransformerConfig, lm_params, opt_state, tokens_1xS, weights_1xS,
                     clip_norm):
    """One Adam step of a pretrained LM on one document in its own tokens [1, S] (its pad may be
    a real token, GPT-2's EOS): (params, opt_state).

    The loss is the official uniform baseline's (CaMeLS, nathanhu0/CaMeLS util.py
    `weighted_lm_loss` with weight 1 on the real tokens): next-token cross-entropy where
    weights[t+1] = 1, summed and divided by the S - 1 predicted positions of the padded row, so a
    short document gives a smaller gradient. The gradient is clipped at global norm `clip_norm`
    (a scalar array, like the learning rate in the optimizer state: one compiled step serves a
    whole sweep)."""
    def loss(q):
        logits = Transformer(lm_cfg).apply({"params": q}, tokens_1xS[:, :-1])
        ce, _ = token_losses(logits, tokens_1xS[:, 1:])
        return jnp.sum(ce * weights_1xS[:, 1:].astype(jnp.float32)) / ce.size

    return _finetune_update(loss, lm_params, opt_state, clip_norm)


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
              hierarchical_window: int | Sequence[int] = 0, hierarchical_weight: float = 0.0,
              window_index=0):
    """Stage-2 loss: amortize the K documents (the last K-⌊ρK⌋ without gradients), score the
    first ⌊ρK⌋ questions against the whole bank; with `readouts` (init_readouts) and
    readout_weight > 0, plus readout_weight · `readout_losses` (g's and h's readouts and the
    retrieval loss) on the first ⌊ρK⌋ documents and questions. hierarchical_window W > 0 and
    hierarchical_weight > 0 add weight · the answer loss through hierarchical aggregation with
    chunks of W documents (`hierarchical_loss`), and h's readout of its output.

    hierarchical_window may also be a tuple of windows, of which `window_index` (an int, or a
    traced one: the trainer's step) picks one under `lax.switch`; only the hierarchical term is
    inside the switch, so the rest of the loss is traced and compiled once."""
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
    use_readouts = readouts is not None and readout_weight > 0
    if use_readouts:
        answers = batch["answers"][:k]
        aux, m = readout_losses(readouts, phi, z0, z, batch["doc_answers"][:k], answers)
        loss = loss + readout_weight * aux
        metrics.update(m)
    windows = (tuple(hierarchical_window) if isinstance(hierarchical_window, (tuple, list))
               else (hierarchical_window,))
    if windows and all(windows) and hierarchical_weight > 0:
        def term(window):
            def f(params, readouts, phi, z0):
                h_loss, m, z_h = hierarchical_loss(cfg, params, jax.lax.stop_gradient(lm_params),
                                                   phi, z0, batch, window, bank_size)
                extra = (_h_readout(readouts, z_h, answers)[0] if use_readouts
                         else jnp.zeros((), h_loss.dtype))
                return h_loss, m["token_accuracy"], extra
            return f
        operands = (params, readouts if use_readouts else {}, phi, z0)
        if len(windows) == 1:
            h_loss, h_accuracy, h_readout = term(windows[0])(*operands)
        else:
            h_loss, h_accuracy, h_readout = jax.lax.switch(
                window_index % len(windows), [term(w) for w in windows], *operands)
        loss = loss + hierarchical_weight * h_loss
        metrics.update(hierarchical_qa_loss=h_loss, hierarchical_token_accuracy=h_accuracy)
        if use_readouts:
            loss = loss + readout_weight * hierarchical_weight * h_readout
    return loss, metrics


def init_mac(cfg: MACConfig, key: jax.Array, *, doc_len: int = 16, q_len: int = 8):
    """Unboxed MAC params."""
    docs = jnp.zeros((2, doc_len), jnp.int32)
    qs = jnp.zeros((2, q_len), jnp.int32)
    return nn.unbox(_jitted_init(MAC(cfg))(key, docs, qs)["params"])



# ---------------------------------------------------------------------------------------------
# Stage 2 in the trainer: model "mac", objective "mac_meta"
# ---------------------------------------------------------------------------------------------
class MetaModel(nn.Module):
    """Stage 2's trainer model: params {"lm": the base LM (frozen by the optimizer, started
    from stage 1), "mac": g, h and the prefix FFN, "readouts": the training-only heads
    (`init_readouts`, when relations > 0)}. Calling it only creates the parameters (the
    tokens stand for documents, questions and the LM's input); `meta_objective` uses them."""
    cfg: MACConfig
    relations: int = 0            # R: readout heads for R relations (0: no readouts)

    @nn.compact
    def __call__(self, tokens_BxT):
        Transformer(self.cfg.lm, name="lm")(tokens_BxT)
        MAC(self.cfg, name="mac")(tokens_BxT, tokens_BxT)
        if self.relations:
            self.param("readouts", lambda _: init_readouts(self.cfg, self.relations))
        return tokens_BxT


def mac_config(model_cfg: dict) -> MACConfig:
    """The MACConfig of a trainer model config {family: "mac", lm: {...}, MACConfig fields,
    readout_relations} (window/topk 0 = None; doc_encoder / question_encoder: T5Config fields,
    empty or absent = None)."""
    m = {k: v for k, v in dict(model_cfg).items() if k not in ("family", "readout_relations")}
    lm = TransformerConfig.from_dict(dict(m.pop("lm")))
    m["window"] = m.get("window") or None
    m["topk"] = m.get("topk") or None
    for name in ("doc_encoder", "question_encoder"):
        t5 = m.get(name)
        m[name] = T5Config(**dict(t5)) if t5 else None
    return MACConfig(lm=lm, **m)


def t5_fields(path: str, vocab_size: int) -> dict:
    """A trainer model config's `doc_encoder` / `question_encoder`: the T5Config fields of the
    checkpoint at `path` (its config.json; encoder only) with the vocabulary grown to
    `vocab_size` (the amortization tokenizer's, if larger; new rows the mean row)."""
    from models import pretrained
    cfg = T5Config.from_hf(pretrained.read_config(pretrained.resolve(path)), encoder_only=True)
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if f.name not in ("dtype", "param_dtype")}
    out["vocab_size"] = max(cfg.vocab_size, vocab_size)
    return out


def _grown(tree, path, vocab_size):
    """`tree` with the 2-D table at `path` grown to vocab_size rows (models/vocab.py)."""
    from models import vocab
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = vocab.resize_embeddings(node[path[-1]], vocab_size)
    return tree


def params_from_hf(model: "MetaModel", init_from_hf, params: dict, *, mesh=None,
                   rules=None) -> dict:
    """train.trainer.INIT_FROM_HF["mac"]: `params` ({"lm", "mac", ...}, a fresh init) with the
    frozen LM from init_from_hf.lm (a GPT-2 / LLaMA checkpoint, models/pretrained.params_for:
    vocabulary grown to the LM tokenizer's) and the T5 encoders of g and h from
    init_from_hf.doc_encoder / question_encoder (T5 checkpoints read encoder-only, vocabulary
    grown likewise); each leaf placed in the sharding of the leaf it replaces."""
    from models import pretrained
    cfg = model.cfg
    init = dict(init_from_hf)
    unknown = sorted(set(init) - {"lm", "doc_encoder", "question_encoder"})
    if unknown or not init.get("lm"):
        raise ValueError(f"init_from_hf={init!r} is not allowed for model.family='mac'; give "
                         "{lm: CHECKPOINT, doc_encoder: T5_CHECKPOINT, question_encoder: "
                         "T5_CHECKPOINT} (the encoders optional)")
    out = {**params, "mac": dict(params["mac"])}
    out["lm"] = pretrained.params_for(cfg.lm, init["lm"], mesh=mesh, rules=rules)
    for name in ("doc_encoder", "question_encoder"):
        path, t5 = init.get(name), getattr(cfg, name)
        if not path:
            continue
        if t5 is None:
            raise ValueError(f"init_from_hf.{name}={path!r} needs model.{name} (the T5Config "
                             "fields, t5_fields(path, vocab))")
        enc, p = pretrained.from_hf(path, t5.param_dtype, compute_dtype=t5.dtype,
                                    encoder_only=True)
        for f in dataclasses.fields(t5):
            if f.name not in ("vocab_size", "dtype", "param_dtype", "num_decoder_layers",
                              "decoder_start_token_id", "tie_word_embeddings") \
                    and getattr(t5, f.name) != getattr(enc.cfg, f.name):
                raise ValueError(f"model.{name}.{f.name}={getattr(t5, f.name)!r} differs from "
                                 f"the checkpoint's {getattr(enc.cfg, f.name)!r} ({path})")
        p = _grown(jax.tree_util.tree_map(lambda x: x, p), ("shared", "embedding"),
                   t5.vocab_size)
        old = params["mac"][name]["t5"]
        p = jax.tree_util.tree_map(lambda new, o: jax.device_put(new, o.sharding), p, old)
        out["mac"][name] = {**params["mac"][name], "t5": p}
    out["lm"] = jax.tree_util.tree_map(lambda new, o: jax.device_put(new, o.sharding),
                                       out["lm"], params["lm"])
    return out


def build_model(model_cfg: dict) -> MetaModel:
    """train.trainer.MODELS["mac"]."""
    relations = model_cfg.get("readout_relations", 0)
    if isinstance(relations, bool) or not isinstance(relations, int) or relations < 0:
        raise ValueError(f"model.readout_relations={relations!r} must be an integer >= 0")
    return MetaModel(mac_config(model_cfg), relations)


def curriculum_bank_size(step, K: int, start: int, steps: int) -> jax.Array:
    """int32 bank size at optimizer step `step` (0-based, may be traced): 1 for the first
    `start` steps, then growing linearly to K over `steps` steps (rounded half to even), K
    afterwards; `steps` = 0 gives K from step `start` on."""
    step = jnp.asarray(step, jnp.float32)
    if steps:
        frac = jnp.clip((step - start) / steps, 0.0, 1.0)
    else:
        frac = (step >= start).astype(jnp.float32)
    return (1 + jnp.round((K - 1) * frac)).astype(jnp.int32)


def check_settings(K: int, *, rho: float, readout_weight: float,
                   hierarchical_windows: Sequence[int], hierarchical_weight: float,
                   curriculum_start: int, curriculum_steps: int) -> None:
    """Raises a ValueError naming the objective_config field `meta_objective` cannot use with
    batches of K documents."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"objective_config.rho={rho!r} is not allowed; backpropagation dropout "
                         "needs 0 < ρ ≤ 1")
    for name, v in (("curriculum_start", curriculum_start),
                    ("curriculum_steps", curriculum_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"objective_config.{name}={v!r} is not allowed; use an integer >= 0")
    for name, v in (("readout_weight", readout_weight),
                    ("hierarchical_weight", hierarchical_weight)):
        if not v >= 0:
            raise ValueError(f"objective_config.{name}={v!r} is not allowed; it must be >= 0")
    if hierarchical_weight > 0:
        if not hierarchical_windows or not all(2 <= w < K for w in hierarchical_windows):
            raise ValueError(f"objective_config.hierarchical_windows="
                             f"{tuple(hierarchical_windows)} is not allowed for batches of "
                             f"K={K} documents; give one or more W with 2 <= W < K")


def check_config(config) -> None:
    """train.trainer.OBJECTIVE_CHECKS["mac_meta"]: `check_settings` for a trainer config, before
    anything trains (a micro-batch is K = batch_size / optim.grad_accum documents)."""
    check_settings(config.batch_size // config.optim.grad_accum,
                   **config.get("objective_config", {}))


def meta_objective(apply_fn, params, batch, rng, *, step=None, memory=None, rho: float = 1.0,
                   readout_weight: float = 0.0, hierarchical_windows: Sequence[int] = (),
                   hierarchical_weight: float = 0.0, curriculum_start: int = 0,
                   curriculum_steps: int = 0):
    """train.trainer.OBJECTIVES["mac_meta"] (settings from config.objective_config) on
    "mac_meta" batches: each document is asked one of its R questions, drawn from `rng`; the
    bank of each question grows with `step` (`curriculum_bank_size`; step None: the whole
    batch, as at evaluation); step i adds the hierarchical term with chunks of
    W = hierarchical_windows[i mod n] (evaluation: the first W). Returns (`meta_loss`,
    {"weight": 1, "correct": the answers' token accuracy, every other metric of meta_loss,
    "bank_size"}): the trainer's sums over one batch."""
    del memory   # MAC's bank is the batch's documents here
    model = getattr(apply_fn, "__self__", None)
    if not isinstance(model, MetaModel):
        raise ValueError("objective 'mac_meta' needs model.family='mac' (apply_fn of a "
                         f"MetaModel); got {type(model).__name__}")
    cfg = model.cfg
    K, R = batch["questions"].shape[:2]
    check_settings(K, rho=rho, readout_weight=readout_weight,
                   hierarchical_windows=hierarchical_windows,
                   hierarchical_weight=hierarchical_weight, curriculum_start=curriculum_start,
                   curriculum_steps=curriculum_steps)
    if readout_weight > 0 and "readouts" not in params:
        raise ValueError(f"objective_config.readout_weight={readout_weight} needs readout heads: "
                         "set model.readout_relations to the number of relations")
    rel = jax.random.randint(rng, (K,), 0, R)
    pick = lambda x: jnp.take_along_axis(x, rel[:, None, None], axis=1)[:, 0]  # noqa: E731
    asked = {"docs": batch["docs"], "questions": pick(batch["questions"]),
             "qa": pick(batch["qa"]), "qa_weights": pick(batch["qa_weights"]),
             "doc_answers": batch["doc_answers"],
             "answers": jnp.take_along_axis(batch["doc_answers"], rel[:, None], axis=1)[:, 0]}
    bank_size = (jnp.int32(K) if step is None
                 else curriculum_bank_size(step, K, curriculum_start, curriculum_steps))
    windows = tuple(int(w) for w in hierarchical_windows) if hierarchical_weight > 0 else (0,)
    if step is None:
        windows = windows[:1]
    loss, metrics = meta_loss(cfg, params["mac"], params["lm"], asked, rho, bank_size,
                              readouts=params.get("readouts"), readout_weight=readout_weight,
                              hierarchical_window=windows,
                              hierarchical_weight=hierarchical_weight,
                              window_index=0 if step is None else step)
    metrics = dict(metrics)
    correct = metrics.pop("token_accuracy")
    return loss, {"weight": jnp.float32(1.0), "correct": correct,
                  "bank_size": bank_size.astype(jnp.float32), **metrics}


# ---------------------------------------------------------------------------------------------
# The memory benchmark's adaptation (train/data/memory_bench_mac.py): one bank per example
# ---------------------------------------------------------------------------------------------
def example_banks(cfg: MACConfig, params, docs_BxNxS) -> tuple[jax.Array, jax.Array]:
    """(the modulations of every example's documents [B·N, T, D], valid [B, B·N]: question b
    reads only its own example's non-empty documents)."""
    B, N, S = docs_BxNxS.shape
    flat = docs_BxNxS.reshape(B * N, S)
    phi = MAC(cfg).apply({"params": params}, flat, method=MAC.amortize)
    own = jnp.arange(B * N)[None, :] // N == jnp.arange(B)[:, None]
    return phi, own & (flat[:, 0] != cfg.pad_id)[None, :]


def bench_logits(cfg: MACConfig, params, lm_params, docs_BxNxS, questions_BxQ, qa_BxL):
    """The frozen LM's logits [B, L, V] on qa rows, each modulated by the aggregation of its own
    example's bank (the documents docs[b]) for its question."""
    phi, valid = example_banks(cfg, params, docs_BxNxS)
    mac = MAC(cfg)
    z0 = mac.apply({"params": params}, questions_BxQ, method=MAC.encode_question)
    z = mac.apply({"params": params}, z0, phi, valid, method=MAC.aggregate_z0)
    prefix_kv = mac.apply({"params": params}, z, method=MAC.prefix)
    return modulated_logits(cfg, lm_params, qa_BxL, prefix_kv)


def bench_objective(apply_fn, params, batch, rng, *, step=None, memory=None):
    """train.trainer.OBJECTIVES["mac_bench"] on memory_bench MAC rows ({docs [B, N, S],
    questions [B, Q], qa [B, L], qa_weights [B, L]}): the answer cross-entropy of the frozen LM
    (params["lm"], under stop_gradient and frozen by the optimizer) modulated by each example's
    own bank. Returns (mean loss, {"weight": 1, "correct": answer-token accuracy})."""
    del rng, step, memory
    model = getattr(apply_fn, "__self__", None)
    if not isinstance(model, MetaModel):
        raise ValueError("objective 'mac_bench' needs model.family='mac' (apply_fn of a "
                         f"MetaModel); got {type(model).__name__}")
    cfg = model.cfg
    lm = jax.lax.stop_gradient(params["lm"])
    logits = bench_logits(cfg, params["mac"], lm, batch["docs"], batch["questions"], batch["qa"])
    loss, metrics = qa_loss(cfg, lm, logits, batch["qa"], batch["qa_weights"])
    return loss, {"weight": jnp.float32(1.0), "correct": metrics["token_accuracy"]}
