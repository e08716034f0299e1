"""Birdie's reward-driven controller (Blouir et al. 2024, §3.2) as a pytree and pure functions.

At each evaluation the controller receives the validation loss of every objective configuration
[K] and

1. turns the change since the last evaluation into rewards (`birdie.reward`, per objective) and
   stores ([log losses ‖ action], rewards) in a fixed-size history;
2. fits a small reward model (an MLP of `num_layers` layers) on that history by MSE for
   `train_steps` AdamW steps (warm-started from the previous fit);
3. picks the next mixture: scores `num_candidates` random points of the simplex with the model,
   each objective's predicted reward scaled by 1/(number of configurations in its class), and
   averages the `top_k` best; then mixes in exploration (a random simplex point) with weight ε,
   decaying linearly from `explore_start` to `explore_end` over the first half of training.

Until `min_history` rewards are known the mixture is uniform per class. The state is a
`flax.struct.dataclass` of arrays, so it goes into jit and is checkpointed with the train state.

    cfg = ControllerConfig(group_sizes=tuple(birdie.group_sizes(objs)), total_steps=10_000)
    state = controller_init(cfg, jax.random.key(0))
    mixture = state.mixture                                  # [K], sample objectives with it
    if should_update(cfg, step):
        state = controller_update(cfg, state, val_losses_K, step)   # jit with static cfg

In the shared trainer the controller is a hook (`ControllerHook`, train/trainer.py
HOOKS["birdie_controller"], config field `hooks.birdie_controller`): its state lives in
TrainState.memory["birdie_controller"] and is checkpointed with the run; at each of its steps it
measures every action's validation loss on balanced rows (row i of the validation split holds
action i % K only), updates, and sets the train data's `mixture`, so the trainer draws the
following rows from it; metrics.jsonl gets {"event": "birdie_controller", "mixture": {name:
weight}, "controller_val_loss": {name: loss}}. The actions are the data's: dataset "birdie"
(train/data/birdie_data.py) has its objective set's configurations; dataset "recall"
(train/data/recall.py) has them and the task as one more action; dataset "memory_bench"
(train/data/memory_bench.py, with birdie_fraction > 0) has the K configurations of its Birdie
rows (compact settings, those that fit a row: memory_bench.birdie_objectives) and no task
action: the controller chooses what the Birdie share of the rows packs, not how large that
share is. With `finetune_at` (recall data only) the controller chooses until that step, then
sets the mixture to the task alone and stops: pre-training and fine-tuning in one run, under one
learning-rate schedule.

`hooks.birdie_controller.kind` picks the controller: "simple" (this module; a config without
`kind` is simple) or "paper" (train/objectives/birdie_paper_controller.py: the sequence reward
model over the whole history, the uniform warm-up, the paper's evaluation schedule, cosine
exploration with a hold focused on one or two objective classes). Both choose a mixture over the
same actions. The paper's per-objective settings map onto them as far as mnemax's objectives
go: the weights inside a class are the choice among that objective's settings (infilling:
corruption rate × mean span; autoencoding: rate/span × with or without deshuffling;
deshuffling: the fraction shuffled, one configuration per `deshuffle_fractions` entry). Length
bins, selective copying's format / spans / context length and copying's length are drawn per
example from `data.objective_settings` and are not the controller's to choose.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from train.data import birdie_data, memory_bench, pipeline, recall
from train.objectives import birdie
from train.objectives import birdie_paper_controller as paper
from train.objectives.birdie import reward_jnp


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    group_sizes: tuple            # [K] configurations in each objective's class
    total_steps: int              # training steps: exploration decays over the first half
    eval_every: int = 250         # steps between controller updates (validation losses)
    first_eval: int = 0           # first update step (0: eval_every)
    history: int = 64             # M: (state, action) → reward pairs kept (ring buffer)
    hidden: int = 64              # reward-model width
    num_layers: int = 4           # reward-model layers (MLP)
    train_steps: int = 300        # AdamW steps per update
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    num_candidates: int = 2048    # random simplex points scored per update
    top_k: int = 8                # best candidates averaged into the next mixture
    explore_start: float = 0.5
    explore_end: float = 0.2
    min_history: int = 2          # rewards needed before the controller replaces the uniform mix

    def __post_init__(self):
        object.__setattr__(self, "group_sizes", tuple(int(g) for g in self.group_sizes))
        if not self.group_sizes or min(self.group_sizes) < 1:
            raise ValueError(f"group_sizes={self.group_sizes} must be non-empty positive counts")
        for name in ("total_steps", "eval_every", "history", "hidden", "num_layers",
                     "num_candidates", "top_k", "min_history"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.train_steps < 0 or self.first_eval < 0:
            raise ValueError(f"train_steps={self.train_steps}, first_eval={self.first_eval} "
                             "must be >= 0")
        if self.top_k > self.num_candidates:
            raise ValueError(f"top_k={self.top_k} must be <= num_candidates={self.num_candidates}")
        if not 0.0 <= self.explore_end <= self.explore_start <= 1.0:
            raise ValueError(f"explore_start={self.explore_start}, explore_end={self.explore_end}: "
                             "need 0 <= explore_end <= explore_start <= 1")

    @property
    def num_objectives(self) -> int:
        return len(self.group_sizes)


@flax.struct.dataclass
class ControllerState:
    mixture: jax.Array        # [K] float32: the sampling mixture to use now
    last_losses: jax.Array    # [K] float32: validation losses at the last update
    has_losses: jax.Array     # [] bool: last_losses is set
    inputs: jax.Array         # [M, 2K] float32: [log losses ‖ action] history
    rewards: jax.Array        # [M, K] float32: rewards observed after each action
    count: jax.Array          # [] int32: history entries written (ring buffer index = count % M)
    model: dict               # reward-model parameters
    key: jax.Array            # [2] uint32 raw PRNG key (checkpoint friendly)
    num_updates: jax.Array    # [] int32


def uniform_mixture(cfg: ControllerConfig) -> jax.Array:
    """[K]: each class equally likely, split evenly inside a class."""
    p = 1.0 / jnp.asarray(cfg.group_sizes, jnp.float32)
    return p / p.sum()


def exploration(cfg: ControllerConfig, step) -> jax.Array:
    """ε(step): explore_start → explore_end linearly over the first half of training."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / (0.5 * cfg.total_steps), 0.0, 1.0)
    return cfg.explore_start + (cfg.explore_end - cfg.explore_start) * frac


