"""The shared training loop (the LM, landmark, Birdie, MAC and DKVB configs, DKVB's encoders,
Birdie's controller as a hook, the phone-book figure's runs; only the recall figure's arms do
not train here yet).

    train(config, workdir, *, allow_changes=()) -> summary dict

config (an ml_collections.ConfigDict, see train/configs/lm.py for every field) →
mesh (train/sharding.py) → data (train/data/) → model + memory state + objective →
sharded init → jitted step (in/out shardings, donated state) → eval hooks → Orbax checkpoints →
WORKDIR/metrics.jsonl and TensorBoard events (train/metrics.py: on any filesystem epath
reaches).

Guarantees: resumes from the newest readable checkpoint in `workdir` (params, optimizer, step,
RNG, memory, data-iterator position), and only a run trained under the same config: before it
restores or writes anything it compares the workdir's stored config with `config`
(train/config_identity.py: run-control fields such as num_steps, checkpoint_every or mesh may
differ) and raises `ConfigMismatchError` (a ValueError) naming the differing fields unless
`allow_changes` names them; an unreadable newest checkpoint is moved aside to
WORKDIR/unreadable_checkpoints/ and the one before it restored (if none restores,
`NoReadableCheckpointError`, nothing moved); SIGTERM saves and returns normally; a NaN/inf loss
raises `FloatingPointError` naming the step, after the last good checkpoint is safely on disk;
two runs with one seed give bit-identical results on CPU. A run with `config.init_from` (another
run's workdir) starts from that run's newest parameters (checkpoint.restore_params) with a fresh
optimizer, RNG and hook state: a fine-tune; once it has saved, it resumes from its own checkpoints.
`config.init_from_hf` (a Hugging Face checkpoint directory or hub id) does the same from a
pretrained GPT-2 or LLaMA-family model (models/pretrained.py; the model section must be the
checkpoint's, `pretrained.model_config`, with vocab_size possibly larger), into a Transformer or
into the decoder a family wraps (`body_config`: a LandmarkLM's config.model, whose attention may
differ: the parameters are the same); INIT_FROM_HF names the loader of each family (MAC: a
frozen LM and T5 encoders).

A run with `config.base_lm` (a whole trainer config: MAC's stage 1) first trains that run into
WORKDIR/base_lm (skipped once it reached base_lm.num_steps), and starts its own params["lm"]
from that run's newest parameters; `optim.frozen` (train/optim.py) keeps them fixed.

A family plugs in by adding entries to MODELS (a builder from the model config to a Linen
module) and OBJECTIVES (a loss, see train/objectives/lm.py: it gets the step being taken, the
train state's memory, and config.objective_config's fields as keywords; OBJECTIVE_CHECKS may
check those before anything trains), and, where it keeps a memory, MEMORY (an init from
config.memory.NAME's settings; the objective reads it and may return its next value as
aux["memory"], as DKVB's usage counts). Something that must act on the run
between steps (Birdie's controller) is a hook: config.hooks.NAME holds its settings and HOOKS[NAME]
builds it as `build(hook_config, config) -> Hook`, an object with

    name                                   its key in TrainState.memory
    init(key) -> pytree                    its state: kept in TrainState.memory[name], sharded
                                           (replicated unless its leaves carry logical axes) and
                                           checkpointed with the rest, so a resume restores it
    data_overrides(state) -> dict          train-data config fields its state sets (e.g. the
                                           mixture); the trainer rebuilds the train iterator at the
                                           same position whenever they change, and after a restore
    due(step) -> bool                      whether it runs after optimizer step `step`
    update(run, params, state, step) -> (state, row)
                                           runs after that step's evaluation and before its
                                           checkpoint; `row` goes to metrics.jsonl
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import math
import os
import pathlib
import signal
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from models.transformer import Transformer, TransformerConfig
from train import checkpoint as ckpt_lib
from train import config_identity
from train import metrics as metrics_lib
from train import sharding as shd
from train.data import pipeline
from train.optim import check_config as check_optim_config
from train.optim import global_norm, make_optimizer

log = logging.getLogger(__name__)

# name → "module:function". Builders take the model config as a dict and return a Linen module
# called as module.apply({"params": p}, inputs_BxT, ...).
MODELS: dict[str, str] = {
    "transformer": "train.trainer:build_transformer",
    "landmark": "models.landmark:build_from_config",
    "ssm": "models.ssm:build_from_config",
    "mac": "train.objectives.mac:build_model",
    "autoencoder": "models.encoders:build_autoencoder",
    "cnn": "models.encoders:build_cnn",
    "dkvb": "train.objectives.dkvb:build_dkvb",
    "probe": "train.objectives.dkvb:build_probe",
}
# name → "module:function" with loss(apply_fn, params, batch, rng, *, step=None, memory=None,
# **settings) -> (loss_sum, aux sums) (train/objectives/lm.py); settings: config.objective_config.
OBJECTIVES: dict[str, str] = {
    "lm": "train.objectives.lm:loss",
    "landmark": "train.objectives.landmark:loss",
    "transformer_xl": "train.objectives.transformer_xl:loss",
    "birdie": "train.objectives.birdie:trainer_loss",
    "mac_meta": "train.objectives.mac:meta_objective",
    "mac_bench": "train.objectives.mac:bench_objective",
    "reconstruct": "train.objectives.encoders:reconstruct_loss",
    "classify": "train.objectives.encoders:classify_loss",
    "dkvb": "train.objectives.dkvb:dkvb_loss",
    "probe": "train.objectives.dkvb:probe_loss",
}
# objective name → "module:function" check(config) raising a ValueError for settings it cannot use
OBJECTIVE_CHECKS: dict[str, str] = {
    "landmark": "train.objectives.landmark:check_config",
    "transformer_xl": "train.objectives.transformer_xl:check_config",
    "mac_meta": "train.objectives.mac:check_config",
    "dkvb": "train.objectives.dkvb:check_config",
}
# name → "module:function" init(settings, config, key) -> pytree: a family's memory, kept in
# TrainState.memory[name] (config.memory.NAME holds its settings), read by the objective and
# updated by it where it returns aux["memory"] (DKVB's codebooks and their usage counts).
MEMORY: dict[str, str] = {
    "dkvb_codebooks": "train.objectives.dkvb:init_codebooks",
}
# model.family → "module:function" load(model, init_from_hf, params, *, mesh, rules) -> params:
# a fresh init's params with a pretrained Hugging Face checkpoint's weights (config.init_from_hf:
# a checkpoint path for "transformer"; MAC: {lm, doc_encoder, question_encoder} paths).
INIT_FROM_HF: dict[str, str] = {
    "transformer": "train.trainer:transformer_from_hf",
    "landmark": "train.trainer:transformer_from_hf",
    "mac": "train.objectives.mac:params_from_hf",
}
# name → "module:function" with build(hook_config, config) -> Hook (see the module docstring).
HOOKS: dict[str, str] = {
    "birdie_controller": "train.objectives.birdie_controller:make_hook",
}

REQUIRED_FIELDS = ("seed", "num_steps", "batch_size", "checkpoint_every", "eval_every", "mesh")
KNOWN_FIELDS = set(REQUIRED_FIELDS) | {
    "seq_len", "log_every", "keep_checkpoints", "async_checkpoints", "sharding_rules", "model",
    "data", "optim", "eval", "objective", "objective_config", "debug", "progress", "name",
    "hooks", "init_from", "init_from_hf", "base_lm", "input_shape", "memory", "profile_steps"}


def _resolve(table: dict[str, str], name: str, what: str) -> Callable:
    if name not in table:
        raise ValueError(f"{what}={name!r} is not allowed; registered: {sorted(table)}")
    mod, fn = table[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def build_transformer(model_cfg: dict) -> nn.Module:
    cfg = {k: v for k, v in model_cfg.items() if k != "family"}
    return Transformer(TransformerConfig.from_dict(cfg))


def body_config(model: nn.Module) -> TransformerConfig:
    """The decoder config of a model `init_from_hf` fills: a Transformer's `cfg`, or the
    TransformerConfig a family's config wraps as `.model` (LandmarkLM)."""
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, TransformerConfig):
        return cfg
    inner = getattr(getattr(model, "config", None), "model", None)
    if isinstance(inner, TransformerConfig):
        return inner
    raise ValueError(f"init_from_hf cannot fill a {type(model).__name__}: it has no "
                     "TransformerConfig (`cfg`, or `config.model`)")


