"""The bad-input tour: what a user sees for each bad input, and that nothing is lost.

One test per distinct bad input. A command line must refuse it with exit code 2 (1 for a
run-time failure: a NaN loss), exactly one line holding `error:` and no traceback, naming the
field or file, the value and what is allowed (or what to do); a library call must raise the
exception named here with the field and value in its message. Where a run exists, its last good
checkpoint must be intact afterwards and the run must resume from it.

The train command line runs in this process (`cli_in_process`: the same `resolve_config_flag`
→ `parse_flags` → `main` sequence as `mnemax-train`, minus absl's app wrapper), so most cases
cost no process start; one case (a shard that breaks in the middle of a run) runs
`python -m train.main` as a process. README.md's "Reliability: bad input" table lists these
tests, one row each; `test_readme_table_lists_every_case` keeps the two equal.
"""
import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from eval import cli as eval_cli
from eval import figures, passkey
from models import landmark as lmk
from models import landmark_convert as lmk_convert
from train import checkpoint as ckpt_lib
from train import main as train_main
from train import trainer
from train.configs import lm as lm_config
from train.data import embeddings, pipeline, tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]

# The tiny LM of tests/train/test_trainer.py, as overrides and as a config.
OVERRIDES = {"model.width": 32, "model.num_heads": 4, "seq_len": 16, "batch_size": 8,
             "log_every": 1, "eval_every": 0, "progress": False, "data.source": "memory",
             "data.num_pairs": 4, "data.num_queries": 4, "optim.warmup_steps": 1}


def tiny_config(**overrides):
    c = lm_config.get_config("tiny")
    for k, v in {**OVERRIDES, "num_steps": 2, "checkpoint_every": 2, **overrides}.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    c.async_checkpoints = False
    return c


def cli_args(**overrides) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]


def one_error_line(err: str) -> str:
    """The one line of `err` that holds 'error:' (asserted: exactly one, and no traceback)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture
def cli_in_process(capsys, monkeypatch):
    """run(argv) -> (exit code, the error line): `mnemax-train argv` in this process."""
    def forget():            # config_flags defines a flag per overridden field when parsing
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()

    def run(*argv):
        forget()
        argv = ["mnemax-train", *argv]
        try:
            argv = train_main.resolve_config_flag(argv)
            monkeypatch.setattr(sys, "argv", argv)      # where config_flags reads overrides
            train_main.parse_flags(argv)
            code = train_main.main(argv)
        except ValueError as e:              # what `run` prints for a bad --config NAME
            print(f"error: {e}", file=sys.stderr)
            code = 2
        except SystemExit as e:
            code = e.code
        return code, one_error_line(capsys.readouterr().err)
    yield run
    forget()


def eval_cli_in_process(capsys, main, *argv):
    """(exit code, the error line) of an evaluation command line, as `python -m eval.X` runs it."""
    try:
        code = eval_cli.run(main, list(argv))
    except SystemExit as e:                  # argparse's own refusals
        code = e.code
    return code, one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run with its checkpoint at step 2; tests copy it (`run_copy`)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    trainer.train(tiny_config(), workdir, devices=jax.devices()[:1])
    return workdir


def run_copy(trained, tmp_path) -> pathlib.Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def restores(workdir, step: int, config=None) -> None:
    """Asserts that `workdir`'s newest checkpoint is `step` and restores, with finite params."""
    config = config or tiny_config()
    run = trainer.setup(config, devices=jax.devices()[:1])
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
    try:
        assert ckpt.all_steps()[-1] == step
        state, got = ckpt.restore_latest(trainer.abstract_state(run))
    finally:
        ckpt.close()
    assert got == step and int(state.step) == step
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(
        jax.device_get(state.params)))


