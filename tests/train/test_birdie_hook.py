"""Birdie's controller in the shared trainer: the mixture it sets reaches the data, moves during
a run, is written to metrics.jsonl, and survives a resume bit for bit."""
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from train import trainer
from train.configs import birdie as birdie_config
from train.data import birdie_data as bd
from train.data import pipeline, recall
from train.objectives import birdie
from train.objectives import birdie_controller as bc
from train.objectives import birdie_paper_controller as pc

K = len(bd.objective_set("birdie"))


def test_mixture_and_balanced_rows_reach_the_records():
    one_hot = tuple(float(i == 5) for i in range(K))
    src = bd.BirdieSource(bd.BirdieDataSpec(seq_len=384, mixture=one_hot, num_validation=8),
                          "validation")
    for i in range(4):
        ids = set(src[i]["objective_ids"].tolist()) - {-1}
        assert ids == {5}, (i, ids)
    # the default (uniform) rows are unchanged by the new field: () = Birdie's uniform mixture
    base = bd.BirdieSource(bd.BirdieDataSpec(seq_len=384, num_validation=8), "validation")
    uniform = bd.BirdieSource(bd.BirdieDataSpec(
        seq_len=384, num_validation=8, mixture=tuple(birdie.uniform_mixture(
            bd.objective_set("birdie")))), "validation")
    np.testing.assert_array_equal(base[3]["inputs"], uniform[3]["inputs"])
    balanced = bd.BirdieSource(bd.BirdieDataSpec(seq_len=384, objective_per_row=True,
                                                 task_weight=0.5, num_validation=2 * K),
                               "validation")
    for i in (0, 7, K + 3):
        assert set(balanced[i]["objective_ids"].tolist()) - {-1} == {i % K}
    with pytest.raises(ValueError, match=rf"mixture=\(1.0, 2.0\) is not allowed.*needs {K} "):
        bd.BirdieDataSpec(mixture=(1.0, 2.0))
    with pytest.raises(ValueError, match="mixture=.*non-negative"):
        bd.BirdieDataSpec(mixture=(-1.0,) + (1.0,) * (K - 1))


def test_hook_settings_are_checked():
    c = birdie_config.get_config("tiny:gated_birdie")
    c.hooks.birdie_controller.hiden = 3
    with pytest.raises(ValueError, match=r"fields \['hiden'\] are not allowed"):
        trainer.build_hooks(c)
    c = birdie_config.get_config("tiny:gated_birdie")
    c.hooks.birdie_controller.total_steps = 3     # comes from num_steps
    with pytest.raises(ValueError, match=r"\['total_steps'\] are not allowed"):
        trainer.build_hooks(c)
    c = birdie_config.get_config("tiny:gated_ntp")
    assert "hooks" not in c       # the NTP baselines have one objective and no controller
    c.hooks = birdie_config.get_config("tiny:gated_birdie").hooks
    c.data = birdie_config.get_config("tiny:gated_birdie").data
    c.data.name = "birdie"
    assert [h.name for h in trainer.build_hooks(c)] == ["birdie_controller"]


def _config():
    c = birdie_config.get_config("tiny:gated_birdie")
    c.num_steps, c.checkpoint_every, c.keep_checkpoints = 12, 4, 5
    c.eval_every, c.log_every, c.progress = 0, 1, False
    c.model.num_layers, c.model.mlp_hidden = 1, 64
    c.hooks.birdie_controller.update(every=2, train_steps=20, num_candidates=64, hidden=16)
    return c


def _rows(workdir, key):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if key in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    out = trainer.train(_config(), workdir, devices=jax.devices()[:2])
    return workdir, out


