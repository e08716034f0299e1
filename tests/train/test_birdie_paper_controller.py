"""train/objectives/birdie_paper_controller.py (hooks.birdie_controller.kind = "paper"): the
sequence reward model reads the history, the paper's evaluation and exploration schedules,
focused exploring candidates, and kind "simple" unchanged. The paper controller in the trainer
(the uniform warm-up, a checkpoint round trip): tests/train/test_birdie_hook.py, which shares
its compiled train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import config_identity, trainer
from train.configs import birdie as birdie_config
from train.objectives import birdie_controller as bc
from train.objectives import birdie_paper_controller as pc

GROUPS = (0, 1, 1, 1, 2, 2, 3)          # 4 classes of 1, 3, 2 and 1 actions
TINY = dict(width=16, num_layers=2, train_steps=5, num_candidates=32, top_k=4)


def _cfg(**kw):
    return pc.PaperControllerConfig(group_ids=GROUPS, total_steps=kw.pop("total_steps", 600),
                                    **{**TINY, **kw})


def test_reward_model_reads_the_history_causally():
    cfg = _cfg(num_layers=1)
    K, T = cfg.num_objectives, 6
    model = pc.reward_model(cfg)
    rng = np.random.default_rng(0)
    losses = jnp.asarray(rng.uniform(1, 3, (2, T, K)), jnp.float32)
    actions = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, T, K)), jnp.float32))
    valid = jnp.ones((2, T), bool)
    cand = actions[1, -1:]

    @jax.jit                                # one compilation for every probe below
    def probe(key):
        params = model.init(key, losses, actions, valid)["params"]
        apply = lambda l, a, v: model.apply({"params": params}, l, a, v)   # noqa: E731
        out, h = apply(losses, actions, valid)
        # one loss changed (the RMSNorm makes the loss input blind to a common scale)
        early, _ = apply(losses.at[:, 0, 0].mul(2.0), actions, valid)
        late, _ = apply(losses.at[:, 4, 0].mul(2.0), actions, valid)
        # history of 4 entries padded to 6 (valid False): the candidate as one step from its
        # state, and appended to the unpadded history
        pred = pc.predict_candidates(cfg, params, jnp.concatenate([losses[0, :4], losses[0, :2]]),
                                     jnp.concatenate([actions[0, :4], actions[0, :2]]),
                                     jnp.arange(6) < 4, losses[0, 4], cand)
        full, _ = apply(losses[:1, :5], jnp.concatenate([actions[:1, :4], cand[None]], 1),
                        valid[:1, :5])
        return out, h, early, late, pred[0], full[0, -1]

    out, h, early, late, pred, full = probe(jax.random.key(0))
    assert out.shape == (2, T, K) and h.shape == (cfg.num_layers, 2, cfg.width)
    assert float(jnp.abs(out).max()) <= 1.0                       # tanh: rewards in [-1, 1]
    # an early entry changes the last prediction; a later one leaves earlier outputs alone
    assert float(jnp.abs(early[:, -1] - out[:, -1]).max()) > 1e-4
    np.testing.assert_array_equal(late[:, :4], out[:, :4])
    # padding leaves the state alone: scoring from it equals appending to the history
    np.testing.assert_allclose(pred, full, atol=1e-5)


def test_evaluation_schedule_steps_and_fractions():
    cfg = _cfg(total_steps=5000)          # the paper's: listed steps, then every 1000
    assert cfg.schedule == (10, 50, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000)
    assert [s for s in range(5001) if pc.should_update(cfg, s)] == list(cfg.schedule)
    assert cfg.history == 10 and cfg.warmup_step == 250
    frac = _cfg(total_steps=1000, eval_steps=(0.01, 0.1), eval_every=0.2, warmup=0.05)
    assert frac.schedule == (10, 100, 300, 500, 700, 900) and frac.warmup_step == 50
    cpu = birdie_config.RECALL_PAPER_CONTROLLER     # the recall figure's CPU recipe: paper / 10
    assert tuple(cpu["eval_steps"]) == (1, 5, 25, 50, 100, 150, 200) and cpu["warmup"] == 25
    with pytest.raises(ValueError, match=r"^controller eval_steps=\(0, 5\) is not allowed; use a "
                                         r"non-empty tuple of steps >= 1 or fractions"):
        _cfg(eval_steps=(0, 5))


def test_exploration_is_a_cosine_with_a_hold():
    cfg = _cfg(total_steps=1000, explore_cook=10, explore_hold=100, explore_end=300)
    schedule = jax.jit(pc.exploration, static_argnums=0)          # one compilation
    eps = lambda s: float(schedule(cfg, s))   # noqa: E731
    assert eps(0) == eps(9) == 1.0                           # the cook period: always explore
    assert eps(10) == eps(100) == pytest.approx(0.5)         # held at explore_max
    assert eps(200) == pytest.approx(0.35, abs=1e-6)          # cosine midpoint
    assert eps(150) == pytest.approx(0.2 + 0.15 * (1 + np.cos(np.pi / 4)), abs=1e-6)
    assert eps(300) == eps(900) == pytest.approx(0.2)        # explore_min after explore_end
    assert _cfg(total_steps=1000).hold_step == 50            # defaults: fractions of the run


def test_an_exploring_candidate_focuses_on_one_or_two_classes():
    cfg = _cfg()
    draw = jax.jit(pc.focused_candidates, static_argnums=(0, 2))
    cand = np.asarray(draw(cfg, jax.random.key(3), 200))
    np.testing.assert_allclose(cand.sum(-1), 1.0, rtol=1e-5)
    per_class = np.stack([cand[:, np.asarray(GROUPS) == g].sum(-1) for g in range(4)], -1)
    focused = (per_class > 0.1).sum(-1)
    assert set(focused.tolist()) == {1, 2}                   # both counts drawn, never more
    # the other classes keep explore_floor each (relative to a chosen class's 1)
    low = np.sort(per_class, -1)[focused == 1][:, :3]
    np.testing.assert_allclose(low, 0.005 / (1 + 3 * 0.005), rtol=1e-4)


def test_simple_kind_is_unchanged():
    # a config without `kind` is the simple controller, and the simple arms' CPU recipes are
    # the ones from before the paper controller (hashes of recall_config at commit 672fea5); at
    # paper size the paper's settings are actions since ObjectiveSettings.controlled (72 of them)
    assert "kind" not in bc.hook_config(every=10)
    for size, name, h in (("cpu", "gated_birdie", "1886ea74ada9"),
                          ("cpu", "transformer_birdie", "4ac2e9861528"),
                          ("quick", "gated_birdie", "4cd9fcdd1326"),
                          ("paper", "gated_birdie", "678a4cb0b79d")):
        assert config_identity.recipe_hash([birdie_config.recall_config(size, name, 0)]) == h
    hook = trainer.build_hooks(birdie_config.recall_config("cpu", "gated_birdie", 0))[0]
    assert hook.kind == "simple" and isinstance(hook.cfg, bc.ControllerConfig)
    paper = trainer.build_hooks(birdie_config.recall_config("cpu", "gated_birdie_paper", 0))[0]
    assert paper.kind == "paper" and paper.cfg.total_steps == 1500
    assert paper.cfg.schedule[:8] == (1, 5, 25, 50, 100, 150, 200, 300)
    assert paper.cfg.num_classes == 8 and paper.cfg.group_ids[-1] == 7      # the task: a class
    c = birdie_config.recall_config("cpu", "gated_birdie_paper", 0)
    c.hooks.birdie_controller.kind = "best"
    with pytest.raises(ValueError, match=r"^hooks.birdie_controller.kind='best' is not allowed; "
                                         r"use one of \('simple', 'paper'\)$"):
        trainer.build_hooks(c)
    c = birdie_config.recall_config("cpu", "gated_birdie_paper", 0)
    c.hooks.birdie_controller.hidden = 32              # a simple-controller field
    with pytest.raises(ValueError, match=r"fields \['hidden'\] are not allowed"):
        trainer.build_hooks(c)

