"""Pretrained Hugging Face checkpoints as mnemax models: GPT-2, LLaMA-family, T5, and the vision
backbones CLIP (vision tower) and ResNet.

    model, params = from_hf("/path/to/save_pretrained_dir")           # or a hub id, when online
    logits_BxTxV = model.apply({"params": params}, input_ids_BxT)      # GPT-2, LLaMA
    logits_BxTxV = model.apply({"params": params}, input_ids_BxS, decoder_input_ids_BxT)  # T5
    image_embeds_BxP = model.apply({"params": params}, pixels_BxHxWxC)  # CLIP (NHWC pixels)
    pooled_BxC = model.apply({"params": params}, pixels_BxHxWxC)        # ResNet

A checkpoint is a directory as `save_pretrained` writes it: `config.json` and `model.safetensors`,
or shards `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`. No torch: the
safetensors files are read tensor by tensor (`SafetensorsReader`, plain reads into host memory,
no memory map), each tensor converted to the module's layout, cast to `dtype` and placed on the
devices — into its sharding on `mesh` when one is given (the logical axis names of the module's
parameters and `rules`, as the trainer shards them) — before the next tensor is read. The whole
model is never one host array.

The decoder-only families are configurations of mnemax's own `models.transformer.Transformer`
(GPT-2: learned positions, LayerNorm and biases, tanh GELU, tied head; LLaMA: RMSNorm, SwiGLU,
half-rotation RoPE with `rope_theta` and `rope_scaling`, grouped-query attention); T5 is
`models.t5`; CLIP's vision tower is `models.clip_vision` (CLIPVisionModelWithProjection, or the
vision half of a CLIPModel) and ResNet `models.resnet` (batch norm with the checkpoint's running
statistics). Images are NHWC, where torch takes NCHW. A config field a module does not implement
is refused with a ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any, Optional

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, vocab
from models.transformer import Transformer, TransformerConfig, as_dtype

Path = tuple[str, ...]                            # a parameter's path in the Flax params tree
Convert = Callable[[Any, Callable[[str], np.ndarray]], Iterator[tuple[Path, np.ndarray]]]

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


# ---------------------------------------------------------------------------------------------
# Reading safetensors files
# ---------------------------------------------------------------------------------------------
class SafetensorsReader:
    """The tensors of a checkpoint directory by name, read one at a time from disk.

    `read(name)` returns a numpy array (a fresh host copy; bfloat16 as ml_dtypes' bfloat16) and
    records the name in `used`; `names` is every tensor of the checkpoint."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            raise ValueError(f"checkpoint directory {directory!r} has neither model.safetensors "
                             "nor model.safetensors.index.json (save it with "
                             "save_pretrained(..., safe_serialization=True))")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, info in header.items():
                self._where[key] = (path, info, 8 + n)
        self.names = frozenset(self._where)
        self.used: set[str] = set()

    def read(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        path, info, base = self._where[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype={info['dtype']!r}; allowed: "
                             f"{sorted(_ST_DTYPES)}")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        arr = np.fromfile(path, dtype=dtype, count=count, offset=base + start)
        self.used.add(name)
        return arr.reshape(info["shape"])


# ---------------------------------------------------------------------------------------------
# Families: config.json → module config, and HF tensors → Flax params
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
    """How one `model_type` becomes a mnemax module.

    config(hf, dtype, param_dtype) → the module's config (ValueError on unsupported fields);
    module(cfg) → the Linen module; example(cfg) → arguments of `module.init` after the rng;
    convert(cfg, read) → (path, array in the Flax layout) for every parameter;
    ignored: HF tensors that are not parameters (buffers some checkpoints carry);
    optional_prefix: a prefix some checkpoints put before every name (GPT-2: GPT2LMHeadModel
    writes `transformer.h.0…`, the hub's checkpoints have bare `h.0…`); `convert` reads the bare
    names."""
    config: Callable[..., Any]
    module: Callable[[Any], nn.Module]
    example: Callable[[Any], tuple]
    convert: Convert
    ignored: str = r"$^"
    optional_prefix: str = ""


def _check(hf: dict, name: str, allowed, default=None) -> Any:
    value = hf.get(name, default)
    if value not in allowed:
        raise ValueError(f"config.json field {name}={value!r} is not supported; allowed: "
                         f"{sorted(allowed, key=repr)}")
    return value


# GPT-2 ---------------------------------------------------------------------------------------
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def gpt2_config(hf: dict, *, dtype=jnp.float32, param_dtype=jnp.float32) -> TransformerConfig:
    act = _check(hf, "activation_function", _GPT2_ACT, "gelu_new")
    _check(hf, "scale_attn_weights", {True}, True)
    _check(hf, "scale_attn_by_inverse_layer_idx", {False}, False)
    _check(hf, "add_cross_attention", {False}, False)
    _check(hf, "tie_word_embeddings", {True}, True)
    return TransformerConfig(
        vocab_size=hf["vocab_size"], width=hf["n_embd"], num_layers=hf["n_layer"],
        num_heads=hf["n_head"], mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
        mlp=_GPT2_ACT[act], norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        bias=True, positions="learned", max_positions=hf["n_positions"], tie_embeddings=True,
        dtype=dtype, param_dtype=param_dtype)


def _gpt2_convert(c: TransformerConfig, read) -> Iterator[tuple[Path, np.ndarray]]:
    # Names without the optional `transformer.` prefix (see Family.optional_prefix).
    H, K, D = c.num_heads, c.hd, c.width
    yield ("embed", "embedding"), read("wte.weight")
    yield ("pos_embed", "embedding"), read("wpe.weight")
    for i in range(c.num_layers):
        h, b = f"h.{i}.", f"block_{i}"
        for ln in ("ln_1", "ln_2"):
            yield (b, ln, "scale"), read(h + ln + ".weight")
            yield (b, ln, "bias"), read(h + ln + ".bias")
        # Conv1D weights are [in, out]: the Flax kernel layout already.
        qkv = read(h + "attn.c_attn.weight").reshape(D, 3, H, K)
        qkv_b = read(h + "attn.c_attn.bias").reshape(3, H, K)
        for j, name in enumerate(("query", "key", "value")):
            yield (b, "attn", name), qkv[:, j]
            yield (b, "attn", name + "_bias"), qkv_b[j]
        yield (b, "attn", "out"), read(h + "attn.c_proj.weight").reshape(H, K, D)
        yield (b, "attn", "out_bias"), read(h + "attn.c_proj.bias")
        for hf_name, name in (("c_fc", "fc_in"), ("c_proj", "fc_out")):
            yield (b, "mlp", name, "kernel"), read(f"{h}mlp.{hf_name}.weight")
            yield (b, "mlp", name, "bias"), read(f"{h}mlp.{hf_name}.bias")
    yield ("ln_f", "scale"), read("ln_f.weight")
    yield ("ln_f", "bias"), read("ln_f.bias")


# LLaMA ---------------------------------------------------------------------------------------
def _rope_scaling(hf: dict) -> Optional[layers.RopeScaling]:
    rs = hf.get("rope_scaling")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"config.json field rope_scaling.rope_type={kind!r} is not supported; "
                         "allowed: 'default', 'linear', 'llama3'")
    if kind == "linear":
        return layers.RopeScaling("linear", float(rs["factor"]))
    return layers.RopeScaling(
        "llama3", float(rs["factor"]), float(rs["low_freq_factor"]),
        float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))


