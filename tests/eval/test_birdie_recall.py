"""eval/birdie_recall.py, train/configs/birdie.py, train/data/recall.py, train/data/birdie_data.py
and the controller hook's recall arms (train/objectives/birdie_controller.py)."""
import dataclasses
import hashlib
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
from train import trainer
from train.configs import birdie as birdie_config
from train.configs.birdie import RECALL_MODELS
from train.data import recall
from train.data import tokenizer as tok
from train.objectives import birdie

# A recall size small enough for a few trainer steps (RECALL_SIZES fields).
TINY_SIZE = dict(task=dict(num_queries=1, key_range=(0, 8), value_range=(64, 72)),
                 pairs=(2, 4), train_pairs=(1, 2, 4), width=16, state_width=16, num_layers=2,
                 num_heads=2, ssm_layers=3, bidir_pattern="cbc", ssm_mlp=32, steps=6, rows=4,
                 row_length=48, lr=3e-3, eval_examples=8, controller_every=1, pretrain_frac=0.7)


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


def _rows(split="train", n=6, **fields):
    spec = recall.RecallDataSpec(task=recall.RecallTask(num_queries=2), pairs=(2, 4), seq_len=40,
                                 **fields)
    src = recall.RecallSource(spec, split)
    return spec, [src[i] for i in range(n)], src


def test_recall_rows_hold_the_task_with_one_label_per_query():
    spec, rows, src = _rows()
    K = len(spec.action_names()) - 1
    for r in rows:
        assert all(v.shape == (40,) for v in r.values())
        n_examples = len(set(r["segment_ids"][r["segment_ids"] > 0].tolist()))
        assert n_examples >= 1 and r["weights"].sum() == 2 * n_examples
        assert not (r["prefix"] & (r["weights"] > 0)).any()   # labels only where generated
        assert set(r["objective_ids"][r["segment_ids"] > 0].tolist()) == {K}   # the task alone
    np.testing.assert_array_equal(src[3]["inputs"], rows[3]["inputs"])   # regenerated alone
    assert not np.array_equal(rows[0]["inputs"], rows[1]["inputs"])
    other = recall.RecallSource(dataclasses.replace(spec, seed=1), "train")[0]
    assert not np.array_equal(other["inputs"], rows[0]["inputs"])


def test_recall_rows_follow_the_mixture():
    spec, _, _ = _rows(n=0)
    names = spec.action_names()
    assert names[-1] == "task" and len(spec.group_sizes()) == len(names)
    # each configuration's class size; the task is a class of its own (Birdie's 7 + 1)
    sizes = spec.group_sizes()
    assert sizes[-1] == 1 and sum(1 / g for g in sizes) == pytest.approx(8)
    only_first = [1.0] + [0.0] * (len(names) - 1)
    _, rows, _ = _rows(mixture=only_first)
    ids = np.concatenate([r["objective_ids"][r["segment_ids"] > 0] for r in rows])
    assert set(ids.tolist()) == {0}
    _, rows, _ = _rows(n=40, mixture=[1.0] * len(names))
    ids = np.concatenate([r["objective_ids"][r["segment_ids"] > 0] for r in rows])
    assert len(set(ids.tolist())) > len(names) // 2
    _, rows, _ = _rows("validation", n=len(names), objective_per_row=True, mixture=only_first)
    for i, r in enumerate(rows):                 # balanced rows: one action each, in order
        assert set(r["objective_ids"][r["segment_ids"] > 0].tolist()) == {i}
    _, rows, _ = _rows(n=1, with_prefix=False)
    assert "prefix" not in rows[0]
    with pytest.raises(ValueError, match=r"mixture=\(1.0,\) is not allowed"):
        _rows(n=0, mixture=(1.0,))
    with pytest.raises(ValueError, match=r"pairs=\(2, 16\) is not allowed: 16 pairs make "
                                         r"examples of 36 tokens > seq_len=32"):
        recall.RecallDataSpec(task=recall.RecallTask(), pairs=(2, 16), seq_len=32)


# ------------------------------------------------------------------------------------------
# Arms through the trainer
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_size():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(birdie_config.RECALL_SIZES, "tiny", dict(TINY_SIZE))
        yield "tiny"


