"""eval/birdie_recall.py, train/configs/birdie.py, train/data/birdie_data.py, benchmarks/ssm.py."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from eval import birdie_recall as br
from eval import figures
from models import layers
from train.data import recall
from train.data import tokenizer as tok
from train.objectives import birdie

TINY = dict(pairs=(2, 4), num_queries=1, width=16, state_width=16, num_layers=2, num_heads=2,
            ssm_layers=3, bidir_pattern="cbc", ssm_mlp=32,
            steps=4, rows=4, row_length=48, lr=3e-3, eval_examples=8, controller_every=2,
            pretrain_frac=0.5)


# ------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("before", [False, True])
def test_recall_example_layout(before):
    task = recall.RecallTask(num_queries=3, queries_before=before)
    ex = recall.recall_example(np.random.default_rng(0), task, 8)
    assert ex.inputs.size == task.length(8)
    prompt, target = birdie.split_example(ex)
    off = 1 + (task.num_queries + 1 if before else 0)
    pairs = prompt[off: off + 16].reshape(8, 2)
    table = dict(pairs.tolist())
    assert len(table) == 8                                    # distinct keys
    assert prompt[off + 16] == tok.SEP
    queries = prompt[off + 17:]
    assert queries.size == 3
    keys = queries - task.query_offset                        # the question form of a key
    np.testing.assert_array_equal(target, [table[k] for k in keys])
    if before:
        np.testing.assert_array_equal(prompt[1:4], queries)
    # the prompt is the prefix; labels only on the answers; labels = next input there
    assert ex.prefix.sum() == prompt.size and (ex.labels[:prompt.size] == birdie.IGNORE).all()
    assert ex.inputs[prompt.size] == birdie.START_GENERATING
    np.testing.assert_array_equal(ex.labels[prompt.size:-1], ex.inputs[prompt.size + 1:])


def test_recall_task_rejects_bad_layouts():
    with pytest.raises(ValueError, match="disjoint"):
        recall.RecallTask(key_range=(0, 64), value_range=(32, 80))
    with pytest.raises(ValueError, match="num_pairs=2 is not allowed"):
        recall.RecallTask(num_queries=4).check_pairs(2)


def test_recall_batch_packs_rows_with_one_label_per_query():
    task = recall.RecallTask(num_queries=2)
    b = recall.recall_batch(np.random.default_rng(1), task, (2, 4), rows=3, row_length=40)
    assert b["inputs"].shape == (3, 40)
    n_examples = sum(len(set(r[r > 0].tolist())) for r in b["segment_ids"])
    assert b["weights"].sum() == 2 * n_examples
    # every labelled position is a generated (non-prefix) one
    assert not (b["prefix"] & (b["weights"] > 0)).any()


def test_mixture_validation_holds_every_action():
    mix = recall.recall_mixture(recall.RecallTask(), (4, 8), 64)
    assert mix.names[-1] == "task" and len(mix.group_sizes) == mix.num_actions
    val = mix.validation(np.random.default_rng(0), 2, rows=4)
    ids = np.concatenate([v["objective_ids"].ravel() for v in val])
    assert set(range(mix.num_actions)) <= set(ids.tolist())


# ------------------------------------------------------------------------------------------
# Training (a few steps) and scoring
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_birdie():
    task = recall.RecallTask(num_queries=1)
    return task, br.train_recall_model("gated_birdie", dict(TINY), task, 0, log=False)


def test_birdie_arm_runs_the_controller(trained_birdie):
    task, tr = trained_birdie
    # pre-training is 2 steps with a controller update every 2: the initial mixture + 1 update
    assert [s for s, _ in tr.mixtures] == [0, 2]
    for _, m in tr.mixtures:
        assert len(m) == len(tr.action_names) and abs(sum(m) - 1) < 1e-5
    assert all(np.isfinite(l) for _, l in tr.losses)
    assert tr.tokens == TINY["rows"] * TINY["row_length"] * TINY["steps"]
    acc = br.recall_accuracy(tr, task, 4, examples=8, rows=4, row_length=48, seed=0)
    assert 0.0 <= acc <= 1.0


def test_equal_parameters_across_recall_models():
    s = br.SIZES["cpu"]
    counts = {}
    for name in br.RECALL_MODELS:
        model = br.build_model(name, s)
        shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8), np.int32))
        counts[name] = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    lo, hi = min(counts.values()), max(counts.values())
    assert hi / lo < 1.1, counts


# ------------------------------------------------------------------------------------------
# The configs and the trainer's data path
# ------------------------------------------------------------------------------------------
def test_config_variants_and_errors():
    from train.configs import birdie as cfg
    for name in cfg.MODELS:
        c = cfg.get_config(f"tiny:{name}")
        assert c.data.with_prefix == (name != "transformer_ntp")
        assert c.data.objectives == ("ntp" if name.endswith("_ntp") else "birdie")
    assert cfg.get_config("tiny").model.layer_pattern == "bc"
    with pytest.raises(ValueError, match="'huge' is not allowed"):
        cfg.get_config("huge")
    with pytest.raises(ValueError, match="'mamba' is not allowed"):
        cfg.get_config("tiny:mamba")


def test_config_models_have_equal_parameters():
    # (the paper sizes, 1.35–1.42B, are checked the same way by `param_counts("paper")`; tracing
    # five 1.4B models takes too long for this file)
    from train.configs import birdie as cfg
    counts = cfg.param_counts("tiny")
    assert max(counts.values()) / min(counts.values()) < 1.1, counts


def test_birdie_data_rows():
    from train.data import birdie_data as bd
    spec = bd.BirdieDataSpec(seq_len=384, task_weight=0.5, phonebook_entries=(2, 3),
                             num_validation=4)
    src = bd.BirdieSource(spec, "validation")
    r = src[1]
    assert set(r) == {"inputs", "targets", "weights", "segment_ids", "objective_ids", "prefix"}
    assert all(v.shape == (384,) for v in r.values())
    np.testing.assert_array_equal(r["inputs"], src[1]["inputs"])   # regenerated identically
    assert r["weights"].sum() > 0 and not (r["prefix"] & (r["weights"] > 0)).any()
    no_prefix = bd.BirdieSource(bd.BirdieDataSpec(seq_len=64, objectives="ntp",
                                                   with_prefix=False), "train")[0]
    assert "prefix" not in no_prefix
    with pytest.raises(ValueError, match="corpus='web'"):
        bd.BirdieDataSpec(corpus="web")


def test_train_main_runs_two_steps(tmp_path, repo_root):
    env = {**os.environ, "XLA_FLAGS": os.environ["MNEMAX_TEST_XLA_FLAGS"]}   # one device
    out = subprocess.run(
        [sys.executable, "-m", "train.main", "--config", "train/configs/birdie.py:tiny",
         "--workdir", str(tmp_path / "run"), "--config.num_steps=2", "--config.progress=False"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and np.isfinite(summary["final_loss"])


def test_transformer_config_trains_without_prefix(tmp_path):
    from train import trainer
    from train.configs import birdie as cfg
    c = cfg.get_config("tiny:transformer_ntp")
    c.num_steps, c.batch_size, c.seq_len = 2, 2, 64
    c.data.task_weight = 0.0          # a phone-book task example needs > 64 tokens
    c.checkpoint_every = c.eval_every = 0
    c.progress = False
    out = trainer.train(c, tmp_path, devices=jax.devices()[:1])
    assert out["step"] == 2 and np.isfinite(out["final_loss"])


# ------------------------------------------------------------------------------------------
# The figure registry
# ------------------------------------------------------------------------------------------
def test_figures_are_registered():
    names = figures.load_all()
    assert {"birdie_recall", "birdie_phonebook"} <= set(names)


def test_no_binding_baseline():
    task = recall.RecallTask(num_queries=1, key_range=(0, 8), value_range=(64, 72))
    assert br.no_binding_baseline(task, 1, examples=4, seed=0) == 1.0   # one pair: its value
    b = br.no_binding_baseline(task, 8, examples=256, seed=0)
    assert 1 / 8 <= b < 0.3       # ≥ 1/P (the answer is one of the P values), repeats add a bit


# ------------------------------------------------------------------------------------------
# Packing batches
# ------------------------------------------------------------------------------------------
def test_pick_draws_like_rng_choice():
    # pick / pick_weighted replace rng.choice in batch packing: same values, same stream after.
    for seed in range(20):
        p = np.random.default_rng(seed).random(7)
        p[seed % 7] = 0.0
        p /= p.sum()
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        cdf = recall.weights_cdf(p)
        assert ([int(a.choice(7, p=p)) for _ in range(50)]
                == [recall.pick_weighted(b, cdf) for _ in range(50)])
        assert [int(a.choice((1, 2, 4, 6))) for _ in range(50)] == [
            recall.pick(b, (1, 2, 4, 6)) for _ in range(50)]
        assert a.random() == b.random()


def test_shared_task_batches_replay_train_models_own_draws():
    s = dict(br.SIZES["quick"], steps=3)
    task = recall.RecallTask(**s["task"])
    shared = br.recall_task_batches(s, task, seed=4)
    own = br._recall_mixture_at(s, task)
    rng = br.train_rng(4)
    for i in range(3):
        want = own.task_batch(rng, s["rows"])
        for k, v in shared[i].items():
            np.testing.assert_array_equal(np.asarray(v), want[k])
    assert [b["inputs"] is shared[i]["inputs"] for i, b in enumerate(shared)] == [True] * 3
    with pytest.raises(IndexError):
        shared[3]

    a = br.train_recall_model("gated_ntp", s, task, 4, log=False, task_batches=shared)
    b = br.train_recall_model("gated_ntp", s, task, 4, log=False)
    assert a.losses == b.losses
    with pytest.raises(ValueError, match="pretrain_frac"):
        br.train_model("gated_ntp", s, own, 4, pretrain_frac=0.5, task_batches=shared,
                       log=False)


def test_pretraining_batches_follow_the_controllers_mixture():
    # Batches are packed ahead one stretch of constant mixture at a time: each pre-training step
    # must still draw with the mixture in force at that step (the controller updates every step).
    s = dict(TINY, steps=6, controller_every=1)
    task = recall.RecallTask(num_queries=1)
    mix = br._recall_mixture_at(s, task)
    seen, draw = [], mix.batch

    def recording(rng, mixture, rows):
        seen.append(np.asarray(mixture).tolist())
        return draw(rng, mixture, rows)

    mix.batch = recording
    tr = br.train_model("gated_birdie", s, mix, 0, pretrain_frac=0.5, controller=True,
                        log=False)
    assert [u for u, _ in tr.mixtures] == [0, 1, 2, 3]
    assert seen[:3] == [w for _, w in tr.mixtures[:3]]
    assert seen[3:] == [np.eye(mix.num_actions)[-1].tolist()] * 3   # the task phase


# ------------------------------------------------------------------------------------------
# The figures' pipelines on tiny sizes
# ------------------------------------------------------------------------------------------
TINY_SIZE = dict(TINY, task=dict(num_queries=1, key_range=(0, 8), value_range=(64, 72)),
                 pairs=(2, 4), train_pairs=(1, 2, 4))


def test_recall_table_on_a_tiny_size(monkeypatch):
    monkeypatch.setitem(br.SIZES, "tiny", dict(TINY_SIZE))
    models = ("transformer_ntp", "gated_bidir")
    res = br.recall_table("tiny", 0, models=models, log=False)
    assert set(res) == {"accuracy", "no_binding_baseline", "params", "tokens", "train_seconds",
                        "loss_curves", "mixtures", "task", "chance"}
    assert set(res["accuracy"]) == set(models)
    for m in models:
        assert set(res["accuracy"][m]) == set(TINY_SIZE["pairs"])
        assert all(0.0 <= a <= 1.0 for a in res["accuracy"][m].values())
    assert set(res["no_binding_baseline"]) == set(TINY_SIZE["pairs"])
    assert set(res["params"]) == set(res["tokens"]) == set(models)
    assert res["tokens"]["gated_bidir"] == TINY["steps"] * TINY["rows"] * TINY["row_length"]
    assert res["mixtures"] == {}                          # neither model pre-trains
    assert res["chance"] == 1 / 8


@pytest.mark.parametrize("name", sorted(br.SPECS))
def test_only_bidirectional_specs_read_the_prefix(name):
    # Swapping a causal and a bidirectional spec would fail here: the bidirectional models'
    # logits at the first prompt position change with a later prompt token, the causal ones'
    # do not (the names say which is which; the module docstring lists them).
    bidirectional = {"gated_bidir", "gated_birdie", "hawk_birdie"}
    assert br.SPECS[name].bidirectional == (name in bidirectional)
    s = dict(TINY_SIZE)
    model = br.build_model(name, s)
    params = layers.unbox(model.init(jax.random.key(0), np.zeros((1, 12), np.int32))["params"])
    fwd = br.apply_fn(model, br.SPECS[name])
    x = np.arange(1, 13, dtype=np.int32)[None]
    batch = {"inputs": x, "segment_ids": np.ones_like(x), "prefix": np.arange(12)[None] < 8}
    y = x.copy()
    y[0, 6] = 100                                          # a later token inside the prefix
    a = np.asarray(fwd(params, batch))[0, 0]
    b = np.asarray(fwd(params, dict(batch, inputs=y)))[0, 0]
    assert (not np.allclose(a, b)) == (name in bidirectional)


def test_phonebook_figure_on_a_tiny_size(monkeypatch, tmp_path):
    """Each arm pre-trains then fine-tunes through the trainer (the Birdie arm with its
    controller), from the pre-trained parameters, and is scored; a rerun reuses the runs."""
    from train.configs import birdie as birdie_config
    tiny = dict(birdie_config.PHONEBOOK_SIZES["quick"], steps=4, controller_every=1,
                eval_examples=2, queries=(1, 2), width=16, state_width=16, num_heads=2)
    monkeypatch.setitem(birdie_config.PHONEBOOK_SIZES, "tiny", tiny)
    monkeypatch.setitem(br.SIZES, "tiny", dict(TINY_SIZE))     # validate_size checks both
    monkeypatch.setattr(br, "PHONEBOOK_MODELS", ("transformer_ntp", "gated_birdie_causal"))
    res = br.birdie_phonebook_figure(size="tiny", seed=0, out=tmp_path)
    assert set(res["digit_accuracy"]) == {"transformer_ntp", "gated_birdie_causal"}
    for m, acc in res["digit_accuracy"].items():
        assert set(acc) == {"1", "2"} and all(0.0 <= a <= 1.0 for a in acc.values())
    assert (res["entries"], res["steps"]) == (tiny["entries"], 4)
    assert {p.name for p in tmp_path.iterdir()} >= {"birdie_phonebook.csv",
                                                    "birdie_phonebook.png"}
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name.split("-")[3] for r in runs] == ["gated_birdie_causal", "transformer_ntp"]
    read = lambda p: [json.loads(l) for l in p.read_text().splitlines()]   # noqa: E731
    pre = read(runs[0] / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in pre if "mixture" in r] == [1, 2]          # the controller ran
    tune = read(runs[0] / "finetune" / "metrics.jsonl")
    assert tune[0]["init_from"] == {"workdir": str(runs[0] / "pretrain"), "step": 2}
    assert [r["step"] for r in tune if "loss" in r] == [2]              # 2 of the 4 steps
    again = br.birdie_phonebook_figure(size="tiny", seed=0, out=tmp_path)   # reuses both runs
    assert again["digit_accuracy"] == res["digit_accuracy"]
    assert len(read(runs[0] / "finetune" / "metrics.jsonl")) == len(tune) + 1   # a start row
