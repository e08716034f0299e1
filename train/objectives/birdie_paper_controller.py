"""Birdie's controller as the paper describes it (Blouir et al. 2024, §3.2; `controller.kind =
"paper"`): a sequence reward model over the whole history, a uniform warm-up, the paper's
evaluation schedule and a cosine exploration schedule with a hold, as a pytree and pure functions.

At each evaluation the controller receives the validation loss of every action [K] (the data's
objective configurations, and the task for dataset "recall") and

1. turns the change since the last evaluation into rewards (`birdie.reward_jnp`, per action) and
   appends (losses before, action taken) → rewards to the history (one entry per evaluation);
2. fits the reward model (`SequenceRewardModel`: separate RMSNorms on the loss and the action
   inputs, a projection to `width`, `num_layers` gated-SSM blocks, each with a SwiGLU MLP, and
   tanh outputs [K]) by masked MSE over the history, read as one causal sequence: the output at
   entry t predicts entry t's rewards from entries 0..t;
3. chooses the next mixture: before `warmup` the uniform mixture (by class); after it, with
   probability ε(step) (`exploration`: 1.0 until `explore_cook`, `explore_max` until
   `explore_hold`, cosine to `explore_min` at `explore_end`, then flat) a focused candidate
   (1..`explore_focus` random classes hold the mass, the others `explore_floor` each), else the
   mean of the `top_k` of `num_candidates` random simplex points by predicted reward (each
   action's reward scaled by 1/(its class's size), as the package's `explore_classes`). A
   candidate is scored as the next entry of the history: the history's recurrent state is
   computed once and every candidate is one more step from it.

The package (`samblouir/birdie`, birdie_rl/birdie_reward_model) differs where noted in the
config's comments; its reward model is in fact attention + SwiGLU, the paper's a gated SSM.

Schedule values (`eval_steps`, `eval_every`, `warmup`, `explore_*` step fields) are steps when
integers >= 1 and fractions of `total_steps` (the steps the controller chooses for) when floats
in (0, 1): the paper's are steps of its run; a CPU recipe scales them by giving fractions.

    cfg = PaperControllerConfig(group_ids=(0, 1, 1, 2), total_steps=20_000)
    state = controller_init(cfg, jax.random.key(0))
    if should_update(cfg, step):
        state = controller_update(cfg, state, val_losses_K, step)    # jit with static cfg
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.objectives.birdie import reward_jnp


def resolve_step(value, total_steps: int) -> int:
    """A schedule value as a step: floats in (0, 1) are fractions of `total_steps`, integers
    (or integral floats >= 1) are steps."""
    if isinstance(value, float) and 0.0 < value < 1.0:
        return max(int(round(value * total_steps)), 1)
    return int(value)


def _is_step_value(v, *, zero_ok: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    if isinstance(v, (float, np.floating)) and 0.0 < v < 1.0:
        return True
    return float(v).is_integer() and (v >= 0 if zero_ok else v >= 1)


@dataclasses.dataclass(frozen=True)
class PaperControllerConfig:
    group_ids: tuple              # [K] the class of each action (from the data's objective set)
    total_steps: int              # steps the controller chooses for (fractions refer to these)
    # Evaluation (controller update) steps; the paper's: 10, 50, 250, 500, 1000, 1500, 2000 ...
    eval_steps: tuple = (10, 50, 250, 500, 1000, 1500, 2000)
    # ... then every 1000 steps after the last of them (the paper's).
    eval_every: Any = 1000
    # Uniform mixture (by class) before this step: the paper's first 250 steps.
    warmup: Any = 250
    width: int = 256              # reward model width (the paper's 256)
    num_layers: int = 4           # gated-SSM blocks (the paper's 4)
    mlp_ratio: float = 8 / 3      # SwiGLU hidden = ratio × width (the package's 8/3)
    train_steps: int = 200        # AdamW steps per update (the package's grok_iterations, 200)
    learning_rate: float = 5e-4   # the package's (it cycles the rate; constant here)
    weight_decay: float = 0.1     # the package's
    grad_clip: float = 1.0        # global-norm clip (the package's)
    num_candidates: int = 4096    # random simplex points scored (the package's 4096)
    top_k: int = 8                # best candidates averaged (the package's top_n, 8)
    explore_max: float = 0.5      # ε after the cook period, held until explore_hold (package)
    explore_min: float = 0.2      # ε from explore_end on (the package's)
    # ε = 1 before this step (the package's cook period: 5 % of its exploration horizon, which
    # is half the run, so 0.025 of the steps); the uniform warm-up usually covers it.
    explore_cook: Any = 0.025
    # End of the hold at explore_max: the package's warm-up, 10 % of half the run.
    explore_hold: Any = 0.05
    # ε reaches explore_min here (cosine from explore_hold): the package's decay, half of half.
    explore_end: Any = 0.25
    explore_focus: int = 2        # an exploring candidate puts its mass on 1..this many classes
    explore_floor: float = 0.005  # weight of each other class in it (the package's 0.005)

    def __post_init__(self):
        object.__setattr__(self, "group_ids", tuple(int(g) for g in self.group_ids))
        object.__setattr__(self, "eval_steps", tuple(self.eval_steps))
        if not self.group_ids or min(self.group_ids) < 0:
            raise ValueError(f"group_ids={self.group_ids} must be non-empty class indices >= 0")
        for name in ("total_steps", "width", "num_layers", "num_candidates", "top_k",
                     "explore_focus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"controller {name}={v!r} is not allowed; use an integer >= 1")
        if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) \
                or self.train_steps < 0:
            raise ValueError(f"controller train_steps={self.train_steps!r} is not allowed; use "
                             "an integer >= 0")
        if not self.eval_steps or not all(_is_step_value(v, zero_ok=False)
                                          for v in self.eval_steps):
            raise ValueError(f"controller eval_steps={self.eval_steps!r} is not allowed; use a "
                             "non-empty tuple of steps >= 1 or fractions in (0, 1)")
        if not _is_step_value(self.eval_every, zero_ok=False):
            raise ValueError(f"controller eval_every={self.eval_every!r} is not allowed; use "
                             "steps >= 1 or a fraction in (0, 1)")
        for name in ("warmup", "explore_cook", "explore_hold", "explore_end"):
            if not _is_step_value(getattr(self, name), zero_ok=True):
                raise ValueError(f"controller {name}={getattr(self, name)!r} is not allowed; "
                                 "use steps >= 0 or a fraction in (0, 1)")
        if not self.hold_step <= self.end_step:
            raise ValueError(f"controller explore_hold={self.explore_hold!r} is not allowed; it "
                             f"must not come after explore_end={self.explore_end!r}")
        if self.top_k > self.num_candidates:
            raise ValueError(f"controller top_k={self.top_k} is not allowed; use <= "
                             f"num_candidates={self.num_candidates}")
        if not 0.0 <= self.explore_min <= self.explore_max <= 1.0:
            raise ValueError(f"controller explore_min={self.explore_min}, explore_max="
                             f"{self.explore_max} are not allowed; need 0 <= min <= max <= 1")
        if not self.explore_floor >= 0.0:
            raise ValueError(f"controller explore_floor={self.explore_floor} is not allowed; "
                             "use >= 0")
        for name in ("mlp_ratio", "learning_rate", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"controller {name}={getattr(self, name)} is not allowed; "
                                 "use > 0")

    # -- derived ----------------------------------------------------------------------------
    @property
    def num_objectives(self) -> int:
        return len(self.group_ids)

    @property
    def num_classes(self) -> int:
        return len(set(self.group_ids))

    @property
    def group_sizes(self) -> tuple:
        """[K] actions in each action's class (the simple controller's `group_sizes`)."""
        return tuple(self.group_ids.count(g) for g in self.group_ids)

    def _step(self, v) -> int:
        return resolve_step(v, self.total_steps)

    @property
    def warmup_step(self) -> int:
        return self._step(self.warmup)

    @property
    def cook_step(self) -> int:
        return self._step(self.explore_cook)

    @property
    def hold_step(self) -> int:
        return self._step(self.explore_hold)

    @property
    def end_step(self) -> int:
        return self._step(self.explore_end)

    @functools.cached_property
    def schedule(self) -> tuple:
        """Every evaluation step in 1..total_steps, in order."""
        listed = sorted({self._step(v) for v in self.eval_steps})
        every = max(self._step(self.eval_every), 1)
        steps = [s for s in listed if s <= self.total_steps]
        s = listed[-1] + every
        while s <= self.total_steps:
            steps.append(s)
            s += every
        return tuple(steps)

    @property
    def history(self) -> int:
        """M: history capacity, one entry per evaluation (at least 1)."""
        return max(len(self.schedule), 1)


def should_update(cfg: PaperControllerConfig, step: int) -> bool:
    """Whether `step` is an evaluation step: a listed one, or `eval_every` after the last."""
    listed = sorted({cfg._step(v) for v in cfg.eval_steps})
    if step in listed:
        return True
    every = max(cfg._step(cfg.eval_every), 1)
    return step > listed[-1] and (step - listed[-1]) % every == 0


def exploration(cfg: PaperControllerConfig, step) -> jax.Array:
    """ε(step): 1 before explore_cook, explore_max until explore_hold, a half cosine down to
    explore_min at explore_end, explore_min after."""
    step = jnp.asarray(step, jnp.float32)
    hold, end = cfg.hold_step, cfg.end_step
    frac = jnp.clip((step - hold) / max(end - hold, 1), 0.0, 1.0)
    eps = cfg.explore_min + 0.5 * (cfg.explore_max - cfg.explore_min) * (1 + jnp.cos(
        jnp.pi * frac))
    return jnp.where(step < cfg.cook_step, 1.0, eps)


def uniform_mixture(cfg: PaperControllerConfig) -> jax.Array:
    """[K]: each class equally likely, split evenly inside a class."""
    p = 1.0 / jnp.asarray(cfg.group_sizes, jnp.float32)
    return p / p.sum()


# ---------------------------------------------------------------------------------------------
# The reward model: a gated SSM over the history of (losses, action) entries
# ---------------------------------------------------------------------------------------------
class GatedSSMBlock(nn.Module):
    """x [B, T, D] → (x [B, T, D], final state [B, D]): a gated linear recurrence
    h_t = a_t·h_{t-1} + (1 − a_t)·u_t·σ(g_in) read out through σ(g_out) (Birdie §3.4's gated SSM, as the
    package's GatedSSM), then a SwiGLU MLP; both residual. Entries with valid=False leave the
    state unchanged (history padding)."""
    mlp_hidden: int

    @nn.compact
    def __call__(self, x_BxTxD, valid_BxT, h0_BxD):
        D = x_BxTxD.shape[-1]
        h_BxTxD = nn.RMSNorm(name="ssm_norm")(x_BxTxD)
        a, u, g_in, g_out = jnp.split(nn.Dense(4 * D, use_bias=False, name="gates")(h_BxTxD),
                                      4, axis=-1)
        a = jax.nn.sigmoid(a)
        u = u * jax.nn.sigmoid(g_in) * (1.0 - a)
        valid = valid_BxT[..., None]
        a, u = jnp.where(valid, a, 1.0), jnp.where(valid, u, 0.0)

        def step(h_BxD, au):
            h_BxD = au[0] * h_BxD + au[1]
            return h_BxD, h_BxD

        hT_BxD, hs_TxBxD = jax.lax.scan(step, h0_BxD, (a.swapaxes(0, 1), u.swapaxes(0, 1)))
        y = hs_TxBxD.swapaxes(0, 1) * jax.nn.sigmoid(g_out)
        x_BxTxD = x_BxTxD + nn.Dense(D, use_bias=False, name="out")(y)
        h_BxTxD = nn.RMSNorm(name="mlp_norm")(x_BxTxD)
        main, gate = jnp.split(nn.Dense(2 * self.mlp_hidden, use_bias=False, name="wi")(h_BxTxD),
                               2, axis=-1)
        x_BxTxD = x_BxTxD + nn.Dense(D, use_bias=False, name="wo")(main * jax.nn.sigmoid(gate))
        return x_BxTxD, hT_BxD


class SequenceRewardModel(nn.Module):
    """(losses [B, T, K], actions [B, T, K], valid [B, T], state [L, B, D] or None) →
    (predicted rewards [B, T, K] in [-1, 1], final state [L, B, D]); causal: output t reads
    entries 0..t (and the initial state)."""
    num_objectives: int
    width: int = 256
    num_layers: int = 4
    mlp_hidden: int = 683

    @nn.compact
    def __call__(self, losses_BxTxK, actions_BxTxK, valid_BxT, h0_LxBxD=None):
        B = losses_BxTxK.shape[0]
        # separate RMSNorms: losses (≈ 1-10) and mixture weights (sum 1) on one scale
        x = jnp.concatenate([nn.RMSNorm(name="loss_norm")(losses_BxTxK),
                             nn.RMSNorm(name="action_norm")(actions_BxTxK)], axis=-1)
        x_BxTxD = nn.Dense(self.width, use_bias=False, name="embed")(x)
        if h0_LxBxD is None:
            h0_LxBxD = jnp.zeros((self.num_layers, B, self.width), jnp.float32)
        states = []
        for i in range(self.num_layers):
            x_BxTxD, h = GatedSSMBlock(self.mlp_hidden, name=f"block{i}")(
                x_BxTxD, valid_BxT, h0_LxBxD[i])
            states.append(h)
        out = nn.Dense(self.num_objectives, use_bias=False, name="head")(
            nn.RMSNorm(name="final_norm")(x_BxTxD))
        return jnp.tanh(out), jnp.stack(states)


def reward_model(cfg: PaperControllerConfig) -> SequenceRewardModel:
    return SequenceRewardModel(cfg.num_objectives, cfg.width, cfg.num_layers,
                               max(int(round(cfg.mlp_ratio * cfg.width)), 1))


def predict_candidates(cfg: PaperControllerConfig, params, losses_MxK, actions_MxK, valid_M,
                       cand_losses_K, candidates_NxK) -> jax.Array:
    """[N, K] predicted rewards of each candidate action taken after the history (each as the
    history's next entry): the history's state once, then one step per candidate."""
    model = reward_model(cfg)
    _, h_Lx1xD = model.apply({"params": params}, losses_MxK[None], actions_MxK[None],
                             valid_M[None])
    N = candidates_NxK.shape[0]
    h_LxNxD = jnp.broadcast_to(h_Lx1xD, (h_Lx1xD.shape[0], N, h_Lx1xD.shape[-1]))
    out, _ = model.apply({"params": params},
                         jnp.broadcast_to(cand_losses_K, candidates_NxK.shape)[:, None],
                         candidates_NxK[:, None], jnp.ones((N, 1), bool), h_LxNxD)
    return out[:, 0]


# ---------------------------------------------------------------------------------------------
# The controller's state and update
# ---------------------------------------------------------------------------------------------
@flax.struct.dataclass
class PaperControllerState:
    mixture: jax.Array        # [K] float32: the sampling mixture to use now
    last_losses: jax.Array    # [K] float32: validation losses at the last update
    has_losses: jax.Array     # [] bool: last_losses is set
    losses: jax.Array         # [M, K] float32: history, losses before each action
    actions: jax.Array        # [M, K] float32: history, the mixture taken
    rewards: jax.Array        # [M, K] float32: history, the rewards observed after it
    count: jax.Array          # [] int32: history entries written (in order; M is never passed)
    model: dict               # reward-model parameters
    key: jax.Array            # [2] uint32 raw PRNG key (checkpoint friendly)
    num_updates: jax.Array    # [] int32
    explored: jax.Array       # [] bool: the current mixture is an exploring candidate


def controller_init(cfg: PaperControllerConfig, key) -> PaperControllerState:
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = jnp.asarray(key, jnp.uint32)
    key, sub = jax.random.split(key)
    K, M = cfg.num_objectives, cfg.history
    zeros = jnp.zeros((M, K), jnp.float32)
    params = reward_model(cfg).init(sub, zeros[None], zeros[None],
                                    jnp.zeros((1, M), bool))["params"]
    return PaperControllerState(
        mixture=uniform_mixture(cfg), last_losses=jnp.zeros((K,), jnp.float32),
        has_losses=jnp.zeros((), bool), losses=zeros, actions=zeros, rewards=zeros,
        count=jnp.zeros((), jnp.int32), model=params, key=key,
        num_updates=jnp.zeros((), jnp.int32), explored=jnp.zeros((), bool))


def fit_masked_mse(predict, params, rewards_MxK, valid_M, opt, steps: int):
    """`steps` updates of `opt` on the mean squared error of predict(params) [M, K] against
    rewards_MxK over the rows where valid_M holds (both controllers' reward-model fit);
    returns (params, the final error)."""
    w = valid_M.astype(jnp.float32)[:, None]

    def mse(p):
        err = predict(p) - rewards_MxK
        return jnp.sum(w * err ** 2) / jnp.maximum(w.sum() * rewards_MxK.shape[-1], 1.0)

    def body(_, carry):
        p, o = carry
        upd, o = opt.update(jax.grad(mse)(p), o, p)
        return optax.apply_updates(p, upd), o

    params, _ = jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))
    return params, mse(params)


def fit_reward_model(cfg: PaperControllerConfig, params, losses_MxK, actions_MxK, rewards_MxK,
                     valid_M):
    """`train_steps` AdamW steps (clipped) of masked MSE over the history; (params, loss)."""
    model = reward_model(cfg)
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                      optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay))
    predict = lambda p: model.apply({"params": p}, losses_MxK[None], actions_MxK[None],  # noqa
                                    valid_M[None])[0][0]
    return fit_masked_mse(predict, params, rewards_MxK, valid_M, opt, cfg.train_steps)


def focused_candidates(cfg: PaperControllerConfig, key, n: int) -> jax.Array:
    """[n, K] exploring candidates: each puts its mass on 1..explore_focus random classes
    (random weights inside a class, each chosen class weight 1) and explore_floor on every
    other class (split evenly inside it), normalized."""
    classes = sorted(set(cfg.group_ids))
    C = len(classes)
    cls_index = jnp.asarray([classes.index(g) for g in cfg.group_ids])        # [K] in 0..C-1
    k_num, k_perm, k_w = jax.random.split(key, 3)
    num = jax.random.randint(k_num, (n,), 1, min(cfg.explore_focus, C) + 1)  # [n]
    ranks = jnp.argsort(jax.random.uniform(k_perm, (n, C)), axis=-1)          # random order
    chosen_NxC = jnp.argsort(ranks, axis=-1) < num[:, None]                   # rank < num
    chosen_NxK = chosen_NxC[:, cls_index]
    raw = jax.random.uniform(k_w, (n, cfg.num_objectives), minval=1e-3)
    onehot_KxC = jax.nn.one_hot(cls_index, C)
    within = raw / (raw @ onehot_KxC)[:, cls_index]                           # class sums 1
    sizes = jnp.asarray(cfg.group_sizes, jnp.float32)
    w = jnp.where(chosen_NxK, within, cfg.explore_floor / sizes)
    return w / w.sum(-1, keepdims=True)


def propose_mixture(cfg: PaperControllerConfig, params, state_hist, losses_K, key) -> jax.Array:
    """Greedy mixture [K]: mean of the top_k random simplex points by class-scaled predicted
    reward, each scored as the history's next entry."""
    losses_MxK, actions_MxK, valid_M = state_hist
    cand = jax.random.dirichlet(key, jnp.ones((cfg.num_objectives,), jnp.float32),
                                (cfg.num_candidates,))
    pred = predict_candidates(cfg, params, losses_MxK, actions_MxK, valid_M, losses_K, cand)
    score = (pred / jnp.asarray(cfg.group_sizes, jnp.float32)).sum(-1)
    _, top = jax.lax.top_k(score, cfg.top_k)
    return cand[top].mean(0)


@functools.partial(jax.jit, static_argnums=0)
def controller_update(cfg: PaperControllerConfig, state: PaperControllerState, val_losses_K,
                      step) -> PaperControllerState:
    """One evaluation: record the rewards, refit the reward model, choose the next mixture."""
    K, M = cfg.num_objectives, cfg.history
    losses = jnp.asarray(val_losses_K, jnp.float32).reshape(K)
    key, k_cand, k_explore, k_focus = jax.random.split(state.key, 4)

    # 1. the rewards of the action taken since the last evaluation, appended to the history
    r = reward_jnp(jnp.where(state.has_losses, state.last_losses, losses), losses)
    write = state.has_losses & (state.count < M)
    slot = jnp.minimum(state.count, M - 1)
    upd = lambda h, v: jnp.where(write, h.at[slot].set(v), h)   # noqa: E731
    hist_losses = upd(state.losses, state.last_losses)
    hist_actions = upd(state.actions, state.mixture)
    hist_rewards = upd(state.rewards, r)
    count = state.count + write.astype(jnp.int32)
    valid = jnp.arange(M) < count

    # 2. refit the reward model on the history
    model, _ = fit_reward_model(cfg, state.model, hist_losses, hist_actions, hist_rewards, valid)

    # 3. the next mixture: uniform in the warm-up, then explore with probability ε or exploit
    greedy = propose_mixture(cfg, model, (hist_losses, hist_actions, valid), losses, k_cand)
    explore = jax.random.uniform(k_explore) < exploration(cfg, step)
    focused = focused_candidates(cfg, k_focus, 1)[0]
    warm = (jnp.asarray(step) < cfg.warmup_step) | (count < 1)
    mixture = jnp.where(warm, uniform_mixture(cfg), jnp.where(explore, focused, greedy))
    return PaperControllerState(
        mixture=mixture / mixture.sum(), last_losses=losses, has_losses=jnp.ones((), bool),
        losses=hist_losses, actions=hist_actions, rewards=hist_rewards, count=count,
        model=model, key=key, num_updates=state.num_updates + 1, explored=~warm & explore)


def config_from_fields(group_ids, total_steps: int, eval_every, fields: dict
                       ) -> PaperControllerConfig:
    """The config of hooks.birdie_controller fields (kind "paper"); tuples from a ConfigDict
    arrive as tuples or lists."""
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()}
    return PaperControllerConfig(group_ids=tuple(group_ids), total_steps=total_steps,
                                 eval_every=eval_every, **fields)


FIELDS = tuple(f.name for f in dataclasses.fields(PaperControllerConfig))