@pytest.fixture(scope="module")
def trained_birdie(tiny_size, tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    return out, br.train_arm(tiny_size, "gated_birdie", 0, out)


def test_birdie_arm_runs_the_controller_then_the_task(trained_birdie):
    # 6 steps, pre-training the first round(0.7 * 6) = 4 with a controller update every step:
    # the initial (uniform) mixture, updates after steps 1-3 (the controller's own choice once
    # it has two rewards, after step 3), then the task alone from step 4 on
    _, tr = trained_birdie
    assert [s for s, _ in tr.mixtures] == [0, 1, 2, 3, 4]
    for _, m in tr.mixtures:
        assert len(m) == len(tr.action_names) and abs(sum(m) - 1) < 1e-5
    assert tr.action_names[-1] == "task"
    assert tr.mixtures[0][1][-1] > 0 and tr.mixtures[2][1] != tr.mixtures[3][1]
    assert tr.mixtures[-1][1] == [0.0] * (len(tr.action_names) - 1) + [1.0]
    rows = [json.loads(l) for l in (tr.workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("finetune", False) for r in rows if "mixture" in r] == [False] * 3 + [True]
    assert all(np.isfinite(l) for _, l in tr.losses) and tr.losses[-1][0] == 6
    assert tr.tokens == TINY_SIZE["rows"] * TINY_SIZE["row_length"] * TINY_SIZE["steps"]
    acc = br.recall_accuracy(tr, recall.RecallTask(num_queries=1), 4, examples=8, rows=4,
                             row_length=48, seed=0)
    assert 0.0 <= acc <= 1.0


def test_a_finished_arm_is_reused(trained_birdie, tiny_size):
    out, tr = trained_birdie
    again = br.train_arm(tiny_size, "gated_birdie", 0, out)
    assert again.workdir == tr.workdir and again.mixtures == tr.mixtures
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, tr.params)
    rows = (tr.workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["resumed_from"] for l in rows if '"start"' in l] == [0, 6]


def test_controller_hook_settings_are_checked(tiny_size):
    c = birdie_config.recall_config(tiny_size, "gated_birdie", 0)
    c.hooks.birdie_controller.finetune_at = 7
    with pytest.raises(ValueError, match=r"finetune_at=7 is not allowed; use 0 \(never\) or a "
                                         r"step in 1..num_steps=6"):
        trainer.build_hooks(c)
    c = birdie_config.get_config("tiny")
    c.hooks.birdie_controller.finetune_at = 10
    with pytest.raises(ValueError, match="finetune_at=10 is not allowed with data.name='birdie'"):
        trainer.build_hooks(c)


def test_equal_parameters_across_recall_models():
    s = birdie_config.RECALL_SIZES["cpu"]
    counts = {}
    for name in RECALL_MODELS:
        model = trainer.build_model(birdie_config.recall_model(name, s))
        shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8), np.int32))
        counts[name] = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    lo, hi = min(counts.values()), max(counts.values())
    assert hi / lo < 1.1, counts


@pytest.mark.parametrize("name", sorted(birdie_config.ARMS))
def test_only_bidirectional_arms_read_the_prefix(name, tiny_size):
    # Swapping a causal and a bidirectional arm would fail here: the bidirectional models'
    # logits at the first prompt position change with a later prompt token, the causal ones'
    # do not (the names say which is which; the module docstring lists them), and only the
    # bidirectional arms' data carry the prefix.
    bidirectional = {"transformer_birdie", "gated_bidir", "gated_birdie", "hawk_birdie",
                     "gated_birdie_paper"}
    assert birdie_config.ARMS[name].bidirectional == (name in bidirectional)
    if name in RECALL_MODELS:
        c = birdie_config.recall_config(tiny_size, name, 0)
        assert c.data.with_prefix == (name in bidirectional)
    model = trainer.build_model(birdie_config.recall_model(name, TINY_SIZE))
    params = layers.unbox(model.init(jax.random.key(0), np.zeros((1, 12), np.int32))["params"])
    x = np.arange(1, 13, dtype=np.int32)[None]
    batch = {"inputs": x, "segment_ids": np.ones_like(x)}
    if birdie_config.ARMS[name].family == "ssm" or name in bidirectional:
        batch["prefix"] = np.arange(12)[None] < 8           # every SSM could read a prefix
    y = x.copy()
    y[0, 6] = 100                                          # a later token inside the prefix
    a = np.asarray(birdie.packed_logits(model.apply, params, batch))[0, 0]
    b = np.asarray(birdie.packed_logits(model.apply, params, dict(batch, inputs=y)))[0, 0]
    assert (not np.allclose(a, b)) == (name in bidirectional)


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
    from train.configs import birdie as cfg
    counts = cfg.param_counts("tiny")
    assert max(counts.values()) / min(counts.values()) < 1.1, counts