def should_update(cfg: ControllerConfig, step: int) -> bool:
    """Whether `step` is an evaluation step of the controller's schedule."""
    first = cfg.first_eval or cfg.eval_every
    return step >= first and (step - first) % cfg.eval_every == 0


# ---------------------------------------------------------------------------------------------
# The reward model: MLP [.., 2K] → [.., K]
# ---------------------------------------------------------------------------------------------
def _model_init(cfg: ControllerConfig, key) -> dict:
    K = cfg.num_objectives
    sizes = [2 * K] + [cfg.hidden] * (cfg.num_layers - 1) + [K]
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b), jnp.float32) / math.sqrt(a)
        params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
    return params


def reward_model(params: dict, x_NxI) -> jax.Array:
    """Predicted rewards [N, K] of inputs [N, 2K] = [log losses ‖ action]."""
    n = len(params) // 2
    h = x_NxI
    for i in range(n):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            h = jax.nn.gelu(h)
    return h


def controller_init(cfg: ControllerConfig, key) -> ControllerState:
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = jnp.asarray(key, jnp.uint32)
    key, sub = jax.random.split(key)
    K, M = cfg.num_objectives, cfg.history
    return ControllerState(
        mixture=uniform_mixture(cfg),
        last_losses=jnp.zeros((K,), jnp.float32),
        has_losses=jnp.zeros((), bool),
        inputs=jnp.zeros((M, 2 * K), jnp.float32),
        rewards=jnp.zeros((M, K), jnp.float32),
        count=jnp.zeros((), jnp.int32),
        model=_model_init(cfg, sub),
        key=key,
        num_updates=jnp.zeros((), jnp.int32),
    )


