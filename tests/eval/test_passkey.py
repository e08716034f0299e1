"""Passkey prompts and data, the landmark objective and builder, the passkey scorer, the CLI config.

eval/passkey.py, eval/landmark_perplexity.py, train/data/passkey_data.py, train/configs/landmark.py
the landmark model builder (models/landmark.py: build_from_config) and objective
(train/objectives/landmark.py).
"""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import figures, landmark_perplexity, passkey
from models import landmark as lmk
from models import layers, transformer
from train.configs import landmark as landmark_configs
from train.data import passkey_data, pipeline
from train.data import tokenizer as tok
from train.objectives import landmark as landmark_objective

from background import beside

REPO = pathlib.Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Prompts and the training mixture
# ---------------------------------------------------------------------------------------------
def test_prompt_is_the_papers_at_the_requested_length_and_depth():
    fixed = passkey_data.fixed_length(5)
    for length in (fixed, fixed + 1, 300, 1000):
        for depth in (0.0, 0.37, 1.0):
            prompt, answer = passkey_data.make_prompt(length, 12345, depth)
            assert len(prompt) == length and answer == " 12345"
            pre, key, post, question = prompt.split("\n")
            assert key == "The pass key is 12345. Remember it. 12345 is the pass key."
            assert question == "What is the pass key? The pass key is"
            n = length - fixed
            assert len(pre) == round(depth * n) and len(pre) + len(post) == n
            # Filler is the paper's sentences, repeated with spaces, cut by characters.
            garbage = " ".join([passkey_data.FILLER] * (n // 90 + 2))
            assert garbage.startswith(pre) and garbage.startswith(post)
    prompt, _ = passkey_data.make_prompt(400, 10000, 0.5, intro=True)
    assert prompt.startswith(passkey_data.TASK_LINE + "\n") and len(prompt) == 400
    with pytest.raises(ValueError, match="length=10 is below"):
        passkey_data.make_prompt(10, 12345, 0.5)
    with pytest.raises(ValueError, match="num_digits=5"):
        passkey_data.make_prompt(200, 123, 0.5)


def test_trials_and_answer_scoring():
    tokens = passkey.make_trials(200, 6, seed=3)
    assert tokens.shape == (6, 206) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, passkey.make_trials(200, 6, seed=3))
    assert not np.array_equal(tokens, passkey.make_trials(200, 6, seed=4))
    texts = tok.decode_batch(tokens)
    assert all(t[:200].endswith("The pass key is") for t in texts)
    keys = [t[201:] for t in texts]
    assert all(k.isdigit() and k in t[:200] for k, t in zip(keys, texts))
    assert len(set(keys)) > 1
    # Logits that put the maximum on the next token are right; one wrong digit makes a trial wrong.
    logits = np.zeros((6, 206, tok.VOCAB_SIZE), np.float32)
    logits[np.arange(6)[:, None], np.arange(205)[None], tokens[:, 1:]] = 1.0
    assert passkey.answer_correct(logits, tokens, 200).all()
    logits[2, 203] = 0
    logits[2, 203, (tokens[2, 204] + 1) % 256] = 1.0
    np.testing.assert_array_equal(passkey.answer_correct(logits, tokens, 200),
                                  [True, True, False, True, True, True])


def test_passkey_mixture_rows():
    c = pipeline.default_data_config("passkey")
    c.answer_weight = 3.0
    c.passkey_fraction = 0.5
    src, kind = pipeline.make_source(c, split="train", seq_len=160)
    assert kind == "examples" and len(src) == c.num_train
    n_key = 0
    for i in range(40):
        row = src[i]
        assert {k: v.shape for k, v in row.items()} == {k: (160,) for k in
                                                       ("inputs", "targets", "weights")}
        np.testing.assert_array_equal(row["inputs"][1:], row["targets"][:-1])
        text = tok.decode(row["inputs"])
        if passkey_data.QUESTION in text:
            n_key += 1
            window = np.concatenate([row["inputs"], row["targets"][-1:]])
            q = tok.decode(window).index(passkey_data.QUESTION) + len(passkey_data.QUESTION)
            key = tok.decode(window[q + 1:q + 6])
            assert key.isdigit() and f"The pass key is {key}." in text
            # The answer digits (targets q+1..q+5) carry answer_weight, everything else 1.
            np.testing.assert_array_equal(np.flatnonzero(row["weights"] == 3.0),
                                          np.arange(q, q + 5))
            assert q + 6 == window.size or window[q + 6] == tok.EOS
        else:
            assert (row["weights"] == 1).all()
    assert 10 <= n_key <= 30
    for k, v in src[7].items():
        np.testing.assert_array_equal(v, src[7][k])      # deterministic per index
    with pytest.raises(ValueError, match="seq_len=50 cannot hold a passkey prompt"):
        pipeline.make_source(c, split="train", seq_len=50)


# ---------------------------------------------------------------------------------------------
# The trainer hooks
# ---------------------------------------------------------------------------------------------
MODEL_CFG = dict(family="landmark", vocab_size=tok.VOCAB_SIZE, width=16, num_layers=2,
                 num_heads=2, norm="layernorm", mem_freq=5, landmark_id=tok.LANDMARK)


def test_landmark_loss_matches_make_landmark_batch():
    model = lmk.build_from_config(MODEL_CFG)
    assert isinstance(model, lmk.LandmarkLM) and model.config.model.attention == "landmark"
    raw = jax.random.randint(jax.random.key(0), (2, 24), 0, 256)
    weights = jnp.ones((2, 23)).at[1, 20:].set(0.0)
    batch = {"inputs": raw[:, :-1], "targets": raw[:, 1:], "weights": weights}
    params = model.init(jax.random.key(1), batch["inputs"])["params"]
    loss_sum, aux = jax.jit(lambda p, b: landmark_objective.loss(model.apply, p, b,
                                                                 jax.random.key(2)))(params, batch)
    ref = lmk.make_landmark_batch(raw, 5, tok.LANDMARK)
    logits = jax.jit(model.apply)({"params": params}, ref["inputs"],
                                  is_landmark=ref["is_landmark"])
    t = ref["targets"]
    w = lmk.insert_landmarks(weights, 5, 0.0)
    assert int((w == 0).sum()) == 4 + 4 + 3 and bool(jnp.all(w[t < 0] == 0))  # landmarks: 0
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(t, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss_sum), float(jnp.sum(nll * w)), rtol=1e-5)
    assert float(aux["weight"]) == float(weights.sum())
    with pytest.raises(ValueError, match="model.family='landmark'"):
        plain = transformer.Transformer(transformer.TransformerConfig(vocab_size=320))
        landmark_objective.loss(plain.apply, params, batch, jax.random.key(0))
    with pytest.raises(ValueError, match="missing \\['mem_freq'\\]"):
        lmk.build_from_config({k: v for k, v in MODEL_CFG.items() if k != "mem_freq"})