def test_paper_architectures_are_the_papers_1_4b():
    # one model per architecture (the others share its parameters: the same model, other data)
    from train.configs import birdie as cfg
    counts = cfg.param_counts("paper", ("transformer_birdie", "gated_birdie", "hawk_birdie"))
    assert all(abs(n / 1.4e9 - 1) <= 0.02 for n in counts.values()), counts
    t, g, h = (cfg.get_config(f"paper:{n}").model for n in counts)
    assert (t.num_layers, t.rope_base, g.num_layers, g.state_width, g.mlp_hidden) == (
        24, 250_000.0, 48, 2560, 0)
    assert (h.num_layers, h.mlp_hidden / h.width, h.mlp) == (20, 3, "geglu")


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


# sha256[:16] of the first rows each figure recipe's data config gives, computed with the code
# before the objective settings existed (commit d38f131): the recipes set the compact settings,
# so their data (and so the committed figures) are unchanged bit for bit.
# Since the Birdie issue's items 5 and 7, tiny pre-trains on the prose alone (no phone book, no
# task) and the cpu phone book keeps the paper's proportions (books of 5–21 entries, rows of 1,024).
RECIPE_ROWS = {"tiny": "b8032d476dd8ace1", "phonebook_cpu": "d88b50fc82ca7dec",
               "recall_cpu": "e4786297ee3b5337", "recall_quick": "e4786297ee3b5337"}


def _rows_hash(data_config, split, seq_len, n):
    from train.data import pipeline
    src, _ = pipeline.make_source(data_config, split=split, seq_len=seq_len)
    h = hashlib.sha256()
    for i in range(n):
        r = src[i]
        for k in sorted(r):
            h.update(k.encode())
            h.update(np.ascontiguousarray(r[k]).tobytes())
    return h.hexdigest()[:16]


def test_figure_recipes_keep_their_data_bit_for_bit():
    c = birdie_config.get_config("tiny:gated_birdie")
    got = {"tiny": _rows_hash(c.data, "validation", c.seq_len, 4)}
    pre, _ = birdie_config.phonebook_phases("cpu", "gated_birdie", 0)
    got["phonebook_cpu"] = _rows_hash(pre.data, "train", pre.seq_len, 4)
    for size in ("cpu", "quick"):
        rc = birdie_config.recall_config(size, "gated_birdie", 0)
        rc.data.mixture = (1.0,) * 19          # every action, the task included
        got[f"recall_{size}"] = _rows_hash(rc.data, "train", rc.seq_len, 6)
    assert got == RECIPE_ROWS
    # the paper-size recipes use the paper's settings
    for c in (birdie_config.get_config("paper:gated_birdie"),
              birdie_config.phonebook_phases("paper", "gated_birdie", 0, tokenizer="byte")[0],
              birdie_config.recall_config("paper", "gated_birdie", 0)):
        assert birdie.ObjectiveSettings.from_mapping(c.data.objective_settings) == \
            birdie.PAPER_SETTINGS


