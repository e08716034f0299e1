"""models/t5.py against Hugging Face transformers' T5ForConditionalGeneration / T5EncoderModel.

Reference folders `tests/data/hf/t5_relu` (ReLU FFN, tied head) and `tests/data/hf/t5_gated`
(gated-GELU FFN, untied head): config.json + model.safetensors from `save_pretrained`, and
reference.npz with input_ids [B, S], decoder_input_ids [B, T], HF's float32 logits [B, T, V],
encoder_hidden [B, S, D], greedy_tokens [B, N] (the N tokens after the start token) and, where
present, greedy_logits [B, N, V] (each greedy step's logits), attention_mask [B, S] and
decoder_attention_mask [B, T]."""
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from models import layers, t5

# Tolerance: both sides are float32 with different summation orders and transcendentals. HF's own
# float32 logits differ from its float64 logits by up to 9e-6 on logits of size 22 (untied head,
# N(0, 1) init), so the bound is 1e-5 absolute plus 1e-5 relative. In float64 the two agree to
# 3e-14 (HF patched to keep its norm variance and softmax in float64).
TOL = dict(rtol=1e-5, atol=1e-5)
KINDS = ("t5_relu", "t5_gated")


def _load(folder, *, encoder_only=False):
    """Tiny stand-in for the real loader: (cfg, params, names read, every tensor's name)."""
    cfg = t5.T5Config.from_hf(json.loads((folder / "config.json").read_text()),
                              encoder_only=encoder_only)
    state = load_file(folder / "model.safetensors")
    read = []

    def reader(name):
        array = state[name]                  # KeyError for a name the checkpoint lacks
        read.append(name)
        return array

    flat = {}
    for path, array in t5.convert_hf(cfg, reader, encoder_only=encoder_only):
        assert path not in flat, f"{path} yielded twice"
        flat[path] = jnp.asarray(array)
    return cfg, traverse_util.unflatten_dict(flat), read, set(state)


@pytest.fixture(scope="module", params=KINDS)
def case(request, reference_dir):
    folder = reference_dir / "hf" / request.param
    ref = dict(np.load(folder / "reference.npz"))
    cfg, params, read, names = _load(folder)
    return dict(folder=folder, ref=ref, cfg=cfg, model=t5.T5(cfg), params=params, read=read,
                names=names, mask=ref.get("attention_mask"),
                dec_mask=ref.get("decoder_attention_mask"))


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, ids, dec, mask, dec_mask):
    return model.apply({"params": params}, ids, dec, attention_mask_BxS=mask,
                       decoder_attention_mask_BxT=dec_mask)


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, params, ids, mask):
    return model.apply({"params": params}, ids, mask)


@functools.partial(jax.jit, static_argnums=0)
def _cached_logits(model, params, ids, dec, mask):
    """Teacher-forced decoding through `decode_step`: logits [B, T, V], one token per step."""
    v = {"params": params}
    encoded = model.apply(v, ids, mask, method=t5.T5.encode)
    cache = model.apply(v, encoded, dec.shape[1], attention_mask_BxS=mask,
                        method=t5.T5.init_cache)

    def body(cache, tok):
        logits, cache = model.apply(v, cache, tok, method=t5.T5.decode_step)
        return cache, logits

    _, out = jax.lax.scan(body, cache, dec.T)
    return jnp.moveaxis(out, 0, 1)


def _flat_shapes(tree):
    return {k: v.shape for k, v in traverse_util.flatten_dict(layers.unbox(tree)).items()}


def test_logits_match_hf(case):
    ref = case["ref"]
    logits = _logits(case["model"], case["params"], ref["input_ids"], ref["decoder_input_ids"],
                     case["mask"], case["dec_mask"])
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref["logits"], **TOL)


def test_encoder_only_matches_hf(case):
    """T5Encoder from the same checkpoint (encoder_only reads shared + encoder.* only) gives HF's
    encoder output, and its params are exactly T5's encoder part."""
    cfg, params, read, names = _load(case["folder"], encoder_only=True)
    assert sorted(names - set(read)) == sorted(
        n for n in names if n.startswith(t5.ENCODER_ONLY_UNUSED))
    full = traverse_util.flatten_dict(case["params"])
    assert all(np.array_equal(a, full[k]) for k, a in traverse_util.flatten_dict(params).items())
    hidden = _encode(t5.T5Encoder(cfg), params, case["ref"]["input_ids"], case["mask"])
    np.testing.assert_allclose(hidden, case["ref"]["encoder_hidden"], **TOL)


def test_greedy_kv_cache_matches_hf(case):
    ref = case["ref"]
    n = ref["greedy_tokens"].shape[1]
    tokens = t5.greedy_decode(case["model"], case["params"], ref["input_ids"], n,
                              attention_mask_BxS=case["mask"])
    assert tokens.dtype == jnp.int32 and tokens.shape == ref["greedy_tokens"].shape
    np.testing.assert_array_equal(tokens, ref["greedy_tokens"])


def test_cached_step_logits_match_hf(case):
    """Each greedy step's logits through the KV cache equal the logits HF took its argmax of
    (reference `greedy_logits`, where the fixture has them): the tokens alone repeat themselves
    in random tiny models."""
    ref = case["ref"]
    if "greedy_logits" not in ref:
        pytest.skip("reference.npz has no greedy_logits")
    B = ref["greedy_tokens"].shape[0]
    start = np.full((B, 1), case["cfg"].decoder_start_token_id, np.int32)
    fed = jnp.asarray(np.concatenate([start, ref["greedy_tokens"][:, :-1]], axis=1))
    logits = _cached_logits(case["model"], case["params"], ref["input_ids"], fed, case["mask"])
    np.testing.assert_allclose(logits, ref["greedy_logits"], **TOL)