def _features(losses_K, action_K):
    return jnp.concatenate([jnp.log(jnp.maximum(losses_K, 1e-6)), action_K], axis=-1)


def fit_reward_model(cfg: ControllerConfig, params: dict, inputs_MxI, rewards_MxK, valid_M):
    """`train_steps` AdamW steps of masked MSE on the history; returns (params, final loss)."""
    opt = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)
    return paper.fit_masked_mse(lambda p: reward_model(p, inputs_MxI), params, rewards_MxK,
                                valid_M, opt, cfg.train_steps)


def propose_mixture(cfg: ControllerConfig, params: dict, losses_K, key) -> jax.Array:
    """Greedy mixture [K]: mean of the top_k random simplex points by scaled predicted reward."""
    K = cfg.num_objectives
    cand = jax.random.dirichlet(key, jnp.ones((K,), jnp.float32), (cfg.num_candidates,))
    x = _features(jnp.broadcast_to(losses_K, cand.shape), cand)
    pred = reward_model(params, x) / jnp.asarray(cfg.group_sizes, jnp.float32)
    score = pred.sum(-1)
    _, top = jax.lax.top_k(score, cfg.top_k)
    return cand[top].mean(0)


@functools.partial(jax.jit, static_argnums=0)
def controller_update(cfg: ControllerConfig, state: ControllerState, val_losses_K,
                      step) -> ControllerState:
    """One evaluation: record rewards, refit the reward model, choose the next mixture."""
    K, M = cfg.num_objectives, cfg.history
    losses = jnp.asarray(val_losses_K, jnp.float32).reshape(K)
    key, k_cand, k_explore = jax.random.split(state.key, 3)

    # 1. rewards of the action taken since the last evaluation
    r = reward_jnp(jnp.where(state.has_losses, state.last_losses, losses), losses)
    x = _features(state.last_losses, state.mixture)
    slot = state.count % M
    write = state.has_losses
    inputs = jnp.where(write, state.inputs.at[slot].set(x), state.inputs)
    rewards = jnp.where(write, state.rewards.at[slot].set(r), state.rewards)
    count = state.count + write.astype(jnp.int32)

    # 2. refit the reward model on the filled history
    valid = jnp.arange(M) < jnp.minimum(count, M)
    model, _ = fit_reward_model(cfg, state.model, inputs, rewards, valid)

    # 3. the next mixture
    greedy = propose_mixture(cfg, model, losses, k_cand)
    eps = exploration(cfg, step)
    explore = jax.random.dirichlet(k_explore, jnp.ones((K,), jnp.float32))
    mixture = (1.0 - eps) * greedy + eps * explore
    mixture = jnp.where(count >= cfg.min_history, mixture, uniform_mixture(cfg))
    mixture = mixture / mixture.sum()
    return ControllerState(mixture=mixture, last_losses=losses, has_losses=jnp.ones((), bool),
                           inputs=inputs, rewards=rewards, count=count, model=model, key=key,
                           num_updates=state.num_updates + 1)


# ---------------------------------------------------------------------------------------------
# The trainer hook
# ---------------------------------------------------------------------------------------------
# hooks.birdie_controller fields the hook reads itself; every other field is a ControllerConfig
# field (group_sizes and total_steps come from the data config and num_steps).
HOOK_FIELDS = ("kind", "every", "first", "rows_per_objective", "finetune_at")
KINDS = ("simple", "paper")
_FROM_RUN = ("group_sizes", "total_steps", "eval_every", "first_eval", "group_ids")


