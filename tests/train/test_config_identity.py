"""Config identity: which fields make a run, its hash, the diff, and the figures' run folders."""
import json
import re

import pytest

from train import config_identity as ci
from train import trainer
from train.configs import birdie, landmark, lm, mac

ALL_CONFIGS = ([("landmark", v, landmark.get_config(v)) for v in landmark.VARIANTS]
               + [("lm", v, lm.get_config(v)) for v in ("tiny", "paper")]
               + [("mac", v, mac.get_config(v)) for v in mac.VARIANTS]
               + [("birdie", v, birdie.get_config(v)) for v in ("tiny", "paper")])


@pytest.mark.parametrize("family, variant, config", ALL_CONFIGS,
                         ids=[f"{f}:{v}" for f, v, _ in ALL_CONFIGS])
def test_stored_config_json_matches_the_config_it_was_written_from(family, variant, config):
    # Exactly what the trainer writes: config.json (indent 2) and a checkpoint's config item.
    for stored in (json.loads(config.to_json_best_effort(indent=2)),
                   json.loads(config.to_json_best_effort())):
        assert ci.config_diff(stored, config) == []
        assert ci.config_hash(stored) == ci.config_hash(config)
        ci.check_compatible(stored, config)


def test_identity_leaves_out_run_control_and_keeps_the_rest():
    c = landmark.get_config("tiny")
    ident = ci.identity(c)
    for f in ("num_steps", "checkpoint_every", "eval_every", "log_every", "keep_checkpoints",
              "async_checkpoints", "progress", "name", "mesh.data", "debug.nan_at_step",
              "eval.num_batches", "model.remat", "model.attention_impl"):
        assert f not in ident
    for f in ("seed", "batch_size", "seq_len", "objective", "model.num_heads", "model.mem_freq",
              "data.min_length", "data.answer_weight", "optim.lr", "optim.min_lr_ratio"):
        assert f in ident, f
    d = landmark.get_config("tiny")
    d.num_steps, d.checkpoint_every, d.mesh.data, d.progress = 9, 3, 2, False
    d.debug.sigkill_at_step, d.eval.num_batches, d.name = 5, 1, "other"
    d.model.attention_impl = "auto"      # another kernel, the same run (a resume on a GPU)
    assert ci.config_hash(d) == ci.config_hash(c) and ci.changed_fields(c, d) == []


def test_hash_is_canonical_and_stable():
    # Pinned: figures' run folders (and shipped runs) are named with it.
    assert ci.config_hash({"seed": 0, "num_steps": 5, "model": {"width": 64, "mlp": "gelu"}}) \
        == "5dc0df76c451"
    same = {"model": {"mlp": "gelu", "width": 64.0}, "seed": 0, "num_steps": 7}
    assert ci.config_hash(same) == "5dc0df76c451"            # key order, 64 vs 64.0, num_steps
    assert ci.config_hash({"a": (1, 2)}) == ci.config_hash({"a": [1, 2]})
    assert ci.config_hash({"a": True}) != ci.config_hash({"a": 1})
    assert re.fullmatch(r"[0-9a-f]{12}", ci.config_hash(landmark.get_config("tiny")))


def test_dataset_added_defaults_apply_to_their_dataset_only():
    # memory_bench's mixture () is left out (its runs before the field keep their hash), in a
    # nested data section too; the same field at the same value stays in Birdie's data.
    old = {"seed": 0, "data": {"name": "memory_bench", "birdie_fraction": 0.0}}
    new = {"seed": 0, "data": {"name": "memory_bench", "birdie_fraction": 0.0, "mixture": [],
                               "objective_per_row": False, "num_validation": 256}}
    assert ci.config_hash(new) == ci.config_hash(old)
    assert ci.config_hash({"base_lm": new}) == ci.config_hash({"base_lm": old})
    assert ci.changed_fields(old, {**new, "data": {**new["data"], "mixture": [1.0]}}) == [
        "data.mixture"]
    assert "data.mixture" in ci.identity({"data": {"name": "birdie", "mixture": []}})


def test_diff_names_fields_with_old_and_new_values():
    a = landmark.get_config("tiny")
    b = landmark.get_config("tiny")
    b.model.num_heads = 8
    b.model.mem_freq = 15
    b.model.unlock()
    del b.model["pos_jump"]
    assert ci.changed_fields(a, b) == ["model.mem_freq", "model.num_heads", "model.pos_jump"]
    assert ci.config_diff(a, b) == ["model.mem_freq: 31 -> 15", "model.num_heads: 4 -> 8",
                                    "model.pos_jump: 0 -> <absent>"]
    assert ci.config_diff(landmark.get_config("tiny"), landmark.get_config("tiny_baseline"))


