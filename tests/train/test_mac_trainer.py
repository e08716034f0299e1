"""MAC's two stages through the shared trainer: base LM into WORKDIR/base_lm, then meta-training
with the LM frozen by the optimizer, the bank curriculum following the step, exact resume, and
the run read back by the evaluator."""
import json
import shutil

import chex
import jax
import numpy as np
import pytest

from eval import streaming_qa as sqa
from train import checkpoint as ckpt_lib
from train import trainer
from train.configs import mac as mac_config
from train.data import facts, mac_data, pipeline
from train.objectives import mac as obj
from train.optim import make_optimizer


def tiny_config(num_steps=4):
    c = mac_config.get_config("tiny")
    c.num_steps = num_steps
    c.batch_size = 8
    c.checkpoint_every = 2
    c.log_every = 1
    c.progress = False
    c.data.documents = 32
    c.data.eval_documents = 16
    c.model.lm.width = 32
    c.model.lm.num_layers = 1
    c.model.lm.num_heads = 4
    for k, v in dict(num_tokens=2, prefix_len=1, enc_width=16, enc_layers=1, dec_layers=1,
                     enc_heads=2, agg_blocks=1, agg_heads=2, mlp_ratio=2,
                     prefix_hidden=8, prefix_gain_init=1.0).items():
        c.model[k] = v
    # prefix_gain_init 1: a prefix that acts from the start (the recipe's 0 leaves the LM's
    # answers unchanged at first), so that the hierarchical windows' answers differ at once
    o = c.objective_config
    o.curriculum_start, o.curriculum_steps = 1, 2
    o.hierarchical_windows = (2, 4)
    b = c.base_lm
    b.model.width, b.model.num_layers, b.model.num_heads = 32, 1, 4
    b.num_steps = 3
    b.batch_size = 8
    b.progress = False
    return c


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mac_run(tmp_path_factory):
    """A 4-step stage 2 after a 3-step stage 1, on all 8 fake devices."""
    workdir = tmp_path_factory.mktemp("mac") / "run"
    summary = trainer.train(tiny_config(), workdir)
    return workdir, summary