def transformer_from_hf(model: nn.Module, init_from_hf: str, params, *, mesh=None,
                        rules=None) -> dict:
    """INIT_FROM_HF["transformer"] and ["landmark"]: the checkpoint's parameters for the model's
    decoder (`body_config`; models/pretrained.params_for)."""
    del params   # every parameter comes from the checkpoint
    from models import pretrained
    return pretrained.params_for(body_config(model), init_from_hf, mesh=mesh, rules=rules)


def build_model(model_cfg: Any) -> nn.Module:
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return _resolve(MODELS, d.get("family", "transformer"), "model.family")(d)


# datasets whose batches are token ids (a model's vocabulary must hold them all)
TOKEN_DATASETS = ("mqar", "text", "tfds", "birdie", "recall", "passkey", "mac_lm",
                  "memory_bench")


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------
def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails early with a ValueError naming the field, its value and what is allowed."""
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise ValueError(f"config is missing required fields {missing}")
    unknown = sorted(set(config.keys()) - KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"config has unknown fields {unknown}; allowed: {sorted(KNOWN_FIELDS)}")
    for f in ("num_steps", "checkpoint_every", "eval_every"):
        v = config[f]
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{f}={v!r} must be an integer ≥ 0")
    prof = tuple(config.get("profile_steps") or ())
    if prof and not (len(prof) == 2 and all(isinstance(v, int) for v in prof)
                     and 1 <= prof[0] <= prof[1]):
        raise ValueError(f"profile_steps={prof!r} is not allowed; use (FIRST, LAST) with "
                         "1 <= FIRST <= LAST, or () for no trace")
    if not isinstance(config.batch_size, int) or config.batch_size <= 0:
        raise ValueError(f"batch_size={config.batch_size!r} must be a positive integer")
    if config.get("seq_len", 1) <= 0:
        raise ValueError(f"seq_len={config.seq_len!r} must be positive")
    o = config.optim
    check_optim_config(o)         # what train/optim.py needs to build it
    if o.grad_accum < 1 or config.batch_size % o.grad_accum:
        raise ValueError(f"optim.grad_accum={o.grad_accum!r} must be ≥ 1 and divide "
                         f"batch_size={config.batch_size}")
    if o.clip_norm is not None and o.clip_norm <= 0:
        raise ValueError(f"optim.clip_norm={o.clip_norm!r} must be positive or None")
    if config.get("base_lm"):
        validate_config(config.base_lm)
    family = config.model.get("family", "transformer")
    if config.get("init_from_hf") and family not in INIT_FROM_HF:
        raise ValueError(f"init_from_hf needs model.family in {sorted(INIT_FROM_HF)}, not "
                         f"{family!r}")
    vocab = config.model.get("vocab_size")
    if vocab is not None and config.data.name in TOKEN_DATASETS:
        need = pipeline.vocab_size(config.data)
        if vocab < need:
            tok = config.data.get("tokenizer", "byte")
            with_tok = f" with data.tokenizer={tok!r}" if tok != "byte" else ""
            raise ValueError(f"model.vocab_size={vocab} is not allowed: data.name="
                             f"{config.data.name!r}{with_tok} produces token ids up to "
                             f"{need - 1}; use >= {need}")
    if family in ("transformer", "landmark"):   # their model configs check their own fields
        build_model(config.model)
    mem_freq = config.model.get("mem_freq")
    if config.model.get("family") == "landmark" and mem_freq and config.get("seq_len"):
        if config.seq_len < mem_freq:   # a row must hold a whole block and its landmark
            raise ValueError(f"seq_len={config.seq_len} is not allowed with model.mem_freq="
                             f"{mem_freq}: a row holds no landmark block; use seq_len >= "
                             f"{mem_freq}")
    objective = config.get("objective", "lm")
    _resolve(OBJECTIVES, objective, "objective")
    if objective in OBJECTIVE_CHECKS:
        _resolve(OBJECTIVE_CHECKS, objective, "objective")(config)


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps done
    params: Any
    opt_state: Any
    rng: jax.Array           # uint32 [2]: raw PRNG key data (checkpointable)
    memory: Any              # state pytrees by name: a family's memory, a hook's state ({})


@dataclasses.dataclass
class Run:
    """Everything train() builds; exposed for tests, notebooks and evaluators."""
    config: ml_collections.ConfigDict
    mesh: Any
    rules: Any
    model: nn.Module
    tx: Any
    schedule: Any
    state_shardings: Any
    batch_sharding: Any
    init_fn: Callable
    objective: Callable
    hooks: tuple = ()         # built from config.hooks, in its order


def _dummy_inputs(config) -> jax.Array:
    """The input `model.init` sees: one row of seq_len tokens, or one float input of
    config.input_shape (images)."""
    if config.get("input_shape"):
        return jnp.zeros((1, *config.input_shape), jnp.float32)
    return jnp.zeros((1, config.get("seq_len", 8)), jnp.int32)


def setup(config: ml_collections.ConfigDict, *, devices=None) -> Run:
    validate_config(config)
    mesh = shd.make_mesh(config.mesh, devices)
    rules = shd.rules_from_config(config)
    shd.check_batch(config.batch_size, mesh, rules)
    shd.check_batch(config.batch_size // config.optim.grad_accum, mesh, rules,
                    field="batch_size/optim.grad_accum")
    model = build_model(config.model)
    tx, schedule = make_optimizer(config.optim, config.num_steps)
    objective = _resolve(OBJECTIVES, config.get("objective", "lm"), "objective")
    if config.get("objective_config"):
        objective = functools.partial(objective, **config.objective_config.to_dict())
    hooks = build_hooks(config)
    memory_inits = {name: functools.partial(_resolve(MEMORY, name, "memory"), settings, config)
                    for name, settings in config.get("memory", {}).items()}
    clash = sorted(set(memory_inits) & {h.name for h in hooks})
    if clash:
        raise ValueError(f"memory={clash} shares a name with a hook; each needs its own")
    dummy = _dummy_inputs(config)

    def init_fn(seed_key):
        init_key, run_key = jax.random.split(seed_key)
        params = model.init(init_key, dummy)["params"]
        memory = {h.name: h.init(jax.random.fold_in(seed_key, 1 + i))
                  for i, h in enumerate(hooks)}
        for i, (name, init) in enumerate(memory_inits.items()):
            memory[name] = init(jax.random.fold_in(seed_key, 1001 + i))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=shd.drop_empty_boxes(tx.init(params)),
                          rng=jax.random.key_data(run_key),
                          memory=memory)

    seed_key = jax.random.key(config.seed)
    # Traced for the mesh's devices, as the init and the step are (a model picks its kernels by
    # the platform traced for: layers.target_backend).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        abstract = jax.eval_shape(init_fn, seed_key)
    shardings = shd.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    shd.check_divisible(nn.unbox(abstract), shardings)
    return Run(config=config, mesh=mesh, rules=rules, model=model, tx=tx, schedule=schedule,
               # rows over the batch axes, any trailing axes replicated (labels [B] too)
               state_shardings=shardings, batch_sharding=shd.batch_sharding(mesh, rules, ndim=1),
               init_fn=init_fn, objective=objective, hooks=hooks)


def build_hooks(config) -> tuple:
    """The hooks config.hooks names (HOOKS), built from their settings, in config order."""
    hooks = []
    for name, hook_config in config.get("hooks", {}).items():
        hooks.append(_resolve(HOOKS, name, "hooks")(hook_config, config))
    names = [h.name for h in hooks]
    if len(set(names)) != len(names):
        raise ValueError(f"hooks={names} share a memory name; each needs its own")
    return tuple(hooks)


def init_state(run: Run) -> TrainState:
    """Sharded init: each leaf is created directly in its sharding (jit out_shardings)."""
    seed_key = jax.random.key(run.config.seed)
    with jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh), \
                nn.logical_axis_rules(run.rules):
        boxed = jax.jit(run.init_fn, out_shardings=run.state_shardings)(seed_key)
    return nn.unbox(boxed)


def abstract_state(run: Run) -> TrainState:
    with jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh):    # as in `setup`
        abstract = nn.unbox(jax.eval_shape(run.init_fn, jax.random.key(run.config.seed)))
    return ckpt_lib.abstract_like(abstract, run.state_shardings)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def make_train_step(run: Run):
    cfg = run.config
    accum = cfg.optim.grad_accum
    nan_at = cfg.get("debug", {}).get("nan_at_step", -1)

    def micro_loss(params, micro, rng, step, memory):
        loss_sum, aux = run.objective(run.model.apply, params, micro, rng, step=step,
                                      memory=memory)
        return loss_sum, aux

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        new_memory = {}
        if accum == 1:
            (loss_sum, aux), grads = grad_fn(state.params, batch, rng, state.step, state.memory)
            new_memory = aux.pop("memory", {})
        else:
            # [B, ...] → [A, B/A, ...]; sum losses and gradients over micro-batches, then divide
            # once by the total weight so the update equals the un-accumulated one.
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), state.step,
                                    state.memory)
                return jax.tree_util.tree_map(jnp.add, carry, (l, a, g)), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, first, rng, state.step, state.memory)
            if "memory" in shapes[0][1]:
                raise ValueError(f"optim.grad_accum={accum} is not allowed with objective "
                                 f"{cfg.get('objective', 'lm')!r}, which updates its memory "
                                 "every step; use grad_accum=1")
            zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                           (shapes[0][0], shapes[0][1], shapes[1]))
            (loss_sum, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        denom = jnp.maximum(aux["weight"], 1.0)
        loss = loss_sum / denom
        if nan_at >= 0:  # fault injection for tests: poison the loss at one step
            loss = loss * jnp.where(state.step + 1 == nan_at, jnp.nan, 1.0)
            grads = jax.tree_util.tree_map(
                lambda g: g * jnp.where(state.step + 1 == nan_at, jnp.nan, 1.0), grads)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        updates, opt_state = run.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": aux["correct"] / denom,
                   "grad_norm": global_norm(grads), "lr": run.schedule(state.step),
                   # an objective's other sums (e.g. MAC's readout accuracies), per weight
                   **{k: v / denom for k, v in aux.items() if k not in ("weight", "correct")}}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             memory={**state.memory, **new_memory}), metrics

    def wrapped(state, batch):
        # The mesh in context while tracing: without it Flax drops every activation constraint
        # (nn.with_logical_constraint), and under fsdp XLA gathers the whole batch's activations.
        with jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh), \
                nn.logical_axis_rules(run.rules):
            return step_fn(state, batch)

    rep = shd.replicated(run.mesh)
    return jax.jit(
        wrapped,
        # state: sharded by its logical rules; batch: rows over the batch-parallel axes.
        in_shardings=(run.state_shardings, run.batch_sharding),
        # the new state keeps the same shardings; scalar metrics are replicated.
        out_shardings=(run.state_shardings, rep),
        # the old state's buffers are reused for the new one.
        donate_argnums=(0,))


def make_eval_step(run: Run):
    def eval_fn(params, memory, batch):
        with jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh), \
                nn.logical_axis_rules(run.rules):   # as in make_train_step
            loss_sum, aux = run.objective(run.model.apply, params, batch, jax.random.key(0),
                                          memory=memory)
        aux.pop("memory", None)
        return {"loss_sum": loss_sum, **aux}

    return jax.jit(eval_fn, in_shardings=(run.state_shardings.params,
                                          run.state_shardings.memory, run.batch_sharding),
                   out_shardings=shd.replicated(run.mesh))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def make_data(config, split: str, *, seed_offset: int = 0, data_overrides=None):
    """The iterator of `split`; data_overrides: data config fields set on top of config.data."""
    data = pipeline.resolve_data_config(config.data, data_overrides) if data_overrides \
        else config.data
    return pipeline.make_dataset(
        data, split=split, seed=config.seed + seed_offset,
        global_batch_size=config.batch_size, seq_len=config.seq_len,
        process_index=jax.process_index(), process_count=jax.process_count())


def hooked_train_data(run: Run, memory, data_iter, current: Optional[dict] = None):
    """(iterator, overrides): the train iterator under the data fields the hooks' states set,
    at `data_iter`'s position. `data_iter` itself is returned when they equal `current`."""
    overrides = {}
    for h in run.hooks:
        overrides.update(h.data_overrides(memory[h.name]))
    if overrides == (current or {}):
        return data_iter, overrides
    it = iter(make_data(run.config, "train", data_overrides=overrides))
    it.set_state(data_iter.get_state())
    return it, overrides