def test_cached_decoding_equals_full_decoding(case):
    """Every step's logits through the KV cache equal the full decoder's row at that position
    (float32, up to summation order: 6e-6 on logits of size 20): the cached relative bias row t
    is the full-sequence bias row t."""
    ref = case["ref"]
    full = _logits(case["model"], case["params"], ref["input_ids"], ref["decoder_input_ids"],
                   case["mask"], None)
    cached = _cached_logits(case["model"], case["params"], ref["input_ids"],
                            jnp.asarray(ref["decoder_input_ids"]), case["mask"])
    np.testing.assert_allclose(cached, full, **TOL)


def test_padding_is_invisible(case):
    """Masked positions appended to the encoder input leave the decoder's logits as they were
    (the real tokens' relative positions are unchanged; masked keys get exactly zero weight)."""
    ref = case["ref"]
    ids = ref["input_ids"]
    B, S = ids.shape
    mask = np.ones((B, S), np.int32) if case["mask"] is None else case["mask"]
    ids_pad = np.concatenate([ids, np.full((B, 3), 7, ids.dtype)], axis=1)
    mask_pad = np.concatenate([mask, np.zeros((B, 3), np.int32)], axis=1)
    dec = ref["decoder_input_ids"]
    base = _logits(case["model"], case["params"], ids, dec, mask, None)
    padded = _logits(case["model"], case["params"], ids_pad, dec, mask_pad, None)
    np.testing.assert_allclose(padded, base, **TOL)   # summation over S+3 keys


def test_params_cover_every_path(case):
    """convert_hf yields exactly T5(cfg)'s parameter paths and shapes and reads every tensor of
    the checkpoint once."""
    ref, model = case["ref"], case["model"]
    expected = jax.eval_shape(lambda: model.init(
        jax.random.key(0), ref["input_ids"], ref["decoder_input_ids"]))["params"]
    assert _flat_shapes(case["params"]) == _flat_shapes(expected)
    assert sorted(case["read"]) == sorted(case["names"])
    encoder_cfg = t5.T5Config.from_hf(json.loads((case["folder"] / "config.json").read_text()),
                                      encoder_only=True)
    enc_expected = jax.eval_shape(lambda: t5.T5Encoder(encoder_cfg).init(
        jax.random.key(0), ref["input_ids"]))["params"]
    assert set(_flat_shapes(enc_expected)) == {
        k for k in _flat_shapes(expected) if k[0] in ("shared", "encoder")}


def test_convert_reads_tied_copies_when_present(case):
    """Hub files may carry encoder/decoder.embed_tokens.weight (and old ones an unused
    cross-attention bias): each is read once when present, and a copy that differs is refused."""
    state = load_file(case["folder"] / "model.safetensors")
    shared = state["shared.weight"]
    state.update({"encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared,
                  "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
                      np.zeros_like(state["decoder.block.0.layer.0.SelfAttention."
                                          "relative_attention_bias.weight"])})
    read = []
    paths = [p for p, _ in t5.convert_hf(case["cfg"], lambda n: (state[n], read.append(n))[0])]
    assert sorted(read) == sorted(state) and len(paths) == len(set(paths))
    state["decoder.embed_tokens.weight"] = shared + 1
    with pytest.raises(ValueError, match="decoder.embed_tokens.weight differs"):
        list(t5.convert_hf(case["cfg"], state.__getitem__))


def _hf_config(**kw):
    hf = {"model_type": "t5", "vocab_size": 64, "d_model": 16, "d_kv": 4, "d_ff": 32,
          "num_heads": 2, "num_layers": 1, "relative_attention_num_buckets": 8,
          "relative_attention_max_distance": 16, "feed_forward_proj": "relu",
          "is_encoder_decoder": True, "dropout_rate": 0.1, "decoder_start_token_id": 0}
    return {**hf, **kw}


@pytest.mark.parametrize("field,value", [
    ("feed_forward_proj", "gated-silu"), ("feed_forward_proj", "gelu"),
    ("model_type", "umt5"), ("is_encoder_decoder", False)])
def test_from_hf_refuses_what_it_does_not_implement(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        t5.T5Config.from_hf(_hf_config(**{field: value}))


def test_from_hf_reads_the_fields():
    cfg = t5.T5Config.from_hf(_hf_config(feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                         tie_word_embeddings=False), encoder_only=True)
    assert (cfg.feed_forward, cfg.num_decoder_layers, cfg.tie_word_embeddings, cfg.inner) == (
        "gated-gelu", 1, False, 8)
    with pytest.raises(ValueError, match="d_kv=0"):
        t5.T5Config(vocab_size=64, d_kv=0)


def test_convert_refuses_a_wrong_shape():
    cfg = t5.T5Config.from_hf(_hf_config())
    with pytest.raises(ValueError, match=r"shared.weight has shape \(3, 16\)"):
        list(t5.convert_hf(cfg, lambda name: np.zeros((3, 16), np.float32)))


def test_config_is_validated():
    with pytest.raises(ValueError, match="feed_forward='swiglu'"):
        t5.T5Config(vocab_size=64, feed_forward="swiglu")
    chex.assert_equal(t5.T5Config(vocab_size=64, dtype="bfloat16").dtype, jnp.bfloat16)