def test_check_compatible_refuses_in_one_line_unless_allowed():
    a, b = lm.get_config("tiny"), lm.get_config("tiny")
    b.model.num_heads, b.data.num_pairs, b.num_steps = 8, 4, 10
    with pytest.raises(ValueError) as e:
        ci.check_compatible(a, b, where="workdir runs/x")
    msg = str(e.value)
    assert isinstance(e.value, ci.ConfigMismatchError) and "\n" not in msg
    assert "data.num_pairs: 8 -> 4" in msg and "model.num_heads: 4 -> 8" in msg
    assert "num_steps" not in msg.replace("num_pairs", "")
    assert "--allow_config_change=data.num_pairs,model.num_heads" in msg and "new workdir" in msg
    with pytest.raises(ci.ConfigMismatchError, match="num_heads") as e:
        ci.check_compatible(a, b, allow_changes=["data.num_pairs"])
    assert "num_pairs" not in str(e.value)
    ci.check_compatible(a, b, allow_changes=["data.num_pairs", "model.num_heads"])
    ci.check_compatible(a, b, allow_changes=["data", "model"])     # a parent covers its fields
    with pytest.raises(ci.ConfigMismatchError, match=r"no config field: \['model.num_head'\]"):
        ci.check_compatible(a, b, allow_changes=["model.num_head", "data"])


def test_trainer_compares_with_config_json_when_no_checkpoint(tmp_path):
    c = lm.get_config("tiny")
    trainer.check_workdir(c, tmp_path / "fresh")                    # nothing stored: passes
    (tmp_path / "config.json").write_text(c.to_json_best_effort(indent=2))
    trainer.check_workdir(c, tmp_path)
    c.seq_len, c.num_steps = 32, c.num_steps + 1
    with pytest.raises(ci.ConfigMismatchError, match=r"config\.json\).*seq_len: 64 -> 32"):
        trainer.check_workdir(c, tmp_path)
    # What a resume changed goes to the run's start row in metrics.jsonl.
    n = c.num_steps
    assert trainer.check_workdir(c, tmp_path, allow_changes=("seq_len",)) == {
        "config_changes": ["seq_len: 64 -> 32"],
        "run_control_changes": [f"num_steps: {n - 1} -> {n}"]}
    c.model.num_heads = 8       # "all" allows any field, and says which changed
    assert trainer.check_workdir(c, tmp_path, allow_changes=("all",))["config_changes"] == [
        "model.num_heads: 4 -> 8", "seq_len: 64 -> 32"]


def test_recipe_hash_covers_every_phase_and_its_end_step():
    phases = landmark.passkey_phase_configs("cpu", 0)
    assert [p.num_steps for p in phases] == [3000, 5500]
    h = ci.recipe_hash(phases)
    assert ci.recipe_hash(landmark.passkey_phase_configs("cpu", 0)) == h
    assert ci.recipe_hash(phases[:1]) != h
    assert ci.recipe_hash(phases[::-1]) != h
    longer = landmark.passkey_phase_configs("cpu", 0)
    longer[-1].num_steps = 6000
    assert ci.recipe_hash(longer) != h
    blocks15 = landmark.passkey_phase_configs("cpu", 0)
    for c in blocks15:
        c.model.mem_freq = 15
    assert ci.recipe_hash(blocks15) != h                    # a blocks-of-15 run is another run
    assert ci.recipe_hash(landmark.passkey_phase_configs("cpu", 1)) != h
    logged = landmark.passkey_phase_configs("cpu", 0)
    for c in logged:
        c.log_every = 1
    assert ci.recipe_hash(logged) == h


def test_figure_run_folders_carry_the_recipe_hash(tmp_path):
    from eval import lm_mqar, passkey
    from eval import streaming_qa as sqa
    d = passkey.run_dir("cpu", 0, tmp_path)
    assert d.parent == tmp_path / "runs"
    assert re.fullmatch(r"landmark-cpu-seed0-[0-9a-f]{12}", d.name)
    assert d.name.endswith(ci.recipe_hash(landmark.passkey_phase_configs("cpu", 0)))
    b = passkey.run_dir("cpu", 0, tmp_path, baseline=True)
    assert b.name.startswith("landmark_baseline-cpu-seed0-") and b.name[-12:] != d.name[-12:]
    assert re.fullmatch(r"lm_mqar-quick-seed0-[0-9a-f]{12}",
                        lm_mqar.run_dir("quick", 0, tmp_path).name)
    m = sqa.run_dir("quick", 0, tmp_path)
    assert re.fullmatch(r"mac-quick-seed0-[0-9a-f]{12}", m.name) and m.parent == tmp_path / "runs"
    assert m.name.endswith(ci.recipe_hash([sqa.figure_config("quick", 0)]))
    assert sqa.run_dir("quick", 1, tmp_path) != m           # the seed is part of the recipe
