"""Landmark attention's own training (issue 18): the official lm_benchmark layout
(train/data/token_stream.py, train/objectives/landmark.py with stream_phase), group dropout
(models/landmark.py: group_keep), the Transformer-XL baseline (train/objectives/transformer_xl.py)
and the configs that use them (train/configs/landmark.py: paper, tiny_official, tiny_xl,
paper_xl), with Table 1's XL rows (eval/landmark_perplexity.py).

The official semantics restated here for comparison (epfml/landmark-attention): data/utils.py
add_mem_tokens (a landmark after stream index t with t % F == F - 1) and optim/utils.py get_batch
(targets skip a landmark; -1 where the input is a landmark or EOS).
"""
import pathlib
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import landmark_perplexity
from models import landmark
from train import optim, trainer
from train.configs import landmark as landmark_configs
from train.data import pipeline, token_stream
from train.data import tokenizer as tok
from train.objectives import landmark as landmark_objective
from train.objectives import transformer_xl

LM, EOS, F = 63, 62, 5        # landmark id, EOS id, mem_freq of the small checks
EOS_BYTE = tok.special("EOS")


def _official_window(stream, o, T):
    """(x, y) of the official get_batch for the window holding raw tokens o .. o+T-1 of `stream`
    (landmarks inserted after every F-th stream token; the window from raw o's slot to raw
    o+T-1's)."""
    aug, slot = [], {}
    for t, tok_id in enumerate(stream):
        slot[t] = len(aug)
        aug.append(tok_id)
        if t % F == F - 1:
            aug.append(LM)
    aug = np.asarray(aug)
    a0, a1 = slot[o], slot[o + T - 1]
    x = aug[a0:a1 + 1]
    y = aug[a0 + 1:a1 + 3]
    y = np.where(y[:-1] == LM, y[1:], y[:-1])
    return x, np.where((x == LM) | (x == EOS), -1, y)


def test_stream_windows_are_the_official_windows(tmp_path):
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 60, 300).astype(np.int32)
    stream[[40, 41, 97, 150]] = EOS
    src = token_stream.StreamWindows(stream, seq_len=23, split="train", eos_id=EOS,
                                     mask_after_eos=True, mem_freq=F)
    assert len(src) == 299 // 23 and repr(src).startswith("StreamWindows(tokens=300")
    batch = {k: jnp.asarray(np.stack([src[i][k] for i in range(6)]))
             for k in ("inputs", "targets", "weights", "stream_phase")}
    offsets = [src.offset(i) for i in range(6)]
    assert len(set(o % F for o in offsets)) > 1            # rows start at different phases
    inputs, targets, weights, seg, shift = landmark_objective._stream_layout(batch, F)
    aug = np.asarray(landmark.insert_landmarks(inputs, F, LM))
    aug_t = np.asarray(landmark.landmark_targets(targets, F, ignore_index=-1))
    aug_w = np.asarray(landmark.insert_landmarks(weights, F, 0))
    aug_seg = np.asarray(landmark_objective._augment_like(seg, F))
    for b, o in enumerate(offsets):
        x, y = _official_window(stream, o, 23)
        real = np.flatnonzero(aug_seg[b])[:len(x)]
        np.testing.assert_array_equal(aug[b, real], x)
        np.testing.assert_array_equal(np.where(aug_w[b, real] > 0, aug_t[b, real], -1), y)
        assert real[0] == int(shift[b, 0]) and np.all(np.diff(real) == 1)
    # the split's stream (EOS after each document), written once and reopened by workers
    records = [{"text": b"ab"}, {"text": "c\u00e9".encode()}] * 20
    byte_tok = tok.load_tokenizer("byte")
    built = token_stream.token_stream(records, byte_tok, cache_dir=str(tmp_path), key="k")
    again = token_stream.token_stream(records, byte_tok, cache_dir=str(tmp_path), key="k")
    assert isinstance(again, np.memmap) and built.dtype == np.uint16
    np.testing.assert_array_equal(again[:7], [97, 98, EOS_BYTE, 99, 0xC3, 0xA9, EOS_BYTE])
    src = token_stream.StreamWindows(again, seq_len=8, split="train", eos_id=EOS_BYTE,
                                     mask_after_eos=False)
    data = pickle.dumps(src)
    assert len(data) < 2000
    np.testing.assert_array_equal(pickle.loads(data)[3]["inputs"], src[3]["inputs"])
    with pytest.raises(ValueError, match="needs a stream longer than seq_len"):
        token_stream.StreamWindows(stream[:20], seq_len=23, split="train", eos_id=EOS,
                                   mask_after_eos=True)