def resumes(workdir, to_step: int, config=None) -> None:
    """Asserts that training `workdir` on to `to_step` resumes from its newest checkpoint."""
    config = config or tiny_config(num_steps=to_step)
    config.num_steps = to_step
    before = ckpt_lib.saved_steps(workdir)[-1]
    out = trainer.train(config, workdir, devices=jax.devices()[:1])
    assert out["start_step"] == before and out["step"] == to_step


# ---------------------------------------------------------------------------------------------
# The train command line: the config and the workdir.
# ---------------------------------------------------------------------------------------------
def test_workdir_is_a_file(cli_in_process, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"))
    assert code == 2 and f"workdir='{tmp_path / 'run'}' is not allowed: it is a file" in line
    assert (tmp_path / "run").read_text() == "not a folder"


def test_workdir_under_a_file(cli_in_process, tmp_path):
    (tmp_path / "file").write_text("x")
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "file" / "run"))
    assert code == 2 and f"{tmp_path / 'file'} is a file" in line


def test_workdir_read_only(cli_in_process, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:    # root writes through file modes: let os.access answer as for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if pathlib.Path(p) == ro
                            and mode & os.W_OK else real(p, mode, **kw))
    try:
        code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(ro / "run"))
    finally:
        ro.chmod(0o755)
    assert code == 2 and f"workdir='{ro / 'run'}' is not allowed: {ro} is read-only" in line
    assert not (ro / "run").exists()


def test_missing_workdir_flag(cli_in_process):
    code, line = cli_in_process("--config", "lm:tiny")
    assert code == 2 and line == "error: --workdir must be given"


def test_unknown_config_name(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "nope:tiny", "--workdir", str(tmp_path / "run"))
    assert code == 2 and "config='nope:tiny' names no packaged config" in line
    assert "'landmark', 'lm', 'mac'" in line


