"""Speed of the BiSSM LM (models/ssm.py): prefill scaling, bidirectional vs causal, vs attention.

    python -m benchmarks.ssm [--width 64] [--layers 2] [--lengths 4096,8192,16384]
                             [--transformer_max 4096] [--mixer gated] [--chunk 2048] [--runs 7]

Three questions, each timed as the fastest of `runs` jitted calls after warm-up
(benchmarks/harness.py; the minimum, not the median, because a shared CPU's other jobs only ever
add time), batch 1, float32:

1. prefill time at each length (the whole prompt read as the bidirectional prefix, the decode
   state returned), with every block run in chunks of `--chunk` positions (`SSMConfig.block_chunk`,
   Block._chunked) and, as the in-repo baseline, in one pass over the row. The work is linear in
   T, so t(16k)/t(8k) should be ≈ 2 (the bar: ≤ 2.2). In one pass every intermediate is
   [T, ·]; measured on a 2-core CPU with a 4 MiB L2, those cost about a third more per token
   from 16k on (t(16k)/t(8k) 2.7 in one pass); chunks keep them [chunk, ·];
2. one bidirectional mixer layer against one causal layer of the same size at the longest
   length (same parameters and FLOPs, so the ratio should be ≈ 1; the bar: ≤ 1.1), and the same
   for a whole block run in chunks (the bidirectional one sweeps the chunks twice);
3. the SSM LM's forward pass against the baseline Transformer (models/transformer.py, dense
   causal attention) of the same width and depth, at every length up to `transformer_max` (dense
   attention materialises [H, T, T] scores, so long lengths are skipped on CPU).

Writes results/benchmarks/ssm-DEVICE.json via `harness.write_result`. The CPU default takes
about two minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from benchmarks import harness
from models import ssm
from models.transformer import Transformer, TransformerConfig


def _ssm_cfg(a, pattern: str, chunk: int = 0) -> ssm.SSMConfig:
    return ssm.SSMConfig(vocab_size=320, width=a.width, num_layers=a.layers, mixer=a.mixer,
                         layer_pattern=pattern, mlp_hidden=4 * a.width,
                         hawk_heads=4 if a.mixer == "hawk" else 1, block_chunk=chunk)


def prefill_times(a, chunk: int) -> dict:
    model = ssm.BiSSMLM(_ssm_cfg(a, "bc", chunk))
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    prefill = jax.jit(lambda p, t: model.apply({"params": p}, t, method=ssm.BiSSMLM.prefill))
    out = {}
    for T in a.lengths:
        toks = jax.random.randint(jax.random.key(T), (1, T), 0, 256, jnp.int32)
        out[T] = harness.time_fn(lambda: prefill(params, toks), warmup=1, runs=a.runs)["min_s"]
        print(f"prefill T={T} chunk={chunk}: {out[T] * 1e3:.1f} ms", flush=True)
    return out


def _alternate(fns: dict, runs: int) -> dict:
    """Fastest time of each fn, timed in alternation (three rounds), so that a shared machine's
    load falls on all of them alike."""
    out = {name: float("inf") for name in fns}
    for _ in range(3):
        for name, fn in fns.items():
            out[name] = min(out[name], harness.time_fn(fn, warmup=1, runs=runs)["min_s"])
    return out


def layer_times(a, T: int) -> dict:
    """One mixer layer (bidirectional vs causal) on x [1, T, D], the whole row a prefix; and one
    block (norm, mixer, MLP) of each kind run in chunks of `a.chunk`."""
    cfg = _ssm_cfg(a, "bc")                 # the mixers in one pass (one associative scan)
    mixer_cls = ssm.GatedSSM if a.mixer == "gated" else ssm.Hawk
    x = jax.random.normal(jax.random.key(1), (1, T, a.width), jnp.float32)
    seg = jnp.ones((1, T), jnp.int32)
    pre = jnp.ones((1, T), bool)
    fns = {}
    for bidir in (False, True):
        kind = "bidirectional" if bidir else "causal"
        layer = mixer_cls(cfg, bidir)
        lp = layer.init(jax.random.key(0), x, segment_ids_BxT=seg, prefix_BxT=pre)
        fn = jax.jit(lambda p, x, layer=layer: layer.apply(p, x, segment_ids_BxT=seg,
                                                            prefix_BxT=pre))
        fns[kind] = functools.partial(fn, lp, x)
        blk = ssm.Block(cfg.replace(block_chunk=a.chunk), bidir)
        bp = blk.init(jax.random.key(0), x[:, :16], seg[:, :16], pre[:, :16])
        bfn = jax.jit(lambda p, x, blk=blk: blk.apply(p, x, seg, pre))
        fns[f"{kind}_block_chunked"] = functools.partial(bfn, bp, x)
    out = _alternate(fns, a.runs)
    for name, t in out.items():
        print(f"{name} T={T}: {t * 1e3:.1f} ms", flush=True)
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
    p.add_argument("--chunk", type=int, default=2048,
                   help="blocks run in chunks of this many positions (SSMConfig.block_chunk)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--out_dir", default=None)
    a = p.parse_args(argv)
    a.lengths = sorted(int(x) for x in a.lengths.split(","))
    Ts = a.lengths
    pre = {c: prefill_times(a, c) for c in (a.chunk, 0)}
    scaling = {c: {f"t({Ts[i + 1]})/t({Ts[i]})": p[Ts[i + 1]] / p[Ts[i]]
                   for i in range(len(Ts) - 1)} for c, p in pre.items()}
    layers = layer_times(a, Ts[-1])
    fwd = forward_times(a)
    vs = {T: fwd["transformer"][T] / fwd["ssm"][T] for T in fwd["ssm"]}
    payload = {
        "config": {"width": a.width, "layers": a.layers, "mixer": a.mixer, "batch": 1,
                   "lengths": Ts, "block_chunk": a.chunk, "runs": a.runs},
        "prefill_s": {str(k): v for k, v in pre[a.chunk].items()},
        "prefill_scaling": scaling[a.chunk],
        "prefill_one_pass_s": {str(k): v for k, v in pre[0].items()},
        "prefill_one_pass_scaling": scaling[0],
        "layer_s": layers,
        "bidirectional_over_causal": layers["bidirectional"] / layers["causal"],
        "bidirectional_over_causal_block_chunked": (layers["bidirectional_block_chunked"]
                                                    / layers["causal_block_chunked"]),
        "forward_s": {m: {str(k): v for k, v in d.items()} for m, d in fwd.items()},
        "transformer_over_ssm": {str(k): v for k, v in vs.items()},
    }
    harness.write_result("ssm", payload, out_dir=a.out_dir)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
