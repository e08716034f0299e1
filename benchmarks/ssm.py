"""Speed of the BiSSM LM (models/ssm.py): prefill scaling, bidirectional vs causal, vs attention.

    python -m benchmarks.ssm [--width 64] [--layers 2] [--lengths 4096,8192,16384]
                             [--transformer_max 4096] [--mixer gated] [--runs 5]

Three questions, each timed as the fastest of `runs` jitted calls after warm-up
(benchmarks/harness.py; the minimum, not the median, because a shared CPU's other jobs only ever
add time), batch 1, float32:

1. prefill time at each length (the whole prompt read as the bidirectional prefix, the decode
   state returned): the scan is linear in T, so t(16k)/t(8k) should be ≈ 2 (the bar: ≤ 2.2);
2. one bidirectional mixer layer against one causal layer of the same size at the longest
   length: same parameters and FLOPs, so the ratio should be ≈ 1 (the bar: ≤ 1.1);
3. the SSM LM's forward pass against the baseline Transformer (models/transformer.py, dense
   causal attention) of the same width and depth, at every length up to `transformer_max` (dense
   attention materialises [H, T, T] scores, so long lengths are skipped on CPU).

Writes benchmarks/results/ssm-DEVICE.json via `harness.write_result`. The CPU default takes
about a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from benchmarks import harness
from models import ssm
from models.transformer import Transformer, TransformerConfig


def _ssm_cfg(a, pattern: str) -> ssm.SSMConfig:
    return ssm.SSMConfig(vocab_size=320, width=a.width, num_layers=a.layers, mixer=a.mixer,
                         layer_pattern=pattern, mlp_hidden=4 * a.width,
                         hawk_heads=4 if a.mixer == "hawk" else 1, chunk_size=a.chunk)


def prefill_times(a) -> dict:
    model = ssm.BiSSMLM(_ssm_cfg(a, "bc"))
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    prefill = jax.jit(lambda p, t: model.apply({"params": p}, t, method=ssm.BiSSMLM.prefill))
    out = {}
    for T in a.lengths:
        toks = jax.random.randint(jax.random.key(T), (1, T), 0, 256, jnp.int32)
        out[T] = harness.time_fn(lambda: prefill(params, toks), warmup=1, runs=a.runs)["min_s"]
        print(f"prefill T={T}: {out[T] * 1e3:.1f} ms", flush=True)
    return out


def layer_times(a, T: int) -> dict:
    """One mixer layer (bidirectional vs causal) on x [1, T, D], the whole row a prefix."""
    cfg = _ssm_cfg(a, "bc")
    mixer_cls = ssm.GatedSSM if a.mixer == "gated" else ssm.Hawk
    x = jax.random.normal(jax.random.key(1), (1, T, a.width), jnp.float32)
    seg = jnp.ones((1, T), jnp.int32)
    pre = jnp.ones((1, T), bool)
    fns = {}
    for bidir in (False, True):
        layer = mixer_cls(cfg, bidir)
        params = layer.init(jax.random.key(0), x, segment_ids_BxT=seg, prefix_BxT=pre)
        fn = jax.jit(lambda p, x, layer=layer: layer.apply(p, x, segment_ids_BxT=seg,
                                                            prefix_BxT=pre))
        fns["bidirectional" if bidir else "causal"] = (fn, params)
    # Alternate the two, three rounds each, and keep each one's fastest: a shared machine's
    # load then falls on both alike.
    out = {name: float("inf") for name in fns}
    for _ in range(3):
        for name, (fn, params) in fns.items():
            t = harness.time_fn(lambda: fn(params, x), warmup=1, runs=a.runs)["min_s"]
            out[name] = min(out[name], t)
    for name, t in out.items():
        print(f"{name} layer T={T}: {t * 1e3:.1f} ms", flush=True)
    return out


def forward_times(a) -> dict:
    """Forward logits of the SSM LM and the Transformer at the same width and depth."""
    sm = ssm.BiSSMLM(_ssm_cfg(a, "bc"))
    tm = Transformer(TransformerConfig(vocab_size=320, width=a.width, num_layers=a.layers,
                                       num_heads=max(a.width // 32, 1)))
    dummy = jnp.zeros((1, 16), jnp.int32)
    sp = sm.init(jax.random.key(0), dummy)["params"]
    tp = tm.init(jax.random.key(0), dummy)["params"]
    s_fwd = jax.jit(lambda p, t: sm.apply({"params": p}, t, prefix=jnp.ones(t.shape, bool)))
    t_fwd = jax.jit(lambda p, t: tm.apply({"params": p}, t))
    out = {"ssm": {}, "transformer": {}}
    for T in a.lengths:
        if T > a.transformer_max:
            continue
        toks = jax.random.randint(jax.random.key(T), (1, T), 0, 256, jnp.int32)
        out["ssm"][T] = harness.time_fn(lambda: s_fwd(sp, toks), warmup=1,
                                        runs=a.runs)["min_s"]
        out["transformer"][T] = harness.time_fn(lambda: t_fwd(tp, toks), warmup=1,
                                                runs=a.runs)["min_s"]
        print(f"forward T={T}: ssm {out['ssm'][T] * 1e3:.1f} ms, transformer "
              f"{out['transformer'][T] * 1e3:.1f} ms", flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mixer", default="gated", choices=ssm.MIXERS)
    p.add_argument("--lengths", default="4096,8192,16384")
    p.add_argument("--transformer_max", type=int,
                   default=4096 if jax.default_backend() == "cpu" else 16384)
    p.add_argument("--chunk", type=int, default=0, help="chunked scan size (0: one scan)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--out_dir", default=None)
    a = p.parse_args(argv)
    a.lengths = sorted(int(x) for x in a.lengths.split(","))
    pre = prefill_times(a)
    Ts = a.lengths
    scaling = {f"t({Ts[i + 1]})/t({Ts[i]})": pre[Ts[i + 1]] / pre[Ts[i]]
               for i in range(len(Ts) - 1)}
    layers = layer_times(a, Ts[-1])
    fwd = forward_times(a)
    vs = {T: fwd["transformer"][T] / fwd["ssm"][T] for T in fwd["ssm"]}
    payload = {
        "config": {"width": a.width, "layers": a.layers, "mixer": a.mixer, "batch": 1,
                   "lengths": Ts, "chunk_size": a.chunk, "runs": a.runs},
        "prefill_s": {str(k): v for k, v in pre.items()},
        "prefill_scaling": scaling,
        "layer_s": layers,
        "bidirectional_over_causal": layers["bidirectional"] / layers["causal"],
        "forward_s": {m: {str(k): v for k, v in d.items()} for m, d in fwd.items()},
        "transformer_over_ssm": {str(k): v for k, v in vs.items()},
    }
    harness.write_result("ssm", payload, out_dir=a.out_dir)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