def test_unknown_config_variant(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:huge", "--workdir", str(tmp_path / "run"))
    assert code == 2 and line.endswith(
        "lm.py:huge: config variant 'huge' is not allowed; use 'tiny', 'paper' or "
        "'hf=CHECKPOINT[,tokenizer=TOKENIZER]'"), line


def test_unknown_override_names_the_nearest_field(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.model.widht=32")
    assert code == 2 and line == ("error: --config.model.widht names no config field: 'widht' "
                                  "is unknown; did you mean 'width'?")


def test_override_of_the_wrong_type(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.num_steps=abc")
    assert code == 2 and "--config.num_steps=abc" in line and "invalid" in line


def test_negative_num_steps(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.num_steps=-1")
    assert code == 2 and line == "error: num_steps=-1 must be an integer ≥ 0"


def test_zero_batch_size(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.batch_size=0")
    assert code == 2 and line == "error: batch_size=0 must be a positive integer"


def test_vocab_smaller_than_the_tokenizer(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.model.vocab_size=10")
    assert code == 2 and line == (
        "error: model.vocab_size=10 is not allowed: data.name='mqar' produces token ids up to "
        f"{tokenizer.VOCAB_SIZE - 1}; use >= {tokenizer.VOCAB_SIZE}")
    assert not (tmp_path / "run").exists()


def test_cudnn_attention_in_float32(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.model.attention_impl=cudnn")
    assert code == 2 and line == (
        "error: attention_impl='cudnn' is not allowed with dtype=float32 (cuDNN takes bfloat16 "
        "or float16); use 'auto' (xla where the kernel does not serve) or 'xla'")
    assert not (tmp_path / "run").exists()


def test_unknown_dataset_name(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.data.name=nope")
    assert code == 2 and "data_config.name='nope' is unknown; allowed:" in line
    assert "'mqar'" in line


def test_unknown_model_family(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.model.family=rnn", *cli_args())
    assert code == 2 and "model.family='rnn' is not allowed; registered:" in line
    assert "'landmark'" in line


def test_unknown_objective(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.objective=contrastive")
    assert code == 2 and "objective='contrastive' is not allowed; registered:" in line


def test_mesh_does_not_divide_the_batch(cli_in_process, tmp_path):
    # 8 devices in tests: a batch of 6 rows cannot be split over data=8
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                *cli_args(batch_size=6))
    assert code == 2 and line == ("error: batch_size=6 must be a positive multiple of the "
                                  "batch-parallel mesh size 8 (mesh axes ('data', 'fsdp'))")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mesh_sizes_do_not_multiply_to_the_devices(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(tmp_path / "run"),
                                *cli_args(**{"mesh.data": 3}))
    assert code == 2 and "mesh={'data': 3, 'fsdp': 1, 'model': 1} has 3 devices but 8" in line


def test_landmark_seq_len_shorter_than_a_block(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "landmark:tiny", "--workdir", str(tmp_path / "run"),
                                "--config.seq_len=16")
    assert code == 2 and line == ("error: seq_len=16 is not allowed with model.mem_freq=31: a "
                                  "row holds no landmark block; use seq_len >= 31")


# ---------------------------------------------------------------------------------------------
# Configs given to the library
# ---------------------------------------------------------------------------------------------
def test_unknown_top_level_field():
    c = tiny_config()
    c.unlock()
    c.learning_rate = 1.0
    with pytest.raises(ValueError, match=r"config has unknown fields \['learning_rate'\]; "
                                         r"allowed: \["):
        trainer.validate_config(c)


def test_unknown_data_field():
    c = tiny_config()
    c.data.unlock()
    c.data.num_pair = 3
    with pytest.raises(ValueError, match=r"data_config fields \['num_pair'\] are unknown for "
                                         r"name='mqar'; allowed: \[.*'num_pairs'"):
        trainer.validate_config(c)


def test_unknown_hook():
    c = tiny_config()
    c.hooks = {"nope": {}}
    with pytest.raises(ValueError, match=r"hooks='nope' is not allowed; registered: "
                                         r"\['birdie_controller'\]"):
        trainer.setup(c, devices=jax.devices()[:1])


def test_grad_accum_that_does_not_divide_the_batch():
    with pytest.raises(ValueError, match=r"optim.grad_accum=3 must be ≥ 1 and divide "
                                         r"batch_size=8"):
        trainer.validate_config(tiny_config(**{"optim.grad_accum": 3}))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def mqar_build(tmp_path, **fields):
    c = pipeline.default_data_config("mqar")
    c.data_dir, c.num_train, c.num_test, c.num_pairs, c.num_queries = str(tmp_path), 64, 16, 4, 4
    c.update(fields)
    return c


def train_shard(data_dir) -> pathlib.Path:
    (shard,) = pathlib.Path(data_dir).rglob("mqar-train.array_record-*")
    return shard


def read_batches(data, n=10):
    it = pipeline.make_dataset(data, split="train", seed=0, global_batch_size=8, seq_len=16)
    for _ in range(n):
        next(it)


def test_truncated_array_record_shard_in_the_middle_of_a_run(tmp_path):
    """A run reading a TFDS build whose shard gets cut short: the command line names the build
    and how to rebuild it (exit 2); the checkpoint stays; rebuilt, the run resumes."""
    data_dir, workdir = tmp_path / "data", tmp_path / "run"
    fields = {"data.source": "tfds", "data.data_dir": str(data_dir), "data.num_train": 64,
              "data.num_test": 16}
    trainer.train(tiny_config(**fields), workdir, devices=jax.devices()[:1])
    shard = train_shard(data_dir)
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    env = dict(os.environ, PYTHONPATH=str(REPO),
               XLA_FLAGS=os.environ["MNEMAX_TEST_XLA_FLAGS"]
               + " --xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, "-m", "train.main", "--config", "lm:tiny", "--workdir", str(workdir),
         *cli_args(**fields, num_steps=4, checkpoint_every=2)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    line = one_error_line(out.stderr)
    assert "the MQAR build in" in line and "an array_record shard is truncated or corrupted" in line
    assert f"delete {shard.parent}" in line
    restores(workdir, 2)
    shutil.rmtree(shard.parent)                           # what the message says to do
    resumes(workdir, 4, tiny_config(**fields))


def test_corrupt_array_record_shard(tmp_path):
    data = mqar_build(tmp_path)
    read_batches(data, 1)
    shard = train_shard(tmp_path)
    raw = bytearray(shard.read_bytes())
    raw[200:400] = b"\xff" * 200                          # inside the first chunk of records
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"the MQAR build in .*: record \d+ cannot be read "
                                         r"\(RuntimeError: Corrupted .*\); an array_record shard "
                                         r"is truncated or corrupted: delete .* and rerun"):
        read_batches(data)


def test_empty_split(tmp_path):
    data = pipeline.default_data_config("text")
    data.source, data.validation_percent = "memory", 0
    with pytest.raises(ValueError, match=r"split 'validation' of data.name='text' has no "
                                         r"records; allowed: a split with at least one"):
        pipeline.make_dataset(data, split="validation", seed=0, global_batch_size=8, seq_len=16)


def test_build_with_an_empty_split(tmp_path):
    data = pipeline.default_data_config("text")
    data.data_dir, data.validation_percent = str(tmp_path), 100
    with pytest.raises(ValueError, match=r"data.validation_percent=100 is not allowed: 0 or 100 "
                                         r"leaves a split of the python_docs build empty; use "
                                         r"1..99"):
        pipeline.make_dataset(data, split="train", seed=0, global_batch_size=8, seq_len=16)
    assert not list(tmp_path.rglob("*.array_record*"))


def test_missing_dataset_build_names_how_to_prepare_it(tmp_path):
    data = pipeline.default_data_config("tfds")
    data.data_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r"data.tfds_name='pg19' has no array_record build in "
                                         r"data.data_dir='.*'.*; prepare it once: rerun with "
                                         r"--config.data.download=True"):
        pipeline.make_dataset(data, split="train", seed=0, global_batch_size=8, seq_len=16)


def test_missing_embeddings_file(tmp_path):
    with pytest.raises(ValueError, match=r"data_config.data_dir='.*' has no train.npz"):
        embeddings.load(str(tmp_path), "train")


def test_nan_in_the_data(tmp_path):
    z = np.ones((5, 3), np.float32)
    z[3, 1] = np.nan
    embeddings.save(tmp_path, "train", z, np.arange(5))
    with pytest.raises(ValueError, match=r"train.npz: z has non-finite values \(NaN or inf\) in "
                                         r"1 rows, first row 3; allowed: finite embeddings"):
        embeddings.EmbeddingSource(str(tmp_path), "train")


# ---------------------------------------------------------------------------------------------
# Pretrained checkpoints and tokenizers (models/pretrained.py, train/data/tokenizer.py)
# ---------------------------------------------------------------------------------------------
def test_pretrained_checkpoint_missing(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", f"lm:hf={tmp_path / 'nothing'}", "--workdir",
                                str(tmp_path / "run"))
    assert code == 2 and line.endswith(
        f"path='{tmp_path / 'nothing'}' is not a local directory; pass a directory written by "
        "save_pretrained (config.json + model.safetensors)"), line
    assert not (tmp_path / "run").exists()


def test_pretrained_config_field_not_supported(cli_in_process, reference_dir, tmp_path):
    shutil.copytree(reference_dir / "hf" / "llama_gqa", tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    code, line = cli_in_process(
        "--config", f"lm:hf={tmp_path / 'ckpt'},tokenizer={reference_dir / 'hf' / 'tok_bpe'}",
        "--workdir", str(tmp_path / "run"))
    assert code == 2 and line.endswith(
        "config.json field rope_scaling.rope_type='yarn' is not supported; allowed: 'default', "
        "'linear', 'llama3'"), line


def test_tokenizer_file_missing(cli_in_process, tmp_path):
    code, line = cli_in_process("--config", "lm:paper", "--workdir", str(tmp_path / "run"),
                                f"--config.data.tokenizer={tmp_path / 'tok.json'}")
    assert code == 2 and f"tokenizer spec='{tmp_path / 'tok.json'}'" in line, line
    assert "allowed: 'byte', a tokenizer.json or SentencePiece .model file" in line, line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Weights files (the converter of the official landmark checkpoints). The tokenizer is byte-level
# (train/data/tokenizer.py) and reads no file; a weights file is the file a user gives.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt():
    """A tiny official-GPT config and a state dict that fits it."""
    cfg = lmk.official_gpt_config(vocab_size=16, n_embd=8, n_head=2, n_layer=1, mem_freq=3,
                                  landmark_id=15)
    C, V, F = 8, 16, 32
    rng = np.random.default_rng(0)
    shapes = {"transformer.wte.weight": (V, C), "transformer.ln_f.weight": (C,),
              "transformer.h.0.ln_1.weight": (C,), "transformer.h.0.attn.c_attn.weight": (3 * C, C),
              "transformer.h.0.attn.c_proj.weight": (C, C), "transformer.h.0.ln_2.weight": (C,),
              "transformer.h.0.mlp.c_fc.weight": (F, C),
              "transformer.h.0.mlp.c_proj.weight": (C, F)}
    return cfg, {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def save_safetensors(path, sd):
    st = pytest.importorskip("safetensors.numpy")
    st.save_file(sd, str(path))
    return path


def test_safetensors_of_the_wrong_shape(gpt, tmp_path):
    cfg, sd = gpt
    lmk_convert.params_from_torch(save_safetensors(tmp_path / "ok.safetensors", sd), cfg)
    bad = dict(sd, **{"transformer.wte.weight": sd["transformer.wte.weight"][:10]})
    with pytest.raises(ValueError, match=r"state dict does not fit the config: "
                                         r"'transformer.wte.weight' has shape \(10, 8\), "
                                         r"expected \(16, 8\)"):
        lmk_convert.params_from_torch(save_safetensors(tmp_path / "m.safetensors", bad), cfg)


def test_safetensors_of_the_wrong_dtype(gpt, tmp_path):
    cfg, sd = gpt
    bad = dict(sd, **{"transformer.h.0.ln_1.weight": np.ones(8, np.int32)})
    with pytest.raises(ValueError, match=r"'transformer.h.0.ln_1.weight' has dtype int32, "
                                         r"expected a floating dtype"):
        lmk_convert.params_from_torch(save_safetensors(tmp_path / "m.safetensors", bad), cfg)


def test_weights_file_missing(gpt, tmp_path):
    with pytest.raises(ValueError, match=r"state dict path '.*model.safetensors' does not exist"):
        lmk_convert.params_from_torch(tmp_path / "model.safetensors", gpt[0])


def test_weights_file_truncated(gpt, tmp_path):
    path = save_safetensors(tmp_path / "model.safetensors", gpt[1])
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"state dict path '.*model.safetensors' is not a "
                                         r"readable .safetensors file"):
        lmk_convert.params_from_torch(path, gpt[0])


# ---------------------------------------------------------------------------------------------
# Runs: nothing lost
# ---------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_the_run_resumes(cli_in_process, trained, tmp_path):
    workdir = run_copy(trained, tmp_path)
    code, line = cli_in_process(
        "--config", "lm:tiny", "--workdir", str(workdir),
        *cli_args(num_steps=6, checkpoint_every=2, async_checkpoints=False,
                  **{"debug.nan_at_step": 3}))
    assert code == 1 and "loss is nan at step 3; stopping" in line
    assert "The last good checkpoint (step 2)" in line
    restores(workdir, 2)
    resumes(workdir, 4)


def test_checkpoint_write_fails_half_way(cli_in_process, trained, tmp_path, monkeypatch):
    """Disk full while step 4's checkpoint is written (the data item's file half written): one
    line naming the device, the folder and the checkpoint kept (exit 1); step 2 stays the latest,
    and a rerun resumes it."""
    import grain.python as grain
    workdir = run_copy(trained, tmp_path)

    def disk_full(self, directory, item=None, args=None):
        (directory / "process_0-of-1.json").write_text('{"half')
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(grain.PyGrainCheckpointHandler, "save", disk_full)
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(workdir),
                                *cli_args(num_steps=4))
    assert code == 1, line
    assert re.search(r"No space left on device: '.*checkpoints/4", line), line
    assert "the last complete checkpoint (step 2) is kept" in line
    monkeypatch.undo()
    restores(workdir, 2)
    resumes(workdir, 4)


def test_config_mismatch_on_resume(cli_in_process, trained, tmp_path):
    workdir = run_copy(trained, tmp_path)
    before = (workdir / "config.json").read_text()
    code, line = cli_in_process("--config", "lm:tiny", "--workdir", str(workdir),
                                *cli_args(num_steps=4, **{"model.num_heads": 8}))
    assert code == 2 and "model.num_heads: 4 -> 8" in line
    assert "--allow_config_change=model.num_heads" in line
    assert (workdir / "config.json").read_text() == before
    restores(workdir, 2)


def test_no_readable_checkpoint(trained, tmp_path):
    workdir = run_copy(trained, tmp_path)
    for f in (workdir / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[:f.stat().st_size // 3])
    with pytest.raises(ckpt_lib.NoReadableCheckpointError,
                       match=r"none of the checkpoints in .* \(steps \[2\]\) restores"):
        trainer.train(tiny_config(num_steps=4), workdir, devices=jax.devices()[:1])
    assert ckpt_lib.saved_steps(workdir) == [2]                 # nothing moved or deleted
    assert not (workdir / "unreadable_checkpoints").exists()


def test_init_from_a_folder_without_checkpoints(tmp_path):
    c = tiny_config()
    c.init_from = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"init_from='.*nothing' holds no checkpoint"):
        trainer.train(c, tmp_path / "run", devices=jax.devices()[:1])


# ---------------------------------------------------------------------------------------------
# The evaluation command lines
# ---------------------------------------------------------------------------------------------
def test_eval_cli_on_a_missing_folder(capsys, tmp_path):
    code, line = eval_cli_in_process(capsys, passkey.main, "--workdir", str(tmp_path / "none"))
    assert code == 2 and f"workdir='{tmp_path / 'none'}' holds no run: no config.json" in line


def test_eval_cli_on_a_run_without_checkpoints(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(tiny_config().to_json())
    code, line = eval_cli_in_process(capsys, passkey.main, "--workdir", str(tmp_path / "run"))
    assert code == 2 and f"workdir='{tmp_path / 'run'}' holds no readable checkpoint" in line


def test_figures_bad_size(capsys):
    code, line = eval_cli_in_process(capsys, figures.main, "--size", "huge")
    assert code == 2 and "argument --size: invalid choice: 'huge'" in line
    assert "'quick', 'cpu', 'paper'" in line or "quick, cpu, paper" in line


def test_figures_unknown_name(capsys):
    code, line = eval_cli_in_process(capsys, figures.main, "--only", "nope")
    assert code == 2 and "--only: unknown figure 'nope'; allowed: [" in line
    assert "'landmark_passkey'" in line


# ---------------------------------------------------------------------------------------------
# The README's table
# ---------------------------------------------------------------------------------------------
def case_names() -> list[str]:
    return sorted(n for n, f in globals().items() if n.startswith("test_") and callable(f)
                  and n != "test_readme_table_lists_every_case")


def test_readme_table_lists_every_case():
    text = (REPO / "README.md").read_text()
    section = text.split("## Reliability: bad input", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|.*`(test_\w+)`\s*\|\s*$", section, flags=re.M)
    stated = int(re.search(r"(\d+) bad inputs", section).group(1))
    assert sorted(rows) == case_names() and len(rows) == len(set(rows)) == stated >= 30