def test_train_main_trains_the_prefix_lm_transformer_with_the_controller(tmp_path, repo_root):
    """`python -m train.main` runs birdie.py:tiny:transformer_birdie (prefix-LM attention, the
    controller as a trainer hook)."""
    c = birdie_config.get_config("tiny:transformer_birdie")
    assert c.model.prefix_lm and c.data.with_prefix and "birdie_controller" in c.hooks
    env = {**os.environ, "XLA_FLAGS": os.environ["MNEMAX_TEST_XLA_FLAGS"]}   # one device
    out = subprocess.run(
        [sys.executable, "-m", "train.main", "--config",
         "train/configs/birdie.py:tiny:transformer_birdie", "--workdir", str(tmp_path / "run"),
         "--config.num_steps=2", "--config.batch_size=2", "--config.progress=False",
         "--config.checkpoint_every=0", "--config.eval_every=0",
         "--config.hooks.birdie_controller.every=2"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and np.isfinite(summary["final_loss"])
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "mixture" in r] == [2]      # the controller ran


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


# ------------------------------------------------------------------------------------------
# The figures' pipelines on tiny sizes
# ------------------------------------------------------------------------------------------
def test_recall_table_on_a_tiny_size(tiny_size, tmp_path):
    models = ("transformer_ntp", "gated_bidir")
    res = br.recall_table(tiny_size, 0, tmp_path, models=models)
    assert set(res) == {"accuracy", "no_binding_baseline", "params", "tokens", "train_seconds",
                        "loss_curves", "mixtures", "task", "chance"}
    assert set(res["accuracy"]) == set(models)
    for m in models:
        assert set(res["accuracy"][m]) == set(TINY_SIZE["pairs"])
        assert all(0.0 <= a <= 1.0 for a in res["accuracy"][m].values())
        assert [s for s, _ in res["loss_curves"][m]] == [6]        # log_every 25: the last step
    assert set(res["no_binding_baseline"]) == set(TINY_SIZE["pairs"])
    assert set(res["params"]) == set(res["tokens"]) == set(models)
    assert res["tokens"]["gated_bidir"] == 6 * TINY_SIZE["rows"] * TINY_SIZE["row_length"]
    assert res["mixtures"] == {}                          # neither model pre-trains
    assert res["chance"] == 1 / 8
    runs = sorted(p.name.split("-")[3] for p in (tmp_path / "runs").iterdir())
    assert runs == sorted(models)


def test_phonebook_figure_on_a_tiny_size(monkeypatch, tmp_path):
    """Each arm pre-trains then fine-tunes through the trainer (the Birdie arm with its
    controller), from the pre-trained parameters, and is scored; a rerun reuses the runs."""
    tiny = dict(birdie_config.PHONEBOOK_SIZES["quick"], pretrain_steps=2, finetune_steps=2,
                controller_every=1,
                eval_examples=2, queries=(1, 2), width=16, state_width=16, num_heads=2)
    monkeypatch.setitem(birdie_config.PHONEBOOK_SIZES, "tiny", tiny)
    monkeypatch.setitem(birdie_config.RECALL_SIZES, "tiny", dict(TINY_SIZE))   # validated too
    # one arm: a Birdie model, so the controller, the fine-tune and its init_from all run
    monkeypatch.setattr(br, "PHONEBOOK_MODELS", ("gated_birdie_causal",))
    res = br.birdie_phonebook_figure(size="tiny", seed=0, out=tmp_path)
    assert set(res["digit_accuracy"]) == {"gated_birdie_causal"}
    for m, acc in res["digit_accuracy"].items():
        assert set(acc) == {"1", "2"} and all(0.0 <= a <= 1.0 for a in acc.values())
    assert (res["entries"], res["pretrain_steps"], res["finetune_steps"]) == (
        list(tiny["entries"]), 2, 2)
    assert {p.name for p in tmp_path.iterdir()} >= {"birdie_phonebook.csv",
                                                    "birdie_phonebook.png"}
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name.split("-")[3] for r in runs] == ["gated_birdie_causal"]
    read = lambda p: [json.loads(l) for l in p.read_text().splitlines()]   # noqa: E731
    pre = read(runs[0] / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in pre if "mixture" in r] == [1, 2]          # the controller ran
    tune = read(runs[0] / "finetune" / "metrics.jsonl")
    assert tune[0]["init_from"] == {"workdir": str(runs[0] / "pretrain"), "step": 2}
    assert [r["step"] for r in tune if "loss" in r] == [2]              # 2 of the 4 steps
    again = br.birdie_phonebook_figure(size="tiny", seed=0, out=tmp_path)   # reuses both runs
    assert again["digit_accuracy"] == res["digit_accuracy"]
    assert len(read(runs[0] / "finetune" / "metrics.jsonl")) == len(tune) + 1   # a start row