def test_objective_in_the_stream_layout_is_the_official_loss():
    """The objective on stream rows (padded, periodic fast path) gives the loss of the official
    windows under the dense grouped softmax at positions 0.. (tolerance: float32 sums); in
    training (a step given) group dropout changes it."""
    body = dict(vocab_size=64, width=16, num_layers=1, num_heads=2, mem_freq=F, landmark_id=LM,
                group_dropout=0.5)
    model = landmark.build_from_config(body)
    dense = landmark.build_from_config({**body, "attention": "landmark_dense"})
    rng = np.random.default_rng(1)
    stream = rng.integers(0, 60, 200).astype(np.int32)
    stream[[30, 77]] = EOS
    src = token_stream.StreamWindows(stream, seq_len=16, split="validation", eos_id=EOS,
                                     mask_after_eos=True, mem_freq=F)
    rows = [src[i] for i in range(3)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    params = jax.jit(model.init)(jax.random.key(0), batch["inputs"])["params"]

    @jax.jit
    def objective(params, batch):
        evaluation = landmark_objective.loss(model.apply, params, batch, jax.random.key(1))
        training = landmark_objective.loss(model.apply, params, batch, jax.random.key(1),
                                           step=jnp.int32(0))
        return evaluation, training[0]

    (got, aux), dropped = objective(params, batch)
    # The official windows, padded at the end to one length (causal: the pads change nothing
    # before them; their targets are -1).
    windows = [_official_window(stream, src.offset(i), 16) for i in range(3)]
    L = max(len(x) for x, _ in windows)
    xs = np.stack([np.pad(x, (0, L - len(x))) for x, _ in windows])
    ys = np.stack([np.pad(y, (0, L - len(y)), constant_values=-1) for _, y in windows])

    @jax.jit
    def official_loss(params, x, y):
        logits = dense.apply({"params": params}, x)
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, jnp.maximum(y, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(y >= 0, ce, 0.0))

    assert float(aux["weight"]) == (ys >= 0).sum()
    np.testing.assert_allclose(float(got), float(official_loss(params, xs, ys)), rtol=1e-5)
    assert np.isfinite(float(dropped)) and abs(float(dropped) - float(got)) > 1e-3


def test_group_dropout_is_the_official_block_dropout():
    key = jax.random.key(0)
    B, T, H, D = 1, 24, 2, 8
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (B, T, H, D)) for i in range(3))
    periodic = jnp.broadcast_to(landmark.landmark_mask(T, F), (B, T))
    dk = jax.random.key(7)

    @jax.jit
    def run(q, k, v, is_lm):
        dense = landmark.landmark_attention_dense(q, k, v, is_lm, group_dropout=0.5,
                                                  dropout_key=dk)
        tiled = landmark.landmark_attention(q, k, v, is_lm, q_block=12, mem_freq=F,
                                            group_dropout=0.5, dropout_key=dk)
        w = landmark.landmark_attention_weights(q, k, is_lm, group_dropout=0.5, dropout_key=dk)
        w_eval = landmark.landmark_attention_weights(q, k, is_lm, group_dropout=0.5)
        return dense, tiled, w, w_eval, landmark.landmark_attention_weights(q, k, is_lm)

    for is_lm in (periodic, jnp.roll(periodic, 2, axis=1)):  # both paths
        dense, tiled, w, w_eval, w0 = (np.asarray(a) for a in run(q, k, v, is_lm))
        np.testing.assert_allclose(tiled, dense, atol=1e-5)   # same draws whatever the tiling
        np.testing.assert_array_equal(w_eval, w0)             # no key (evaluation): no dropout
    ratio = w[w0 > 0] / w0[w0 > 0]                            # the general path's layout
    np.testing.assert_allclose(np.unique(np.round(ratio, 4)), [0.0, 1.0, 2.0])
    w, w0 = (np.asarray(a) for a in run(q, k, v, periodic)[2::2])
    assert w.shape == (B, H, T, T)
    np.testing.assert_array_equal(w[..., 20, 18:21], w0[..., 20, 18:21])  # own block: kept
    blk = w[..., 20, :18].reshape(B, H, 3, 6)                  # a block drops whole
    assert np.all((blk == 0).all(-1) | (blk[..., :5] > 0).all(-1))
    assert (blk == 0).all(-1).any() and (blk > 0).any()
    with pytest.raises(ValueError, match=r"group_dropout=1.0 must be a number in \[0, 1\)"):
        landmark.config_from_dict(dict(vocab_size=64, width=16, num_layers=1, num_heads=2,
                                       mem_freq=F, landmark_id=LM, group_dropout=1.0))