def test_both_stages_train_into_their_workdirs(mac_run):
    workdir, summary = mac_run
    assert ckpt_lib.saved_steps(workdir / "base_lm") == [3]
    assert ckpt_lib.saved_steps(workdir) == [2, 4]
    start = metrics(workdir)[0]
    assert start["base_lm"] == {"workdir": str(workdir / "base_lm"), "step": 3}
    rows = [r for r in metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("qa_loss", "g_readout_accuracy", "h_readout_accuracy", "retrieval_accuracy",
                "hierarchical_qa_loss", "bank_size"):
        assert all(np.isfinite(r[key]) for r in rows), key
    # The bank curriculum follows the step i (0-based): one document until i = 1, then
    # 1 + round(7·(i-1)/2) (3.5 rounds to 4), the whole batch of 8 from i = 3.
    assert [r["bank_size"] for r in rows] == [1, 1, 5, 8]


def test_the_base_lm_is_frozen_in_stage_two(mac_run):
    workdir, summary = mac_run
    _, base_params, _ = trainer.restore_for_eval(workdir / "base_lm")
    chex.assert_trees_all_equal(jax.device_get(summary["state"].params["lm"]),
                                jax.device_get(base_params))
    # and the optimizer keeps no moments for it
    opt_leaves = jax.tree_util.tree_leaves(summary["state"].opt_state)
    lm_size = sum(x.size for x in jax.tree_util.tree_leaves(base_params))
    mac_size = sum(x.size for x in jax.tree_util.tree_leaves(
        {k: v for k, v in summary["state"].params.items() if k != "lm"}))
    assert sum(x.size for x in opt_leaves if x.ndim) == 2 * mac_size < 2 * (mac_size + lm_size)


def test_resume_is_exact_and_a_finished_base_lm_is_not_retrained(mac_run, tmp_path):
    workdir, summary = mac_run
    # The module's run as it stood after step 2 (its finished first stage included, which the
    # trainer must not retrain), resumed to step 4: the straight run's parameters.
    shutil.copytree(workdir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    before = (tmp_path / "run" / "base_lm" / "metrics.jsonl").read_text()
    resumed = trainer.train(tiny_config(num_steps=4), tmp_path / "run")
    assert resumed["start_step"] == 2
    assert (tmp_path / "run" / "base_lm" / "metrics.jsonl").read_text() == before
    chex.assert_trees_all_equal(jax.device_get(resumed["state"].params),
                                jax.device_get(summary["state"].params))


def test_the_evaluator_reads_the_trainers_run(mac_run):
    workdir, summary = mac_run
    cfg, params, lm_params = sqa.load_run(workdir)
    assert cfg == obj.mac_config(tiny_config().model)
    chex.assert_trees_all_equal(params, jax.device_get(summary["state"].params["mac"]))
    res = sqa.evaluate(cfg, params, lm_params, documents=4, seed=0, baselines=False)
    for key in ("mac_flat", "mac_hierarchical", "mac_topk"):
        assert 0.0 <= res[key]["em"] <= res[key]["f1"] + 1e-9 <= 1.0 + 1e-9
    assert res["questions"] == 4 * len(facts.RELATIONS)
    with pytest.raises(ValueError, match="holds no MAC run: no config.json there"):
        sqa.load_run(workdir / "missing")
    with pytest.raises(ValueError, match="not a MAC run"):
        sqa.load_run(workdir / "base_lm")


def test_curriculum_bank_size_matches_the_schedule():
    K, start, steps = 16, 1000, 2000
    for i in (0, 999, 1000, 1001, 1066, 1067, 1600, 1999, 2999, 3000, 5000):
        frac = 0.0 if i < start else min(1.0, (i - start) / steps)
        assert int(obj.curriculum_bank_size(i, K, start, steps)) == 1 + round((K - 1) * frac), i
    assert [int(obj.curriculum_bank_size(i, 4, 2, 0)) for i in range(4)] == [1, 1, 4, 4]


def test_meta_objective_draws_the_question_and_cycles_windows(mac_run):
    workdir, summary = mac_run
    run = summary["run"]
    params = jax.device_get(summary["state"].params)
    it = iter(pipeline.make_dataset(tiny_config().data, split="train", seed=0,
                                    global_batch_size=8, seq_len=112))
    batch = next(it)
    assert batch["questions"].shape == (8, len(facts.RELATIONS), 32)
    settings = dict(run.config.objective_config)
    # Jitted: one compilation (the step traced, as in the trainer) instead of op-by-op dispatch
    objective = jax.jit(lambda p, b, step: run.objective(run.model.apply, p, b,
                                                         jax.random.key(0), step=step))
    out = {step: objective(params, batch, step) for step in (4, 5)}
    assert float(out[4][1]["hierarchical_qa_loss"]) != float(out[5][1]["hierarchical_qa_loss"])
    # Each document is asked the question the key draws; step i uses the hierarchical window
    # W = (2, 4)[i mod 2]; from step 3 on the bank is the whole batch.
    rel = jax.random.randint(jax.random.key(0), (8,), 0, len(facts.RELATIONS))
    asked = {"docs": batch["docs"], "doc_answers": batch["doc_answers"],
             "answers": batch["doc_answers"][np.arange(8), rel],
             **{k: batch[k][np.arange(8), rel] for k in ("questions", "qa", "qa_weights")}}
    # h's readout target is the asked question's answer: its QA row's first weighted token
    np.testing.assert_array_equal(
        asked["answers"], mac_data.first_answer_tokens(asked["qa"], asked["qa_weights"]))
    @jax.jit
    def by_window(params, asked):
        return [obj.meta_loss(run.model.cfg, params["mac"], params["lm"], asked,
                              settings["rho"], 8, readouts=params["readouts"],
                              readout_weight=settings["readout_weight"],
                              hierarchical_window=window,
                              hierarchical_weight=settings["hierarchical_weight"])[0]
                for window in (2, 4)]
    want = by_window(params, asked)
    for step, window_loss in ((4, want[0]), (5, want[1])):
        np.testing.assert_allclose(float(out[step][0]), float(window_loss), rtol=1e-5)
    with pytest.raises(ValueError, match="readout_relations"):
        run.objective(run.model.apply, {k: v for k, v in params.items() if k != "readouts"},
                      batch, jax.random.key(0), step=0)


def test_frozen_collections_get_zero_updates_and_no_state():
    params = {"lm": {"w": np.ones(3, np.float32)}, "mac": {"w": np.ones(2, np.float32)}}
    tx, _ = make_optimizer({"lr": 0.1, "warmup_steps": 0, "schedule": "constant",
                            "weight_decay": 0.1, "frozen": ("lm",)})
    state = tx.init(params)
    grads = jax.tree_util.tree_map(np.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert float(np.abs(updates["lm"]["w"]).max()) == 0.0
    assert float(np.abs(updates["mac"]["w"]).min()) > 0.0
    assert sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim) == 2 * 2
    with pytest.raises(ValueError, match="optim.frozen names \\['base'\\]"):
        tx2, _ = make_optimizer({"lr": 0.1, "warmup_steps": 0, "frozen": ("base",)})
        tx2.init(params)
    with pytest.raises(ValueError, match="optim.frozen='lm' must be a tuple"):
        make_optimizer({"lr": 0.1, "warmup_steps": 0, "frozen": "lm"})