@pytest.fixture(scope="module")
def tiny_landmark():
    model = lmk.build_from_config(MODEL_CFG)
    params = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 12), jnp.int32))["params"]
    return model, layers.unbox(params)


def test_teacher_forced_scoring_equals_greedy_decoding_with_memory(tiny_landmark):
    """The scorer's claim: teacher forcing the answer through memory inference gives the greedy
    decode's verdict (chunks are causal). Checked against an explicit greedy loop."""
    model, params = tiny_landmark
    prompt = passkey.make_trials(120, 2, seed=0)[:, :120]
    score = lambda x: passkey.memory_inference_logits(model, params, x, top_k=2,   # noqa: E731
                                                      chunk_len=32)
    seq = prompt
    for _ in range(4):                     # greedy: re-score everything, append the argmax
        nxt = score(seq)[:, -1].argmax(-1).astype(np.int32)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    assert passkey.answer_correct(score(seq), seq, 120).all()
    wrong = seq.copy()
    wrong[0, -2] = (wrong[0, -2] + 1) % 256
    np.testing.assert_array_equal(passkey.answer_correct(score(wrong), wrong, 120), [False, True])
    accs = passkey.evaluate_run(model, params, (120,), 2, 0, top_k=2, chunk_len=32)
    assert set(accs) == {"landmark_memory", "landmark_full"}
    assert all(set(a) == {120} and all(0 <= v <= 1 for v in a.values())
               for a in accs.values())


