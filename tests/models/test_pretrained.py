"""models.pretrained: Hugging Face GPT-2 and LLaMA checkpoints against transformers' own outputs.

The fixtures in tests/data/hf/ (tools/make_hf_fixtures.py; README there) are tiny random models
saved with `save_pretrained`, with transformers' logits and greedy tokens. MNEMAX_REFERENCE
points the tests at a regenerated set (another seed: checkpoints these tests never saw).
"""
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from models import pretrained, t5
from models.transformer import greedy_generate
from train import sharding as shd
from train import trainer
from train.configs import lm as lm_config

DECODERS = ("gpt2", "gpt2_bare", "llama_gqa", "llama_tied")


@pytest.fixture(scope="module")
def loaded(reference_dir):
    """name → (folder, reference arrays, model, params)."""
    out = {}
    for name in DECODERS:
        folder = reference_dir / "hf" / name
        model, params = pretrained.from_hf(str(folder))
        out[name] = (folder, dict(np.load(folder / "reference.npz")), model, params)
    return out


@pytest.mark.parametrize("name", DECODERS)
def test_logits_match_transformers(loaded, name):
    _, ref, model, params = loaded[name]
    logits = model.apply({"params": params}, ref["input_ids"])
    assert logits.shape == ref["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_kv_cache_greedy_decoding_matches_transformers(loaded, name):
    _, ref, model, params = loaded[name]
    steps = ref["greedy_tokens"].shape[1]
    decode = jax.jit(functools.partial(greedy_generate, with_logits=True), static_argnums=(0, 3))
    tokens, logits = decode(model, params, ref["greedy_prompt"], steps)
    np.testing.assert_array_equal(np.asarray(tokens), ref["greedy_tokens"])
    # random tiny models repeat themselves: the logits check every cached step numerically
    np.testing.assert_allclose(np.asarray(logits), ref["greedy_logits"], atol=1e-4, rtol=1e-4)


def test_both_gpt2_layouts_and_sharded_files_are_what_the_fixtures_hold(loaded):
    names = lambda n: pretrained.SafetensorsReader(str(loaded[n][0])).names  # noqa: E731
    assert "transformer.h.0.attn.c_attn.weight" in names("gpt2")
    assert "h.0.attn.c_attn.weight" in names("gpt2_bare")
    assert len(list(loaded["llama_tied"][0].glob("model-*-of-*.safetensors"))) >= 2
    cfg = loaded["llama_gqa"][2].cfg
    assert cfg.kv_heads < cfg.num_heads and cfg.rope_scaling.kind == "llama3"


def test_sharded_load_equals_unsharded(loaded):
    folder, ref, unsharded_model, params = loaded["llama_gqa"]
    m = 2 if unsharded_model.cfg.kv_heads % 2 == 0 else 1
    shape = (2, 4 // m, m)
    mesh = jax.make_mesh(shape, ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    model, sharded = pretrained.from_hf(str(folder), mesh=mesh, rules=shd.DEFAULT_RULES)
    q = sharded["block_0"]["attn"]["query"]
    assert len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (q.shape[0] // shape[1], q.shape[1] // m,
                                                  q.shape[2])
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(sharded),
                           jax.device_get(params))
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(sharded, ref["input_ids"])
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-5, rtol=0)


def test_bfloat16_params(loaded):
    folder, ref, _, params = loaded["gpt2"]
    model, p16 = pretrained.from_hf(str(folder), dtype="bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    assert model.cfg.dtype == jnp.bfloat16
    logits = model.apply({"params": p16}, ref["input_ids"])
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=0.05)


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("name, changes, match", [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True},
     r"scale_attn_by_inverse_layer_idx=True is not supported"),
    ("gpt2", {"activation_function": "relu"}, r"activation_function='relu' is not supported"),
    ("llama_gqa", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     r"rope_scaling.rope_type='yarn' is not supported"),
    ("llama_gqa", {"attention_bias": True}, r"attention_bias=True is not supported"),
    ("llama_gqa", {"model_type": "mamba"}, r"model_type='mamba' is not supported"),
    ("llama_gqa", {"num_hidden_layers": 1}, r"'model.layers.1.input_layernorm.weight' is not "
                                            r"used by the model"),
])
def test_unsupported_config_is_refused(loaded, tmp_path, name, changes, match):
    path = _edited(loaded[name][0], tmp_path / "ckpt", **changes)
    with pytest.raises(ValueError, match=match):
        pretrained.from_hf(path)