def hook_config(every, kind: str = "simple", **controller_fields) -> ml_collections.ConfigDict:
    """hooks.birdie_controller for a config: `every` steps between updates, `first` the first
    update step (0: `every`), `rows_per_objective` validation rows per action, `finetune_at` the
    step where the mixture becomes the task alone (0: never), and any other field of the
    controller `kind`: "simple" (ControllerConfig: history, hidden, train_steps, explore_start,
    ...; a config without `kind` is simple) or "paper" (birdie_paper_controller.
    PaperControllerConfig, every field written out with the paper's value: there `every` is the
    period after the listed `eval_steps` and `first` must stay 0)."""
    if kind not in KINDS:
        raise ValueError(f"hooks.birdie_controller.kind={kind!r} is not allowed; use one of "
                         f"{KINDS}")
    c = ml_collections.ConfigDict()
    if kind == "paper":
        c.kind = "paper"             # the paper's controller (birdie_paper_controller.py)
    c.every = every                  # steps between controller updates
    c.first = 0                      # first update step (0: `every`)
    c.rows_per_objective = 1         # balanced validation rows per action
    c.finetune_at = 0                # the task alone from this step on (0: never)
    if kind == "paper":
        d = {f.name: f.default for f in dataclasses.fields(paper.PaperControllerConfig)
             if f.name not in _FROM_RUN}
        d.update(controller_fields)
        # Each field's comment (the paper's value): birdie_paper_controller.PaperControllerConfig
        c.eval_steps = tuple(d.pop("eval_steps"))   # listed update steps (paper: 10 .. 2000)
        c.warmup = d.pop("warmup")                  # uniform mixture before it (paper: 250)
        c.width = d.pop("width")                    # reward model width (paper: 256)
        c.num_layers = d.pop("num_layers")          # gated-SSM blocks (paper: 4)
        c.mlp_ratio = d.pop("mlp_ratio")            # SwiGLU width ratio (package: 8/3)
        c.train_steps = d.pop("train_steps")        # fit steps per update (package: 200)
        c.learning_rate = d.pop("learning_rate")    # fit AdamW rate (package: 5e-4)
        c.weight_decay = d.pop("weight_decay")      # fit weight decay (package: 0.1)
        c.grad_clip = d.pop("grad_clip")            # fit gradient clip (package: 1.0)
        c.num_candidates = d.pop("num_candidates")  # candidates scored (package: 4096)
        c.top_k = d.pop("top_k")                    # best candidates averaged (package: 8)
        c.explore_max = d.pop("explore_max")        # ε after the cook period (paper: 0.5)
        c.explore_min = d.pop("explore_min")        # ε at the end of the cosine (paper: 0.2)
        c.explore_cook = d.pop("explore_cook")      # ε = 1 before it (package: 0.025 of steps)
        c.explore_hold = d.pop("explore_hold")      # hold at explore_max until (package: 0.05)
        c.explore_end = d.pop("explore_end")        # cosine reaches explore_min (package: 0.25)
        c.explore_focus = d.pop("explore_focus")    # classes an exploring candidate picks (2)
        c.explore_floor = d.pop("explore_floor")    # weight of the others (package: 0.005)
        controller_fields = d                        # what is left is unknown: refused later
    for k, v in controller_fields.items():
        c[k] = v
    return c


def action_space(config: ml_collections.ConfigDict) -> tuple[tuple, tuple, int | None]:
    """(names, class sizes, index of the task action or None) of the actions the controller
    mixes: the run's data config decides them (see the module docstring), its
    `objective_settings` included, so the controller and the data agree on K."""
    data = pipeline.resolve_data_config(config.data)
    if data.name == "birdie":
        objectives = birdie_data.objective_set(
            data.objectives, birdie.ObjectiveSettings.from_mapping(data.objective_settings))
        return (tuple(o.name for o in objectives),
                tuple(int(g) for g in birdie.group_sizes(objectives)), None)
    if data.name == "recall":
        spec = recall.spec_from_config(data, config.seq_len)
        names = spec.action_names()
        return names, spec.group_sizes(), len(names) - 1
    if data.name == "memory_bench":
        if not data.birdie_fraction or data.mac_doc_length:
            raise ValueError(f"hooks.birdie_controller needs Birdie rows: data.birdie_fraction="
                             f"{data.birdie_fraction} with data.mac_doc_length="
                             f"{data.mac_doc_length} is not allowed; allowed: birdie_fraction "
                             "> 0 and mac_doc_length 0")
        objectives = memory_bench.birdie_objectives(config.seq_len)
        return (tuple(o.name for o in objectives),
                tuple(int(g) for g in birdie.group_sizes(objectives)), None)
    raise ValueError(f"hooks.birdie_controller needs data.name 'birdie', 'recall' or "
                     f"'memory_bench', not {data.name!r}")