def test_controller_moves_the_mixture_in_metrics(straight):
    workdir, out = straight
    rows = _rows(workdir, "mixture")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    # the controller's actions are built with the config's objective settings (tiny: compact)
    objs = bd.objective_set("birdie", birdie.ObjectiveSettings.from_mapping(
        _config().data.objective_settings))
    names = [o.name for o in objs]
    assert len(names) == 18 and "deshuffling" in names
    uniform = birdie.uniform_mixture(objs)
    for r in rows:
        assert list(r["mixture"]) == names and list(r["controller_val_loss"]) == names
        assert abs(sum(r["mixture"].values()) - 1) < 1e-5
    # the first two updates collect rewards (uniform mixture), the third chooses its own
    np.testing.assert_allclose(list(rows[1]["mixture"].values()), uniform, atol=1e-6)
    for r in rows[2:]:
        assert np.abs(np.array(list(r["mixture"].values())) - uniform).max() > 0.01
    # the state is checkpointed with the run, and the trainer drew rows from its mixture
    state = out["state"].memory["birdie_controller"]
    np.testing.assert_allclose(np.asarray(state.mixture), list(rows[-1]["mixture"].values()),
                               rtol=1e-6)
    assert int(state.num_updates) == 6


def test_resume_restores_the_controller_and_its_data(straight, tmp_path):
    """A run that lost everything after step 8 (as a crash at step 9–11 leaves it) resumes from
    checkpoint 8 under the mixture the controller set at step 8 (not the uniform one) and with
    its state (history, reward model, key): same losses, mixtures and final state."""
    workdir, out = straight
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")
    (resumed / "metrics.jsonl").write_text("")
    again = trainer.train(_config(), resumed, devices=jax.devices()[:2])
    assert again["start_step"] == 8
    loss = lambda w: {r["step"]: r["loss"] for r in _rows(w, "loss")}   # noqa: E731
    assert loss(resumed) == {s: v for s, v in loss(workdir).items() if s > 8}
    assert _rows(resumed, "mixture") == _rows(workdir, "mixture")[4:]   # steps 10, 12
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(again["state"]),
                           jax.device_get(out["state"]))


def test_objective_settings_reach_the_data_and_the_controller():
    """data.objective_settings builds the data's objective set and the controller's actions
    alike: both see the same K under either settings."""
    assert pipeline.default_data_config("birdie").objective_settings.to_dict() == \
        birdie.PAPER_SETTINGS.as_dict()
    assert pipeline.default_data_config("recall").objective_settings.to_dict() == \
        birdie.PAPER_SETTINGS.as_dict()
    c = birdie_config.get_config("tiny:gated_birdie")
    assert birdie.ObjectiveSettings.from_mapping(c.data.objective_settings) == \
        birdie.COMPACT_SETTINGS
    paper = birdie_config.get_config("paper:gated_birdie")
    assert birdie.ObjectiveSettings.from_mapping(paper.data.objective_settings) == \
        birdie.PAPER_SETTINGS
    # the paper's run: the paper's controller over the paper's actions, in its 7 classes
    hook = trainer.build_hooks(paper)[0]
    assert hook.kind == "paper" and hook.cfg.num_objectives == 72 and hook.cfg.num_classes == 7
    c.data.objective_per_row, c.data.num_validation = True, 20
    # the paper's settings make its per-objective settings actions too (4 length bins: 72)
    for settings, K in ((birdie.PAPER_SETTINGS, 72), (birdie.COMPACT_SETTINGS, 18)):
        c.data.objective_settings = pipeline.objective_settings_config(settings)
        names, sizes, task = bc.action_space(c)
        assert len(names) == len(sizes) == K and task is None
        assert names == tuple(o.name for o in bd.objective_set("birdie", settings))
        src, _ = pipeline.make_source(c.data, split="validation", seq_len=c.seq_len)
        # balanced rows: row i holds configuration i % K only, so row 18 tells K apart
        assert set(src[18]["objective_ids"].tolist()) - {-1} == {18 % K}
    # one field set on its own (as --config.data.objective_settings.FIELD=... does)
    c.data.objective_settings.selective_copying_query = "after"
    src, _ = pipeline.make_source(c.data, split="validation", seq_len=c.seq_len)
    row = src[K - 1]                     # selective copying: the query after the context
    first = row["inputs"][row["segment_ids"] == 1]
    assert birdie.BIRDIE_TOKENS["SC_CONTEXT"] in first[:2].tolist()
    # a partial nested config is filled with the paper's fields; an unknown field is refused
    d = pipeline.resolve_data_config({"name": "birdie",
                                      "objective_settings": {"paradigm_placement": "append"}})
    assert birdie.ObjectiveSettings.from_mapping(d.objective_settings) == dataclasses.replace(
        birdie.PAPER_SETTINGS, paradigm_placement="append")
    with pytest.raises(ValueError, match=r"data_config.objective_settings fields \['shufle'\] "
                                         r"are unknown; allowed: \["):
        pipeline.resolve_data_config({"name": "recall", "objective_settings": {"shufle": 1.0}})
    with pytest.raises(ValueError, match=r"data_config.objective_settings='paper' is not allowed; "
                                         r"allowed: a ConfigDict of fields \["):
        pipeline.resolve_data_config({"name": "birdie", "objective_settings": "paper"})
    c.data.objective_settings.paradigm_placement = "end"
    with pytest.raises(ValueError, match=r"^objective_settings.paradigm_placement='end' is not "
                                         r"allowed; allowed: \('prepend', 'append', 'either'\)$"):
        pipeline.make_source(c.data, split="validation", seq_len=c.seq_len)
    # recall data: the configurations, then the task
    for size, K in (("cpu", 18), ("paper", 72)):
        rc = birdie_config.recall_config(size, "gated_birdie", 0)
        names, sizes, task = bc.action_space(rc)
        assert len(names) == K + 1 and task == K and names[-1] == "task"
        spec = recall.spec_from_config(pipeline.resolve_data_config(rc.data), rc.seq_len)
        assert spec.action_names() == names
    # the paper controller's arm controls the settings too; in the CPU rows (texts of 12
    # tokens, the query first, short fixed spans) each has one value, so its configurations are
    # the simple controller arm's, example for example
    specs = [recall.spec_from_config(pipeline.resolve_data_config(rc.data), rc.seq_len)
             for rc in (birdie_config.recall_config("cpu", a, 0)
                        for a in ("gated_birdie", "gated_birdie_paper"))]
    assert specs[1].objective_settings.controlled == birdie.CONTROLLABLE
    assert specs[0].objective_set() == specs[1].objective_set()