def to_device(batch: dict, sharding) -> dict:
    """Process-local numpy rows → one global array per field, rows on the batch axes."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        spec = jax.sharding.PartitionSpec(sharding.spec[0], *([None] * (v.ndim - 1)))
        s = jax.sharding.NamedSharding(sharding.mesh, spec)
        out[k] = jax.make_array_from_process_local_data(s, v)
    return out


def eval_split(config) -> str:
    names = pipeline.splits(config.data)
    return "validation" if "validation" in names or not names else "test"


def evaluate(run: Run, eval_step, params, memory, *, num_batches: int) -> dict:
    it = iter(make_data(run.config, eval_split(run.config), seed_offset=10_000))
    tot: dict[str, float] = {}
    for _ in range(num_batches):
        out = jax.device_get(eval_step(params, memory, to_device(next(it), run.batch_sharding)))
        for k, v in out.items():
            tot[k] = tot.get(k, 0.0) + float(v)
    w = max(tot.get("weight", 0.0), 1.0)
    loss = tot.get("loss_sum", 0.0) / w
    extra = {f"eval_{k}": v / w for k, v in tot.items()
             if k not in ("loss_sum", "weight", "correct")}
    return {"eval_loss": loss, "eval_accuracy": tot.get("correct", 0.0) / w,
            "eval_perplexity": float(math.exp(min(loss, 50.0))), **extra}


# ---------------------------------------------------------------------------------------------
# Pre-emption
# ---------------------------------------------------------------------------------------------
class _Stop:
    """Pre-emption: when to save a checkpoint and return.

    One process: SIGTERM sets a flag, read once per step. Several processes (one SIGTERM may
    reach any one of them): JAX's pre-emption sync manager owns SIGTERM, tells every process,
    and `reached_preemption_sync_point` turns true on all of them at the same step (the step
    after the largest any process had reached), so all save that step. It is asked every step.
    """

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.requested = False
        self._old = None

    def __enter__(self):
        # Several processes: a Python handler would replace the sync manager's own.
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def at(self, step: int) -> bool:
        """Whether to save and stop after optimizer step `step` (every process: the same)."""
        if self.multi:
            if multihost_utils.reached_preemption_sync_point(step):
                log.warning("pre-emption: every process saves step %d and stops", step)
                self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def check_workdir(config, workdir, *, allow_changes: Sequence[str] = (),
                  ckpt: Optional[ckpt_lib.Checkpointer] = None) -> dict[str, list[str]]:
    """Raises config_identity.ConfigMismatchError if `workdir` holds a run trained under a config
    whose identity differs from `config`'s in a field `allow_changes` does not name. The stored
    config is the newest checkpoint's, else config.json's; a fresh workdir passes.

    Returns what changed: {"config_changes": the allowed identity differences,
    "run_control_changes": the run-control ones}, each as ["field: old -> new", ...] (empty
    lists are left out), for the run's start row in metrics.jsonl."""
    stored, where = ckpt_lib.stored_config(workdir, ckpt)
    if stored is None:
        return {}
    changes = {
        "config_changes": config_identity.check_compatible(
            stored, config, allow_changes=allow_changes, where=f"workdir {where}"),
        "run_control_changes": config_identity.run_control_diff(stored, config)}
    for k, v in changes.items():
        if v:
            log.warning("resuming %s with %s: %s", workdir, k.replace("_", " "), "; ".join(v))
    return {k: v for k, v in changes.items() if v}


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          devices=None, allow_changes: Sequence[str] = ()) -> dict:
    """Trains (or resumes) a run in `workdir`; returns a summary dict.

    A workdir that holds a run trained under another config is refused up front
    (config_identity.ConfigMismatchError) unless `allow_changes` names every differing field
    (dotted, e.g. ("data.min_length",); a name covers the fields under it)."""
    workdir = ckpt_lib.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.get("base_lm"):
        # A first stage (MAC's base LM): its own run in WORKDIR/base_lm, skipped when finished.
        steps = ckpt_lib.saved_steps(workdir / "base_lm")
        if not steps or steps[-1] < config.base_lm.num_steps:
            train(config.base_lm, workdir / "base_lm", devices=devices)
    run = setup(config, devices=devices)
    cfg = run.config

    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=cfg.get("keep_checkpoints", 3),
                                 async_save=cfg.get("async_checkpoints", True))
    try:
        # Before config.json is rewritten and before any restore is tried.
        start_row = check_workdir(cfg, workdir, allow_changes=allow_changes, ckpt=ckpt)
        if jax.process_count() > 1:   # every process has read the stored config before it changes
            multihost_utils.sync_global_devices("mnemax_config_checked")
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
        data_iter = iter(make_data(cfg, "train"))
        state, start = ckpt.restore_latest(abstract_state(run), data_iter=data_iter,
                                           move_aside_unreadable=True)
        if state is None and ckpt.all_steps():
            raise ckpt_lib.NoReadableCheckpointError(
                f"none of the checkpoints in {ckpt.directory} (steps {ckpt.all_steps()}) restores "
                f"(see the warnings above); nothing was moved. Use a new workdir, or move them "
                f"away to start this one from scratch")
    except BaseException:
        ckpt.close()
        raise
    if state is None:
        state, start = init_state(run), 0
        if cfg.get("init_from"):   # a fine-tune: another run's parameters, a fresh optimizer
            params, from_step = ckpt_lib.restore_params(
                cfg.init_from, abstract_state(run).params)
            state = state.replace(params=params)
            log.info("parameters from %s (step %d)", cfg.init_from, from_step)
            start_row["init_from"] = {"workdir": str(cfg.init_from), "step": from_step}
        if cfg.get("init_from_hf"):   # a pretrained Hugging Face checkpoint (models/pretrained)
            load = _resolve(INIT_FROM_HF, cfg.model.get("family", "transformer"), "model.family")
            state = state.replace(params=load(run.model, cfg.init_from_hf, state.params,
                                              mesh=run.mesh, rules=run.rules))
            log.info("parameters from %s", cfg.init_from_hf)
            start_row["init_from_hf"] = (cfg.init_from_hf.to_dict()
                                         if hasattr(cfg.init_from_hf, "to_dict")
                                         else str(cfg.init_from_hf))
        if cfg.get("base_lm"):   # params["lm"] from the first stage's run
            lm, from_step = ckpt_lib.restore_params(workdir / "base_lm",
                                                    abstract_state(run).params["lm"])
            state = state.replace(params={**state.params, "lm": lm})
            start_row["base_lm"] = {"workdir": str(workdir / "base_lm"), "step": from_step}
    else:
        log.info("resumed from step %d in %s", start, workdir)
    data_iter, data_overrides = hooked_train_data(run, state.memory, data_iter)
    writer = metrics_lib.MetricsWriter(workdir)
    writer.write(start, {"event": "start", "resumed_from": start,
                         "mesh": shd.describe(run.mesh), "processes": jax.process_count(),
                         **start_row})

    train_step = make_train_step(run)
    eval_step = make_eval_step(run)
    tokens_per_step = cfg.batch_size * cfg.get("seq_len", 0)
    log_every = max(1, cfg.get("log_every", 10))
    debug = cfg.get("debug", {})
    summary: dict[str, Any] = {"start_step": start}
    config_dict = json.loads(cfg.to_json_best_effort())

    bar = None
    if cfg.get("progress", True) and jax.process_index() == 0:
        bar = tqdm(total=cfg.num_steps, initial=start, desc=cfg.get("name", "train"),
                   dynamic_ncols=True)

    step = start
    last_saved = start if start else None
    t_last, tok_since = time.perf_counter(), 0

    def record(at: int, metrics) -> None:
        """Reads step `at`'s metrics: stops on a non-finite loss, logs every log_every steps."""
        nonlocal t_last, tok_since
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        if not math.isfinite(loss):
            ckpt.wait()
            raise FloatingPointError(
                f"loss is {loss} at step {at}; stopping. The last good checkpoint "
                f"(step {ckpt.latest_step()}) in {ckpt.directory} is kept.")
        tok_since += tokens_per_step
        if at % log_every == 0 or at == cfg.num_steps:
            now = time.perf_counter()
            tps = tok_since / max(now - t_last, 1e-9)
            t_last, tok_since = now, 0
            writer.write(at, {**{k: float(v) for k, v in m.items()}, "tokens_per_s": tps})
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
        if bar is not None:
            bar.update(1)
        summary["final_loss"] = loss

    profile = _Profile(cfg, workdir, writer)
    with _Stop() as stop:
        try:
            pending = None   # (step, metrics) dispatched but not read yet
            while step < cfg.num_steps:
                profile.before(step + 1)
                batch = to_device(next(data_iter), run.batch_sharding)
                state, metrics = train_step(state, batch)
                step += 1
                # The previous step's metrics are read while this one runs on the device, so
                # the host's work between steps overlaps the device's.
                if pending is not None:
                    record(*pending)
                pending = (step, metrics)
                # What acts on this step's state besides logging; its loss is checked first, so
                # nothing evaluates, updates a hook from or saves a bad state.
                evaluate_now = bool(cfg.eval_every and (step % cfg.eval_every == 0
                                                        or step == cfg.num_steps))
                due = [h for h in run.hooks if h.due(step)]
                save_now = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                injected = debug.get("signal_process", -1) in (-1, jax.process_index())
                kill_now = injected and debug.get("sigkill_at_step", -1) == step
                if injected and debug.get("sigterm_at_step", -1) == step:
                    os.kill(os.getpid(), signal.SIGTERM)   # fault injection for tests
                stop_now = stop.at(step)
                if (step == cfg.num_steps or stop_now or evaluate_now or due or save_now
                        or kill_now or profile.ends(step)):
                    record(*pending)
                    pending = None
                profile.after(step)
                if evaluate_now:
                    ev = evaluate(run, eval_step, state.params, state.memory,
                                  num_batches=cfg.eval.num_batches)
                    writer.write(step, ev)
                    summary.update(ev)
                for hook in due:
                    hstate, row = hook.update(run, state.params, state.memory[hook.name], step)
                    hstate = jax.device_put(hstate, run.state_shardings.memory[hook.name])
                    state = state.replace(memory={**state.memory, hook.name: hstate})
                    writer.write(step, row)
                    data_iter, data_overrides = hooked_train_data(
                        run, state.memory, data_iter, data_overrides)
                if save_now:
                    ckpt.save(step, state, data_iter=data_iter, config=config_dict)
                    writer.flush()
                    last_saved = step
                if kill_now:
                    # Fault injection for tests: die without any clean-up, once the checkpoints
                    # already requested are on disk.
                    ckpt.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop_now:
                    writer.write(step, {"event": "stopped", "reason": "SIGTERM"})
                    summary["stopped_by_signal"] = True
                    break
            if last_saved != step:
                ckpt.save(step, state, data_iter=data_iter, config=config_dict)
        finally:
            profile.close()
            ckpt.close()
            writer.close()
            if bar is not None:
                bar.close()
    summary["step"] = step
    summary["state"] = state
    summary["run"] = run
    return summary