def action_groups(config: ml_collections.ConfigDict) -> tuple:
    """[K] the class index of each action of `action_space(config)` (the objective's `group`,
    the task a class of its own): what the paper controller's exploration focuses on."""
    data = pipeline.resolve_data_config(config.data)
    if data.name == "birdie":
        settings = birdie.ObjectiveSettings.from_mapping(data.objective_settings)
        groups = [o.group for o in birdie_data.objective_set(data.objectives, settings)]
    elif data.name == "recall":
        spec = recall.spec_from_config(data, config.seq_len)
        groups = [o.group for o in spec.objective_set()] + ["task"]
    elif data.name == "memory_bench":
        action_space(config)          # raises the ValueError of a run without Birdie rows
        groups = [o.group for o in memory_bench.birdie_objectives(config.seq_len)]
    else:
        action_space(config)          # raises the ValueError naming the data
    order = list(dict.fromkeys(groups))
    return tuple(order.index(g) for g in groups)


class ControllerHook:
    """Birdie's controller in the shared trainer (see the module docstring)."""

    name = "birdie_controller"

    def __init__(self, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
        self.names, group_sizes, self.task_action = action_space(config)
        fields = dict(settings.items())
        self.kind = fields.pop("kind", "simple")
        if self.kind not in KINDS:
            raise ValueError(f"hooks.birdie_controller.kind={self.kind!r} is not allowed; use "
                             f"one of {KINDS}")
        own = (ControllerConfig if self.kind == "simple" else paper.PaperControllerConfig)
        allowed = set(HOOK_FIELDS) | {f.name for f in dataclasses.fields(own)}
        bad = sorted(set(fields) - allowed | set(fields) & set(_FROM_RUN))
        if bad:
            raise ValueError(f"hooks.birdie_controller fields {bad} are not allowed; allowed: "
                             f"{sorted(allowed - set(_FROM_RUN))}")
        if "every" not in fields:
            raise ValueError("hooks.birdie_controller.every is missing (steps between updates)")
        self.rows_per_objective = int(fields.pop("rows_per_objective", 1))
        if self.rows_per_objective < 1:
            raise ValueError(f"hooks.birdie_controller.rows_per_objective="
                             f"{self.rows_per_objective} must be >= 1")
        self.finetune_at = fields.pop("finetune_at", 0)
        if self.finetune_at and self.task_action is None:
            raise ValueError(f"hooks.birdie_controller.finetune_at={self.finetune_at} is not "
                             f"allowed with data.name={config.data.name!r}, which has no task "
                             "action; use 0 (fine-tune in a run started with init_from)")
        if (isinstance(self.finetune_at, bool) or not isinstance(self.finetune_at, int)
                or not 0 <= self.finetune_at <= config.num_steps):
            raise ValueError(f"hooks.birdie_controller.finetune_at={self.finetune_at!r} is not "
                             f"allowed; use 0 (never) or a step in 1..num_steps="
                             f"{config.num_steps}")
        every, first = fields.pop("every"), fields.pop("first", 0)
        total = self.finetune_at or config.num_steps
        if self.kind == "paper":
            if first:
                raise ValueError(f"hooks.birdie_controller.first={first!r} is not allowed with "
                                 "kind 'paper'; use 0 (its eval_steps list the first updates)")
            self.cfg = paper.config_from_fields(action_groups(config), total, every, fields)
        else:
            # exploration decays over the first half of the steps the controller chooses for
            self.cfg = ControllerConfig(group_sizes=group_sizes, total_steps=total,
                                        eval_every=every, first_eval=first, **fields)
        self.config = config
        self._batches = None        # the balanced validation batches, on the run's mesh
        self._losses_fn = None

    def init(self, key) -> ControllerState:
        if self.kind == "paper":
            return paper.controller_init(self.cfg, key)
        return controller_init(self.cfg, key)

    def _should_update(self, step: int) -> bool:
        if self.kind == "paper":
            return paper.should_update(self.cfg, step)
        return should_update(self.cfg, step)

    def data_overrides(self, state: ControllerState) -> dict:
        return {"mixture": tuple(float(w) for w in np.asarray(state.mixture))}

    def due(self, step: int) -> bool:
        if self.finetune_at:
            return step == self.finetune_at or (step < self.finetune_at
                                                and self._should_update(step))
        return self._should_update(step)

    def validation_losses(self, run, params) -> np.ndarray:
        """[K] mean validation loss of every configuration, on its balanced rows."""
        if self._batches is None:
            c = self.config
            # one configuration per row (task draws and the mixture do not apply), in order
            data = pipeline.resolve_data_config(
                c.data, {"objective_per_row": True, "shuffle": False})
            rows = len(self.names) * self.rows_per_objective
            it = pipeline.make_dataset(
                data, split="validation", seed=c.seed, global_batch_size=c.batch_size,
                seq_len=c.seq_len, process_index=jax.process_index(),
                process_count=jax.process_count(), num_epochs=1)
            n = -(-rows // c.batch_size)
            if n * c.batch_size > data.num_validation:
                raise ValueError(f"data.num_validation={data.num_validation} rows hold fewer "
                                 f"than the controller's {n} batches of {c.batch_size}")
            self._batches = [pipeline.to_global_array(next(it), run.mesh, run.batch_sharding)
                             for _ in range(n)]
            K = len(self.names)

            def losses(p, batch):
                # the mesh in context, as in trainer.make_train_step: the activation constraints
                with jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh), \
                        nn.logical_axis_rules(run.rules):
                    mean, count = birdie.per_objective_losses(
                        birdie.packed_logits(run.model.apply, p, batch), batch, K)
                return mean * count, count

            rep = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
            self._losses_fn = jax.jit(
                losses, in_shardings=(run.state_shardings.params, run.batch_sharding),
                out_shardings=rep)
        total = np.zeros(len(self.names))
        count = np.zeros(len(self.names))
        for batch in self._batches:
            t, n = jax.device_get(self._losses_fn(params, batch))
            total += t
            count += n
        if (count == 0).any():
            missing = [n for n, k in zip(self.names, count) if k == 0]
            raise ValueError(f"the controller's validation rows hold no tokens of {missing}; "
                             "raise hooks.birdie_controller.rows_per_objective")
        return total / count

    def update(self, run, params, state: ControllerState, step: int):
        if self.finetune_at and step >= self.finetune_at:     # the task alone from now on
            task = jax.nn.one_hot(self.task_action, len(self.names), dtype=jnp.float32)
            return state.replace(mixture=task), {
                "event": "birdie_controller", "finetune": True,
                "mixture": {n: float(w) for n, w in zip(self.names, np.asarray(task))}}
        losses = self.validation_losses(run, params)
        update = paper.controller_update if self.kind == "paper" else controller_update
        state = update(self.cfg, state, jnp.asarray(losses, jnp.float32), step)
        mixture = np.asarray(jax.device_get(state.mixture))
        row = {"event": "birdie_controller",
               "mixture": {n: float(w) for n, w in zip(self.names, mixture)},
               "controller_val_loss": {n: float(v) for n, v in zip(self.names, losses)}}
        if self.kind == "paper":
            row["explored"] = bool(jax.device_get(state.explored))
        return state, row


def make_hook(settings, config) -> ControllerHook:
    """train/trainer.py HOOKS["birdie_controller"]."""
    return ControllerHook(settings, config)