def llama_config(hf: dict, *, dtype=jnp.float32, param_dtype=jnp.float32) -> TransformerConfig:
    _check(hf, "hidden_act", {"silu"}, "silu")
    _check(hf, "attention_bias", {False}, False)
    _check(hf, "mlp_bias", {False}, False)
    heads = hf["num_attention_heads"]
    return TransformerConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_hidden=hf["intermediate_size"], mlp="swiglu", norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_base=float(hf.get("rope_theta", 10000.0)),
        rope_interleaved=False, rope_scaling=_rope_scaling(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype, param_dtype=param_dtype)


def _llama_convert(c: TransformerConfig, read) -> Iterator[tuple[Path, np.ndarray]]:
    H, G, K, D = c.num_heads, c.kv_heads, c.hd, c.width
    yield ("embed", "embedding"), read("model.embed_tokens.weight")
    for i in range(c.num_layers):
        h, b = f"model.layers.{i}.", f"block_{i}"
        yield (b, "ln_1", "scale"), read(h + "input_layernorm.weight")
        yield (b, "ln_2", "scale"), read(h + "post_attention_layernorm.weight")
        # nn.Linear weights are [out, in].
        for hf_name, name, heads in (("q_proj", "query", H), ("k_proj", "key", G),
                                     ("v_proj", "value", G)):
            yield (b, "attn", name), read(f"{h}self_attn.{hf_name}.weight").T.reshape(D, heads, K)
        yield (b, "attn", "out"), read(h + "self_attn.o_proj.weight").T.reshape(H, K, D)
        for hf_name, name in (("gate_proj", "fc_gate"), ("up_proj", "fc_in"),
                              ("down_proj", "fc_out")):
            yield (b, "mlp", name, "kernel"), read(f"{h}mlp.{hf_name}.weight").T
    yield ("ln_f", "scale"), read("model.norm.weight")
    if not c.tie_embeddings:
        yield ("lm_head", "kernel"), read("lm_head.weight").T


def _decoder_example(c: TransformerConfig) -> tuple:
    return (jnp.zeros((1, 1), jnp.int32),)


