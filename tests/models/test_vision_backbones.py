"""models.clip_vision and models.resnet loaded by models.pretrained.from_hf against transformers.

The fixtures in tests/data/hf/ (tools/make_hf_fixtures.py: clip_vision, clip, resnet,
resnet_basic; README there) are tiny random checkpoints with transformers' float32 outputs for
two random images, saved NHWC. MNEMAX_REFERENCE points the tests at a regenerated set.
"""
import functools
import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from models import pretrained
from models.clip_vision import CLIPVision
from models.resnet import ResNet
from train import sharding as shd

BACKBONES = ("clip_vision", "clip", "resnet", "resnet_basic")


@pytest.fixture(scope="module")
def loaded(reference_dir):
    """name → (folder, reference arrays, model, params, jitted features fn)."""
    out = {}
    for name in BACKBONES:
        folder = reference_dir / "hf" / name
        model, params = pretrained.from_hf(str(folder))
        fn = jax.jit(functools.partial(model.apply, features=True))
        out[name] = (folder, dict(np.load(folder / "reference.npz")), model, params, fn)
    return out


@pytest.mark.parametrize("name", BACKBONES)
def test_features_match_transformers(loaded, name):
    _, ref, model, params, fn = loaded[name]
    got = fn({"params": params}, ref["pixel_values"])
    compared = [k for k in got if k in ref]
    assert compared, f"{name}: no reference output to compare"
    for k in compared:
        assert got[k].shape == ref[k].shape, k
        # float32 on both sides; torch's own run-to-run noise is ~1e-6
        np.testing.assert_allclose(np.asarray(got[k]), ref[k], atol=1e-5, rtol=0, err_msg=k)
    if name in ("clip_vision", "resnet"):
        # The plain call is what a DKVB backbone embeds with: CLIP's image_embeds, ResNet's pooled.
        plain = jax.jit(model.apply)({"params": params}, ref["pixel_values"])
        key = "image_embeds" if isinstance(model, CLIPVision) else "pooler_output"
        np.testing.assert_allclose(np.asarray(plain), ref[key], atol=1e-5, rtol=0)


def test_what_the_fixtures_pin_down(loaded):
    clip_model, resnet_model, basic = (loaded[n][2] for n in ("clip", "resnet", "resnet_basic"))
    assert loaded["clip_vision"][2].cfg.act == "quick_gelu" and clip_model.cfg.act == "gelu"
    assert json.loads((loaded["clip"][0] / "config.json").read_text())["model_type"] == "clip"
    assert resnet_model.cfg.layer_type == "bottleneck" and basic.cfg.layer_type == "basic"
    assert basic.cfg.downsample_in_first_stage
    # batch norm statistics came from the checkpoint, not the fresh-init 0 / 1
    stem = loaded["resnet"][3]["stem"]
    assert np.abs(np.asarray(stem["mean"])).max() > 0.05
    assert np.abs(np.asarray(stem["var"]) - 1).max() > 0.05


def test_sharded_load_equals_unsharded(loaded):
    folder, ref, model, params, _ = loaded["clip_vision"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    _, sharded = pretrained.from_hf(str(folder), mesh=mesh, rules=shd.DEFAULT_RULES)
    q = sharded["block_0"]["attn"]["query"]
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2, q.shape[2])
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(sharded),
                           jax.device_get(params))


def test_resnet_for_image_classification_layout(loaded, tmp_path):
    """The hub's microsoft/resnet-* files are ResNetForImageClassification: `resnet.` before
    every name and a `classifier.1` head, which the backbone leaves unread."""
    from safetensors.numpy import load_file, save_file
    folder, ref, _, params, _ = loaded["resnet"]
    tensors = {"resnet." + k: v for k, v in load_file(folder / "model.safetensors").items()}
    tensors["classifier.1.weight"] = np.zeros((3, 32), np.float32)
    tensors["classifier.1.bias"] = np.zeros((3,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    _, got = pretrained.from_hf(str(tmp_path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)


def _with_config(folder, tmp_path, **changes):
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    hf = json.loads((folder / "config.json").read_text())
    hf.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return str(tmp_path)


@pytest.mark.parametrize("name,changes,match", [
    ("clip_vision", {"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ("clip_vision", {"architectures": ["CLIPVisionModel"]}, "no visual projection"),
    ("clip_vision", {"patch_size": 5}, "must be divisible by patch_size=5"),
    ("resnet", {"layer_type": "preactivation"}, "layer_type='preactivation' is not supported"),
    ("resnet", {"downsample_in_bottleneck": "yes"}, "downsample_in_bottleneck='yes' must be"),
    ("resnet", {"layer_type": "basic"}, r"in the checkpoint; the model \(config.json\) wants"),
])
def test_unsupported_configs_are_refused(loaded, tmp_path, name, changes, match):
    with pytest.raises(ValueError, match=match):
        pretrained.from_hf(_with_config(loaded[name][0], tmp_path, **changes))


def test_nchw_or_wrong_size_pixels_are_refused(loaded):
    _, ref, clip_model, clip_params, _ = loaded["clip_vision"]
    nchw = ref["pixel_values"].transpose(0, 3, 1, 2)
    S = clip_model.cfg.image_size
    with pytest.raises(ValueError, match=rf"wants \[B, {S}, {S}, 3\] \(NHWC"):
        clip_model.apply({"params": clip_params}, nchw)
    _, ref, resnet_model, resnet_params, _ = loaded["resnet"]
    with pytest.raises(ValueError, match=r"wants \[B, H, W, 3\] \(NHWC"):
        resnet_model.apply({"params": resnet_params}, ref["pixel_values"].transpose(0, 3, 1, 2))
    assert isinstance(resnet_model, ResNet)