class _Profile:
    """config.profile_steps = (FIRST, LAST): a jax.profiler trace of steps FIRST..LAST (1-based,
    as logged), in WORKDIR/profile (a local folder's; under a URL workdir, a local temporary
    folder, named in metrics.jsonl). Open it with TensorBoard's profile plugin or Perfetto."""

    def __init__(self, cfg, workdir, writer):
        self.first, self.last = tuple(cfg.get("profile_steps") or ()) or (0, -1)
        self.active = False
        self._workdir, self._writer = workdir, writer

    def before(self, step: int) -> None:
        if step == self.first:
            directory = (tempfile.mkdtemp(prefix="mnemax-profile-")
                         if ckpt_lib.is_url(self._workdir) else str(self._workdir / "profile"))
            jax.profiler.start_trace(directory)
            self.active = True
            self._writer.write(step, {"event": "profile", "directory": directory,
                                      "steps": [self.first, self.last]})

    def ends(self, step: int) -> bool:
        return self.active and step >= self.last

    def after(self, step: int) -> None:
        if self.ends(step):
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def restore_for_eval(workdir, *, step: Optional[int] = None, devices=None):
    """(config, params, model) of a finished or running run's latest (or given) checkpoint,
    restored onto `devices` (default: one device). The config is the ConfigDict the run was
    trained with; `model.apply({"params": params}, tokens)` gives logits."""
    workdir = ckpt_lib.as_path(workdir)
    if not (workdir / "config.json").exists():
        raise ValueError(f"workdir={str(workdir)!r} holds no run: no config.json there (train "
                         "one with mnemax-train --config NAME:VARIANT --workdir DIR)")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "model": 1})
    run = setup(config, devices=devices or jax.devices()[:1])
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
    try:
        if step is None:
            state, step = ckpt.restore_latest(abstract_state(run))
        else:
            state = ckpt.restore(step, abstract_state(run))
    finally:
        ckpt.close()
    if state is None:
        raise ValueError(f"workdir={str(workdir)!r} holds no readable checkpoint")
    return config, state.params, run.model
