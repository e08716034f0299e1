"""Official landmark checkpoints → mnemax: the `lm_benchmark` GPT's PyTorch state dict (a mapping,
an .npz or a .safetensors file) as `LandmarkLM` params (models/landmark.py), with its names and
shapes checked against the config.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models import landmark, layers


_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def load_state_dict(source, *, prefix: str = "") -> dict[str, np.ndarray]:
    """A state dict as numpy arrays from a mapping, an .npz path or a .safetensors path.

    `prefix` is stripped from names that carry it (e.g. "param/" in the reference vectors); the
    wrappers "_orig_mod." (torch.compile) and "module." (DDP) are stripped too.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"state dict path {path!r} does not exist (or is not a file)")
        if path.endswith(".npz"):
            with np.load(path) as f:
                raw = {k: f[k] for k in f.files}
        elif path.endswith(".safetensors"):
            try:
                from safetensors.numpy import load_file
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ValueError("reading .safetensors needs the `safetensors` package") from e
            try:
                raw = load_file(path)
            except Exception as e:   # SafetensorError: a truncated or foreign file
                raise ValueError(f"state dict path {path!r} is not a readable .safetensors file "
                                 f"({type(e).__name__}: {e})") from None
        else:
            raise ValueError(f"state dict path {path!r} must end in .npz or .safetensors")
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raise ValueError(f"state dict must be a mapping or a path, got {type(source).__name__}")
    out = {}
    for name, value in raw.items():
        if prefix and name.startswith(prefix):
            name = name[len(prefix):]
        elif prefix:
            continue
        for w in _WRAPPER_PREFIXES:
            if name.startswith(w):
                name = name[len(w):]
        if hasattr(value, "detach"):          # a torch tensor, if the caller passes one
            value = value.detach().cpu().numpy()
        out[name] = np.asarray(value)
    return out


def params_from_torch(state_dict, config: landmark.LandmarkConfig, *, prefix: str = "") -> dict:
    """Official lm_benchmark GPT state dict → params for `LandmarkLM(config)` / `Transformer`.

    state_dict: mapping of name → array, or a path to .npz / .safetensors (see `load_state_dict`).
    torch Linear weights are [out, in]; mnemax kernels are [in, ...]. `c_attn` rows are q|k|v, each
    split into heads as (H, Dh). Raises ValueError naming every missing or mis-shaped entry.
    """
    cfg = landmark.as_landmark_config(config).model
    sd = load_state_dict(state_dict, prefix=prefix)
    C, H, Dh, V, F = cfg.width, cfg.num_heads, cfg.hd, cfg.vocab_size, cfg.hidden
    if H * Dh != C:
        raise ValueError(f"the official GPT needs num_heads·head_dim == width; got {H}·{Dh} != {C}")
    if cfg.mlp != "gelu" or cfg.norm != "layernorm":
        raise ValueError(f"the official GPT uses mlp='gelu' and norm='layernorm'; config has "
                         f"mlp={cfg.mlp!r}, norm={cfg.norm!r}")
    expected = {"transformer.wte.weight": (V, C), "transformer.ln_f.weight": (C,)}
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}."
        expected.update({p + "ln_1.weight": (C,), p + "attn.c_attn.weight": (3 * C, C),
                         p + "attn.c_proj.weight": (C, C), p + "ln_2.weight": (C,),
                         p + "mlp.c_fc.weight": (F, C), p + "mlp.c_proj.weight": (C, F)})
    if not cfg.tie_embeddings:
        expected["lm_head.weight"] = (V, C)
    problems = [f"missing {n!r} (expected shape {s})" for n, s in expected.items() if n not in sd]
    problems += [f"{n!r} has shape {tuple(sd[n].shape)}, expected {s}"
                 for n, s in expected.items() if n in sd and tuple(sd[n].shape) != s]
    problems += [f"{n!r} has dtype {sd[n].dtype}, expected a floating dtype"
                 for n in expected if n in sd and not np.issubdtype(sd[n].dtype, np.floating)]
    if cfg.tie_embeddings and "lm_head.weight" in sd and "transformer.wte.weight" in sd:
        if sd["lm_head.weight"].shape != sd["transformer.wte.weight"].shape or not np.array_equal(
                sd["lm_head.weight"], sd["transformer.wte.weight"]):
            problems.append("'lm_head.weight' differs from 'transformer.wte.weight' but the config "
                            "ties embeddings (set tie_embeddings=False)")
    biases = sorted(n for n in sd if n.endswith(".bias"))
    if biases:
        problems.append(f"biases are not supported (config.bias=False in the official GPT): {biases}")
    if "transformer.wpe.freqs" in sd:
        ours = np.asarray(layers.rope_frequencies(Dh, cfg.rope_base), np.float64)
        theirs = np.asarray(sd["transformer.wpe.freqs"], np.float64)
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-6, atol=0):
            problems.append(f"'transformer.wpe.freqs' {theirs} do not match this config's RoPE "
                            f"frequencies {ours} (rope_base={cfg.rope_base})")
    if problems:
        raise ValueError("state dict does not fit the config: " + "; ".join(problems))
    # Semantic entries in mnemax layouts; placed into the tree `LandmarkLM.init` builds (so a leaf
    # that the model keeps under `kernel` gets it), with every shape checked against that tree.
    values: dict[str, np.ndarray] = {"embed/embedding": sd["transformer.wte.weight"],
                                     "ln_f/scale": sd["transformer.ln_f.weight"]}
    for i in range(cfg.num_layers):
        p, b = f"transformer.h.{i}.", f"block_{i}/"
        w = sd[p + "attn.c_attn.weight"]
        for j, name in enumerate(("query", "key", "value")):
            values[b + "attn/" + name] = w[j * C:(j + 1) * C].T.reshape(C, H, Dh)
        values[b + "attn/out"] = sd[p + "attn.c_proj.weight"].T.reshape(H, Dh, C)
        values[b + "ln_1/scale"] = sd[p + "ln_1.weight"]
        values[b + "ln_2/scale"] = sd[p + "ln_2.weight"]
        values[b + "mlp/fc_in"] = sd[p + "mlp.c_fc.weight"].T
        values[b + "mlp/fc_out"] = sd[p + "mlp.c_proj.weight"].T
    if not cfg.tie_embeddings:
        values["lm_head"] = sd["lm_head.weight"].T
    return _fill_param_tree(values, config)


def param_shapes(config: landmark.LandmarkConfig) -> dict:
    """The (unboxed) ShapeDtypeStruct tree of `LandmarkLM(config)` params, without computing them."""
    T = config.mem_freq + 1
    tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
    model = landmark.LandmarkLM(config)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
    return layers.unbox(shapes)["params"]


def _fill_param_tree(values: dict, config: landmark.LandmarkConfig) -> dict:
    shapes = param_shapes(config)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    out: dict = {}
    problems = []
    for path, leaf in flat.items():
        key = path[:-len("/kernel")] if path.endswith("/kernel") and path not in values else path
        if key not in values:
            problems.append(f"no converted value for mnemax param {path!r}")
            continue
        v = np.asarray(values[key])
        if v.shape != leaf.shape:
            problems.append(f"{path!r}: converted shape {v.shape}, the model expects {leaf.shape}")
            continue
        node = out
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = jnp.asarray(v, leaf.dtype)
    if problems:
        raise ValueError("converted params do not fit the model: " + "; ".join(problems))
    return out