def test_a_mesh_that_cannot_split_a_parameter_is_refused(loaded):
    mesh = jax.make_mesh((1, 1, 8), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    with pytest.raises(ValueError, match=r"parameter block_0/attn/query has shape .* not "
                                         r"divisible by the mesh axes"):
        pretrained.from_hf(str(loaded["llama_gqa"][0]), mesh=mesh, rules=shd.DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"needs rules"):
        pretrained.from_hf(str(loaded["llama_gqa"][0]), mesh=mesh)


def test_missing_directory_and_offline_hub_id_name_the_local_form(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in (str(tmp_path / "nothing" / "here"), "someone/some-model"):
        with pytest.raises(ValueError, match=r"pass a directory written by save_pretrained"):
            pretrained.from_hf(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config.json"):
        pretrained.from_hf(str(tmp_path / "empty"))


def test_resize_params_vocab_appends_the_mean_row(loaded):
    _, _, model, params = loaded["llama_gqa"]
    V = model.cfg.vocab_size
    grown = pretrained.resize_params_vocab(params, V + 3)
    table, head = grown["embed"]["embedding"], grown["lm_head"]["kernel"]
    assert table.shape[0] == V + 3 and head.shape[1] == V + 3
    np.testing.assert_array_equal(table[:V], params["embed"]["embedding"])
    np.testing.assert_allclose(table[V:], np.broadcast_to(
        params["embed"]["embedding"].mean(0), (3, table.shape[1])), rtol=1e-6)
    np.testing.assert_allclose(head[:, V + 2], params["lm_head"]["kernel"].mean(1), rtol=1e-6)
    with pytest.raises(ValueError, match=r"new_vocab=3 is not allowed"):
        pretrained.resize_params_vocab(params, 3)


def test_trainer_fine_tunes_from_a_checkpoint(loaded, tmp_path):
    """init_from_hf: the run starts from the checkpoint (its vocabulary grown to the byte
    tokenizer's 320 rows); a model section that differs from the checkpoint is refused."""
    folder, _, _, params = loaded["gpt2"]
    c = lm_config.get_config("tiny")
    c.model = pretrained.model_config(str(folder))
    c.model.vocab_size = 320
    c.init_from_hf = str(folder)
    c.num_steps, c.checkpoint_every, c.eval_every, c.progress = 0, 0, 0, False
    c.mesh.data, c.mesh.fsdp = 2, 4
    start = trainer.train(c, tmp_path / "run")["state"].params
    np.testing.assert_array_equal(np.asarray(start["embed"]["embedding"][:256]),
                                  params["embed"]["embedding"])
    np.testing.assert_array_equal(np.asarray(start["block_1"]["mlp"]["fc_out"]["kernel"]),
                                  params["block_1"]["mlp"]["fc_out"]["kernel"])
    # (colabs/pretrained.py, executed by the tests, fine-tunes such a run and checks its loss)
    layers = c.model.num_layers
    c.model.num_layers = layers + 1
    with pytest.raises(ValueError, match=rf"model.num_layers={layers + 1} differs from the "
                                         rf"checkpoint's {layers}"):
        trainer.train(c, tmp_path / "other")


@pytest.mark.parametrize("name", ("t5_relu", "t5_gated"))
def test_t5_through_from_hf(reference_dir, name):
    """T5 (tests/models/test_t5.py checks the module in depth) loaded by from_hf: logits, the
    encoder alone from the same checkpoint, and greedy decoding."""
    folder = reference_dir / "hf" / name
    ref = dict(np.load(folder / "reference.npz"))
    model, params = pretrained.from_hf(str(folder))
    logits = model.apply({"params": params}, ref["input_ids"], ref["decoder_input_ids"])
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-5, rtol=1e-5)
    encoder, enc_params = pretrained.from_hf(str(folder), encoder_only=True)
    assert set(enc_params) == {"shared", "encoder"}
    np.testing.assert_allclose(np.asarray(encoder.apply({"params": enc_params},
                                                        ref["input_ids"])),
                               ref["encoder_hidden"], atol=1e-5, rtol=1e-5)
    steps = ref["greedy_tokens"].shape[1]
    tokens = t5.greedy_decode(model, params, ref["input_ids"], steps)
    np.testing.assert_array_equal(np.asarray(tokens), ref["greedy_tokens"])
    with pytest.raises(ValueError, match=r"encoder_only=True is not allowed for "
                                         r"model_type='gpt2'"):
        pretrained.from_hf(str(reference_dir / "hf" / "gpt2"), encoder_only=True)