# ---------------------------------------------------------------------------------------------
# kind "paper" (train/objectives/birdie_paper_controller.py) in the trainer: the same run as
# `straight` (one compiled train step) with the paper's controller, its reward model tiny
# ---------------------------------------------------------------------------------------------
def _paper_config():
    c = _config()
    c.hooks.birdie_controller = bc.hook_config(
        every=2, kind="paper", eval_steps=(2,), warmup=5, width=16, num_layers=1,
        train_steps=5, num_candidates=32, top_k=4)
    return c


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("paper")
    out = trainer.train(_paper_config(), workdir, devices=jax.devices()[:2])
    return workdir, out


def test_paper_controller_warmup_is_uniform_then_it_chooses(paper_run):
    workdir, out = paper_run
    rows = _rows(workdir, "mixture")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    uniform = birdie.uniform_mixture(bd.objective_set("birdie", birdie.ObjectiveSettings
                                                      .from_mapping(_config().data
                                                                    .objective_settings)))
    for r in rows[:2]:                                  # steps 2, 4: before the warm-up's end
        np.testing.assert_allclose(list(r["mixture"].values()), uniform, atol=1e-6)
        assert r["explored"] is False
    for r in rows[2:]:
        assert np.abs(np.array(list(r["mixture"].values())) - uniform).max() > 0.01
    state = out["state"].memory["birdie_controller"]
    assert isinstance(state, pc.PaperControllerState)
    assert int(state.count) == 5 and int(state.num_updates) == 6   # the first has no reward
    np.testing.assert_allclose(np.asarray(state.mixture), list(rows[-1]["mixture"].values()),
                               rtol=1e-6)


def test_paper_controller_state_survives_a_checkpoint_round_trip(paper_run, tmp_path):
    """Lost after step 8: resumes from checkpoint 8 with the controller's state (history,
    reward model, key) and ends bit for bit where the straight run ended."""
    workdir, out = paper_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")
    (resumed / "metrics.jsonl").write_text("")
    again = trainer.train(_paper_config(), resumed, devices=jax.devices()[:2])
    assert again["start_step"] == 8
    assert _rows(resumed, "mixture") == _rows(workdir, "mixture")[4:]   # steps 10, 12
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(again["state"]),
                           jax.device_get(out["state"]))