def _t5_family(encoder_only: bool = False) -> Family:
    from models import t5
    if encoder_only:   # T5EncoderModel: a full checkpoint's decoder and head are left unread
        return Family(config=functools.partial(t5.T5Config.from_hf, encoder_only=True),
                      module=t5.T5Encoder, example=lambda c: (jnp.zeros((1, 1), jnp.int32),),
                      convert=functools.partial(t5.convert_hf, encoder_only=True),
                      ignored="|".join(re.escape(p) + ".*" for p in t5.ENCODER_ONLY_UNUSED))
    return Family(config=t5.T5Config.from_hf, module=t5.T5,
                  example=lambda c: (jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)),
                  convert=t5.convert_hf)


def _clip_family() -> Family:
    from models import clip_vision
    return Family(config=clip_vision.CLIPVisionConfig.from_hf, module=clip_vision.CLIPVision,
                  example=clip_vision.example, convert=clip_vision.convert_hf,
                  ignored=clip_vision.UNUSED)


def _resnet_family() -> Family:
    from models import resnet
    return Family(config=resnet.ResNetConfig.from_hf, module=resnet.ResNet,
                  example=resnet.example, convert=resnet.convert_hf, ignored=resnet.UNUSED,
                  optional_prefix="resnet.")


FAMILIES: dict[str, Callable[[], Family]] = {
    "gpt2": lambda: Family(gpt2_config, Transformer, _decoder_example, _gpt2_convert,
                           ignored=r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias|lm_head\.weight",
                           optional_prefix="transformer."),
    "llama": lambda: Family(llama_config, Transformer, _decoder_example, _llama_convert,
                            ignored=r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    "t5": _t5_family,
    # Vision backbones (DKVB's frozen encoders): pixels [B, H, W, C] (NHWC) → features.
    "clip_vision_model": _clip_family,      # CLIPVisionModelWithProjection → image_embeds
    "clip": _clip_family,                   # CLIPModel: its vision tower and projection
    "resnet": _resnet_family,               # ResNetModel / …ForImageClassification → pooled
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def resolve(path: str) -> str:
    """A local checkpoint directory for `path`: the directory itself, or a hub id downloaded
    (config, safetensors and tokenizer files) when `huggingface_hub` is installed and online."""
    if os.path.isdir(path):
        return path
    hint = (f"path={path!r} is not a local directory; pass a directory written by "
            "save_pretrained (config.json + model.safetensors)")
    if os.path.exists(path) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise ValueError(hint)
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError(f"{hint}, or install huggingface_hub to fetch hub ids") from None
    try:
        return huggingface_hub.snapshot_download(
            path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # offline, unknown repo, gated repo: one message for all
        raise ValueError(f"{hint} (fetching it from the hub failed: {type(e).__name__})") from None


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"checkpoint directory {directory!r} has no config.json")
    with open(path) as f:
        return json.load(f)


def from_hf(path: str, dtype: Any = jnp.float32, *, compute_dtype: Any = None,
            mesh: Optional[jax.sharding.Mesh] = None, rules=None,
            encoder_only: bool = False) -> tuple[nn.Module, dict]:
    """(model, params) of the Hugging Face checkpoint at `path` (see the module docstring).

    encoder_only (T5 only): the encoder alone (`models.t5.T5Encoder`: input ids → hidden
    [B, S, D]; MAC's amortization and aggregation networks), from a T5ForConditionalGeneration
    or a T5EncoderModel checkpoint.

    dtype: the parameters' dtype (float32 or bfloat16); compute_dtype: the activations' (default
    `dtype`). mesh: place every parameter in its sharding on `mesh` under `rules` (logical-axis
    rules, e.g. train.sharding.DEFAULT_RULES); without a mesh, on the default device."""
    directory = resolve(path)
    hf = read_config(directory)
    family = _family(hf, encoder_only)
    param_dtype = as_dtype(dtype)
    cfg = family.config(hf, dtype=as_dtype(compute_dtype or dtype), param_dtype=param_dtype)
    model = family.module(cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *family.example(cfg)))
    abstract = abstract["params"]
    shapes = traverse_util.flatten_dict(layers.unbox(abstract))
    shardings = None
    if mesh is not None:
        if rules is None:
            raise ValueError("from_hf(mesh=...) needs rules, the logical-axis rules "
                             "(train.sharding.DEFAULT_RULES, or a run's rules)")
        tree = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
        shardings = traverse_util.flatten_dict(tree)
    reader = SafetensorsReader(directory)
    read = reader.read
    pre = family.optional_prefix
    if pre and any(n.startswith(pre) for n in reader.names):
        read = lambda name: reader.read(pre + name)  # noqa: E731
    flat: dict[Path, jax.Array] = {}
    for p, arr in family.convert(cfg, read):
        if p not in shapes:
            raise ValueError(f"converted parameter {'/'.join(p)} is not in the model")
        if p in flat:
            raise ValueError(f"parameter {'/'.join(p)} converted twice")
        want = shapes[p].shape
        if arr.shape != want:
            raise ValueError(f"parameter {'/'.join(p)} has shape {arr.shape} in the checkpoint; "
                             f"the model (config.json) wants {want}")
        arr = np.asarray(arr).astype(param_dtype)
        flat[p] = _place(p, arr, shardings[p]) if shardings else jnp.asarray(arr)
        del arr
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise ValueError(f"the checkpoint gives no value for {'/'.join(missing[0])} "
                         f"({len(missing)} parameters missing)")
    unused = sorted(n for n in reader.names - reader.used if not re.fullmatch(family.ignored, n))
    if unused:
        raise ValueError(f"checkpoint tensor {unused[0]!r} is not used by the model "
                         f"({len(unused)} unused); is config.json the checkpoint's own?")
    return model, traverse_util.unflatten_dict(flat)


def _place(path: Path, arr: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
    try:
        return jax.device_put(arr, sharding)
    except ValueError as e:    # jax's IndivisibleError
        if "divide" not in str(e):
            raise
        raise ValueError(f"parameter {'/'.join(path)} has shape {arr.shape}: it is not "
                         f"divisible by the mesh axes {tuple(sharding.spec)} of mesh "
                         f"{dict(sharding.mesh.shape)}; change the mesh or the rules") from None


def _family(hf: dict, encoder_only: bool = False) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json field model_type={model_type!r} is not supported; "
                         f"allowed: {sorted(FAMILIES)}")
    if encoder_only and model_type != "t5":
        raise ValueError(f"encoder_only=True is not allowed for model_type={model_type!r}; "
                         "allowed: 't5'")
    if model_type == "t5":
        return _t5_family(encoder_only)
    return FAMILIES[model_type]()


def resize_params_vocab(params: dict, vocab_size: int) -> dict:
    """`params` of a Transformer with the token embedding (and an untied `lm_head`) grown to
    `vocab_size` entries, the new ones the mean of the old (models/vocab.py): tokens added to a
    pretrained vocabulary (BOS/PAD, the landmark token). Rebuild the model's config with the new
    vocab_size."""
    out = {**params, "embed": {**params["embed"], "embedding": vocab.resize_embeddings(
        params["embed"]["embedding"], vocab_size)}}
    if "lm_head" in params:
        out["lm_head"] = {**params["lm_head"], "kernel": vocab.resize_embeddings(
            params["lm_head"]["kernel"], vocab_size, axis=1)}
    return out


# ---------------------------------------------------------------------------------------------
# Fine-tuning with the trainer (train/configs/lm.py:hf=PATH, config.init_from_hf)
# ---------------------------------------------------------------------------------------------
# TransformerConfig fields a checkpoint does not fix: how it computes, not what (`attention`:
# which attention function reads the same q/k/v parameters, e.g. LandmarkLM's 'landmark').
_FREE_FIELDS = ("vocab_size", "dtype", "param_dtype", "remat", "init_std", "attention")


def model_config(path: str) -> dict:
    """The trainer's `model` section for the decoder-only checkpoint at `path`:
    {"family": "transformer", every TransformerConfig field but dtypes} (plain JSON values)."""
    hf = read_config(resolve(path))
    if hf.get("model_type") not in ("gpt2", "llama"):
        raise ValueError(f"config.json field model_type={hf.get('model_type')!r} cannot be "
                         "trained as an LM; allowed: 'gpt2', 'llama'")
    cfg = _family(hf).config(hf)
    out = {"family": "transformer"}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("dtype", "param_dtype"):
            continue
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def params_for(cfg: TransformerConfig, path: str, *, mesh=None, rules=None) -> dict:
    """The checkpoint's parameters for a Transformer of config `cfg` (a run's model): every
    architecture field must equal the checkpoint's (ValueError naming the first that differs);
    `cfg.vocab_size` may exceed the checkpoint's (tokens added: `resize_params_vocab`)."""
    model, params = from_hf(path, cfg.param_dtype, compute_dtype=cfg.dtype, mesh=mesh,
                            rules=rules)
    for f in dataclasses.fields(cfg):
        if f.name in _FREE_FIELDS:
            continue
        mine, theirs = getattr(cfg, f.name), getattr(model.cfg, f.name)
        if mine != theirs:
            raise ValueError(f"model.{f.name}={mine!r} differs from the checkpoint's {theirs!r} "
                             f"({path}); take the model section from pretrained.model_config")
    if cfg.vocab_size != model.cfg.vocab_size:
        grown = resize_params_vocab(params, cfg.vocab_size)
        params = jax.tree_util.tree_map(
            lambda new, old: jax.device_put(new, old.sharding) if mesh is not None else new,
            grown, params)
    return params