def test_prose_windows_and_perplexity():
    w = landmark_perplexity.prose_windows(64, 3)
    assert w.shape == (3, 65)
    np.testing.assert_array_equal(w[1, :5], np.concatenate(passkey_data.corpus_tokens(
        "validation", 10))[65:70])
    uniform = lambda x: np.zeros(x.shape + (tok.VOCAB_SIZE,))   # noqa: E731
    assert landmark_perplexity.window_perplexity(uniform, w) == pytest.approx(tok.VOCAB_SIZE)
    with pytest.raises(ValueError, match="windows of length"):
        landmark_perplexity.prose_windows(100_000, 10)
    names = figures.load_all()
    assert {"landmark_passkey", "landmark_perplexity"} <= set(names)


def test_figure_length_curriculum_resumes_one_run(tmp_path, monkeypatch):
    # cpu: full-window prompts first, then prompts of varied length, in one resumed run
    first, last = (landmark_configs.passkey_config("cpu", 0, phase=i) for i in (0, 1))
    assert (first.num_steps, first.data.min_length) == (3000, 251)
    assert (last.num_steps, last.data.min_length) == (5500, 128)
    monkeypatch.setitem(landmark_configs.PASSKEY_SIZES, "test", dict(
        phases=((2, None), (3, 100)), batch_size=2, seq_len=112, width=16, num_layers=1,
        lengths=(112,), trials=1))
    c, params, model, workdir = passkey.train_or_reuse("test", 0, tmp_path)
    assert (c.num_steps, c.data.min_length) == (3, 100)
    steps = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    starts = [r["resumed_from"] for r in steps if r.get("event") == "start"]
    assert starts == [0, 2]                     # phase 2 resumed phase 1's final checkpoint


# ---------------------------------------------------------------------------------------------
# The config and the CLIs
# ---------------------------------------------------------------------------------------------
def test_configs_validate():
    from train import trainer
    for variant in landmark_configs.VARIANTS:
        c = landmark_configs.get_config(variant)
        trainer.validate_config(c)
        pipeline.resolve_data_config(c.data)
    p = landmark_configs.get_config("paper")
    assert (p.model.num_layers, p.model.num_heads, p.model.width, p.seq_len) == (12, 8, 1024, 512)
    assert (p.model.mem_freq, p.batch_size, p.optim.lr, p.optim.weight_decay) == (50, 128, 2e-3,
                                                                                  1e-3)
    assert (p.optim.b1, p.optim.b2) == (0.9, 0.95) and p.data.name == "tfds"
    assert p.optim.warmup_steps == p.num_steps // 50          # 2% warm-up
    with pytest.raises(ValueError, match="variant 'huge'"):
        landmark_configs.get_config("huge")


def _tiny_cli_run(tmp, env):
    """Two steps of the tiny landmark config through `python -m train.main`, on one device."""
    workdir = tmp / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "train.main", "--config", "train/configs/landmark.py:tiny",
         "--workdir", str(workdir), "--config.num_steps=2", "--config.progress=False"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**env, "XLA_FLAGS": env["MNEMAX_TEST_XLA_FLAGS"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


@beside(_tiny_cli_run)      # the training run goes beside the in-process tests
def test_tiny_cli_trains_two_steps_and_passkey_cli_reads_it(beside, capsys):
    workdir, stdout = beside
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and np.isfinite(summary["final_loss"])
    assert passkey.main(["--workdir", str(workdir), "--lengths", "120", "--trials", "2",
                         "--chunk_len", "64"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["train_context"] == 256
    assert set(out["accuracy"]) == {"landmark_memory", "landmark_full"}
    assert set(out["accuracy"]["landmark_memory"]) == {"120"}