def test_paper_variants_validate():
    for variant in ("paper", "paper_xl"):
        c = landmark_configs.get_config(variant)
        trainer.validate_config(c)
        assert (c.data.tfds_name, c.data.windows, c.data.mask_after_eos) == ("pg19", "random",
                                                                            True)
        assert c.optim.no_decay == optim.NO_DECAY and c.optim.clip_norm is None
    paper = landmark_configs.get_config("paper")
    assert paper.data.stream_mem_freq == paper.model.mem_freq == 50
    xl = landmark_configs.get_config("paper_xl")
    assert (xl.objective, xl.seq_len, dict(xl.objective_config)) == (
        "transformer_xl", 2048, {"piece_len": 256, "cache_len": 256})
    assert "mem_freq" not in xl.model and xl.data.stream_mem_freq == 0
    # weight decay: the official groups (no decay on the tied embedding and the norms); the
    # parameter names of tiny_official's model are paper's
    tiny = landmark_configs.get_config("tiny_official")
    assert tiny.optim.no_decay == optim.NO_DECAY
    shapes = nn.unbox(jax.eval_shape(lambda: trainer.build_model(tiny.model).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"])
    decays = {optim.param_path(p): d for p, d in
              jax.tree_util.tree_leaves_with_path(optim.decay_mask(optim.NO_DECAY, shapes))}
    assert not decays["embed/embedding"] and not decays["block_0/ln_1/scale"]
    assert decays["block_0/attn/query"] and decays["block_0/mlp/fc_in/kernel"]
    # GPT-2-style BPE (the fixture tok_bpe: 500 ids, <|endoftext|> = EOS): LANDMARK appended,
    # the vocabulary rounded up to 64 as the official 50304
    bpe = str(pathlib.Path(__file__).resolve().parents[1] / "data" / "hf" / "tok_bpe")
    for variant, landmark_id in (("paper", 500), ("paper_xl", None)):
        c = landmark_configs.get_config(f"{variant},tokenizer={bpe}")
        trainer.validate_config(c)
        assert (c.model.vocab_size, c.model.get("landmark_id")) == (512, landmark_id)
        assert c.data.tokenizer == bpe + ("+LANDMARK" if landmark_id else "")
    with pytest.raises(ValueError, match="use 'paper,tokenizer=TOKENIZER\\[,text_dir=DIR\\]'"):
        landmark_configs.get_config("paper,vocab=gpt2")
    paper.model.mem_freq = 40                 # the stream's landmarks follow the model's blocks
    assert paper.data.stream_mem_freq == 40
    paper.data.windows = "packed"
    with pytest.raises(ValueError, match="data.stream_mem_freq=40 needs data.windows='random'"):
        trainer.validate_config(paper)


def test_tiny_official_rows_come_from_the_pipeline():
    """tiny_official's data config through the real pipeline: stream rows with their phase."""
    c = landmark_configs.get_config("tiny_official")
    trainer.validate_config(c)
    batch = next(pipeline.make_dataset(c.data, split="train", seed=0, global_batch_size=2,
                                       seq_len=c.seq_len, process_index=0, process_count=1))
    phase = batch["stream_phase"]
    assert phase.shape == (2, c.seq_len) and c.data.stream_mem_freq == c.model.mem_freq == 31
    np.testing.assert_array_equal(np.diff(phase, axis=1) % 31, 1)
    eos = batch["inputs"] == tok.special("EOS")
    assert np.all(batch["weights"][eos] == 0) and np.all(batch["weights"][~eos] == 1)


def test_tiny_xl_trains_and_has_its_table1_rows(tmp_path):
    c = landmark_configs.get_config("tiny_xl")
    c.num_steps, c.batch_size, c.seq_len = 1, 2, 100
    c.model.width, c.model.num_layers = 16, 1
    c.objective_config.piece_len = c.objective_config.cache_len = 50
    c.eval_every = c.checkpoint_every = 0         # one checkpoint, at the end
    c.progress, c.mesh.data = False, 1
    summary = trainer.train(c, tmp_path, devices=jax.devices()[:1])
    assert summary["step"] == 1 and np.isfinite(summary["final_loss"])
    config, params, model = trainer.restore_for_eval(tmp_path)
    assert config.objective == "transformer_xl" and config.data.windows == "random"
    ppl = landmark_perplexity.table1(model, params, config, grid="tiny", windows=1)
    assert set(ppl) == {"full", "xl_cache50_chunk50"}
    assert all(np.isfinite(v[200]) and v[200] > 1 for v in ppl.values())
    # XL on the trained 1-layer model: with a cache of 5 tokens, piece 3 (tokens 20..29) sees
    # exactly tokens 15..19 before it, at their positions.
    x = jnp.asarray(landmark_perplexity.held_out_windows(config, 30, 1))[:, :30]

    @jax.jit
    def run(p, x):
        return (transformer_xl.xl_logits(model.apply, p, x, piece_len=10, cache_len=5)[:, 20:],
                model.apply({"params": p}, x[:, 15:], positions=jnp.arange(15, 30))[:, 5:])

    xl_5, window = run(params, x)
    np.testing.assert_allclose(xl_5, window, atol=1e-4)
    batch = {"inputs": x, "targets": x, "weights": jnp.ones(x.shape)}
    with pytest.raises(ValueError, match="piece_len=7 must be a positive integer that divides"):
        transformer_xl.loss(model.apply, params, batch, None, piece_len=7, cache_len=5)
