"""Tokens/s and MFU of the baseline LM's train step and of the trainer's real loop.

    python -m benchmarks.trainer                      # size "small", float32 on CPU
    python -m benchmarks.trainer --size tiny --steps 5
    python -m benchmarks.trainer --size 125m --devices 0       # accelerators: all local chips
    python -m benchmarks.trainer --size 350m --devices 0

What is timed, in one run:
- the step: one jitted, donated train step of `train.trainer` (forward, backward, AdamW update)
  on a fixed batch already on the device, median of `--steps` runs after warm-up
  (`benchmarks.harness.time_fn`); its learning-rate schedule is the real loop's, so the two are
  one program and, with JAX's persistent compilation cache on, the loop does not compile again;
- the real loop: `trainer.train` itself for `--loop-steps` steps on the config's data (the tiny
  LM config's MQAR rows, generated as read: `data.source="memory"`) through the grain pipeline
  (shuffle, batching), with host-to-device copies, metrics read one step late and written every
  `--log-every` steps and an asynchronous checkpoint every `--checkpoint-every` steps; tokens/s
  the median of its metrics rows' `tokens_per_s` after the first (which holds the compilation).

Attention (`--attention`, the model's `attention_impl`): "auto" by default, cuDNN's flash
attention on a GPU (bfloat16), the splash kernel on a TPU, the XLA path elsewhere. Where the
model runs a fused kernel, the same step with the XLA attention is timed in the same run
(`step_with_xla_attention`), after the real loop.

The file is written after the step, after the real loop and at the end ("complete": true), so a
run stopped by a time limit keeps what it measured.

MFU against two peaks: the device's specification (dense, no sparsity; `train/chips.py`, by
`device_kind`; none for a CPU) and the matmul peak measured in the same run (below).

Peak: the median time of a jitted [n, n] @ [n, n] matmul in the compute dtype on one device,
FLOP/s = 2n³ / t (n = `--peak-n`: 2048 on a CPU; on an accelerator 8192, chained 10 times in one
call so dispatch does not count), measured before and after the train step (the higher kept). MFU = model FLOP/s / (peak × devices).

Model FLOPs per token (forward + backward): 6·N + 12·L·T·D, the standard estimate
(`train.chips.matmul_flops_per_token`, which says what N counts).

Writes `results/benchmarks/trainer-DEVICE.json` (`trainer-125m-DEVICE.json`, `trainer-350m-...` for
the GPT-3 sizes; device, versions, shapes, times, ratios).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from models import layers
from train import trainer
from train.chips import matmul_flops_per_token, spec_peak
from train.configs import lm as lm_config

# Sizes: the model and batch (per device) of each. "tiny" is train/configs/lm.py:tiny; "small" is
# large enough that the step is matmul-bound on a CPU and still runs in about a minute on 2 cores;
# "medium" is for accelerators (GPT-2-small shape at a short sequence, the byte vocabulary);
# "125m" and "350m" are GPT-3 Small and Medium (Brown et al. 2020, table 2.1: 12 × 768 and
# 24 × 1024, T = 2048) with GPT-2's vocabulary padded to 50,304, tied: 124M and 354M parameters.
SIZES = {
    "tiny": dict(width=64, num_layers=2, num_heads=4, seq_len=64, batch_size=32),
    "small": dict(width=256, num_layers=4, num_heads=4, seq_len=256, batch_size=8),
    "medium": dict(width=768, num_layers=12, num_heads=12, seq_len=1024, batch_size=16),
    "125m": dict(width=768, num_layers=12, num_heads=12, seq_len=2048, batch_size=8,
                 vocab_size=50304),
    "350m": dict(width=1024, num_layers=24, num_heads=16, seq_len=2048, batch_size=8,
                 vocab_size=50304),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make_config(size: str, *, dtype: str, num_devices: int, attention: str = "auto",
                num_steps: int = 1000):
    """The lm.py config at `size`: data-parallel over `num_devices`, no checkpoints or evals,
    dense attention by `attention` (layers.DENSE_IMPLS). num_steps only shapes the learning-rate
    schedule: the steps are driven by the caller."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed; use one of {sorted(SIZES)}")
    if attention not in layers.DENSE_IMPLS:
        raise ValueError(f"attention={attention!r} is not allowed; use one of "
                         f"{layers.DENSE_IMPLS}")
    s = SIZES[size]
    c = lm_config.get_config("tiny")
    c.model.width = s["width"]
    c.model.num_layers = s["num_layers"]
    c.model.num_heads = s["num_heads"]
    c.model.vocab_size = s.get("vocab_size", c.model.vocab_size)
    c.model.dtype = dtype
    c.model.remat = False
    c.model.attention_impl = attention
    c.seq_len = s["seq_len"]
    c.batch_size = s["batch_size"] * num_devices
    c.num_steps = num_steps
    c.checkpoint_every = 0
    c.eval_every = 0
    c.progress = False
    c.data.source = "memory"    # never read: the batch is synthetic
    c.mesh.update(dict(data=num_devices, fsdp=1, model=1))
    return c


def measure_peak(n: int, dtype, device, *, reps: int = 1, runs: int = 5) -> dict:
    """Matmul FLOP/s of one device in `dtype`: median of `runs` calls of one jitted chain of
    `reps` [n,n]@[n,n] products (a chain, so that on an accelerator the time is the matmuls'
    and not the dispatch of one call). w is scaled by 1/√n so the chain stays finite."""
    ka, kb = jax.random.split(jax.random.key(0))
    x = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(dtype), device)
    w = jax.device_put((jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype),
                       device)

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(
            0, reps, lambda i, y: jnp.dot(y, w, preferred_element_type=dtype), x)

    t = harness.time_fn(lambda: chain(x, w), warmup=2, runs=runs)
    flops = 2 * n ** 3 * reps
    return {"n": n, "reps": reps, "dtype": jnp.dtype(dtype).name, "flops": flops,
            "flops_per_s": flops / t["median_s"], "time": t}


def synthetic_batch(config, rng: np.random.Generator) -> dict:
    """{"inputs", "targets", "weights"} [B, T] of random byte tokens (the shapes of the pipeline)."""
    B, T = config.batch_size, config.seq_len
    tokens = rng.integers(0, 256, size=(B, T + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones((B, T), np.float32)}


def attention_used(config, platform: str) -> str:
    """The dense attention the model runs on `platform`: "cudnn", "splash" or "xla" (see
    `layers.fused_attention`; the training layout: causal self-attention, no packing)."""
    m = config.model
    if m.attention_impl == "xla":
        return "xla"
    kernel, why = layers.dense_kernel(m.attention_impl, platform, dtype=m.dtype,
                                      head_dim=m.get("head_dim") or m.width // m.num_heads,
                                      seq_len=config.seq_len)
    # an explicit kernel that does not serve refuses the step (fused_attention): it is the
    # kernel asked for; under "auto" the XLA path runs instead
    return "xla" if why and m.attention_impl == "auto" else kernel


def time_step(config, devices, *, steps: int, warmup: int) -> dict:
    """One jitted, donated train step of `config` on a fixed synthetic batch already on the
    devices: {"time": harness.time_fn's median of `steps` runs after `warmup`, "compile_and_init_s",
    "loss" (the last step's), "flops": `matmul_flops_per_token`}. The state is freed on return."""
    t0 = time.perf_counter()
    r = trainer.setup(config, devices=devices)
    state = trainer.init_state(r)
    step_fn = trainer.make_train_step(r)
    batch = trainer.to_device(synthetic_batch(config, np.random.default_rng(0)), r.batch_sharding)
    flops = matmul_flops_per_token(config, state.params)
    box = {"state": state}
    del state

    def one_step():
        # The step donates its state, so each call consumes the previous call's output.
        box["state"], metrics = step_fn(box["state"], batch)
        return metrics

    jax.block_until_ready(one_step())   # compile
    compile_s = time.perf_counter() - t0
    t = harness.time_fn(one_step, warmup=warmup, runs=steps)
    loss = float(one_step()["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"benchmark train step produced loss={loss}")
    box.clear()
    return {"time": t, "compile_and_init_s": compile_s, "loss": loss, "flops": flops}


def real_loop(config, devices, *, steps: int, log_every: int, checkpoint_every: int,
              workdir: str) -> dict:
    """Tokens/s of `trainer.train` on the config's data for `steps` steps (see the module
    docstring): the median of its metrics rows' tokens_per_s after the first."""
    c = config.copy_and_resolve_references()
    c.num_steps, c.log_every, c.checkpoint_every = steps, log_every, checkpoint_every
    c.async_checkpoints, c.keep_checkpoints = True, 1
    c.data.source = "memory"
    out = trainer.train(c, workdir, devices=devices)
    rows = [json.loads(line) for line in
            (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    if len(tps) < 2:
        raise ValueError(f"loop_steps={steps} with log_every={log_every} gives {len(tps)} "
                         "metrics rows; need >= 2 (the first holds the compilation)")
    return {"steps": steps, "log_every": log_every, "checkpoint_every": checkpoint_every,
            "tokens_per_s_rows": tps[1:], "tokens_per_s": float(np.median(tps[1:])),
            "final_loss": out["final_loss"]}


def run(size: str = "small", *, steps: int = 5, warmup: int = 2, devices: int = 1,
        dtype: str | None = None, peak_n: int | None = None, out_dir=None,
        loop_steps: int = 20, log_every: int = 5, checkpoint_every: int = 10,
        attention: str = "auto") -> dict:
    """Measures and writes the benchmark; returns the JSON payload (without harness fields)."""
    all_devices = jax.devices()
    if devices < 0 or devices > len(all_devices):
        raise ValueError(f"devices={devices} is not allowed; use 0 (all) or 1..{len(all_devices)}")
    devs = all_devices if devices == 0 else all_devices[:devices]
    if steps < 1:
        raise ValueError(f"steps={steps} must be ≥ 1")
    if dtype is None:  # the compute dtype an accelerator user trains in
        dtype = "float32" if devs[0].platform == "cpu" else "bfloat16"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; use one of {sorted(_DTYPES)}")
    # A 2048³ product saturates a CPU; an accelerator needs bigger ones, chained, to reach its
    # peak (a single 2048³ bf16 product on an H200 measures ~120 of its ~800 TFLOP/s).
    on_cpu = devs[0].platform == "cpu"
    peak_n = peak_n or (2048 if on_cpu else 8192)
    peak_reps = 1 if on_cpu else 10

    # The peak is measured before and after the train step and the faster of the two kept: on a
    # shared machine contention only ever lowers a measurement.
    peak_before = measure_peak(peak_n, _DTYPES[dtype], devs[0], reps=peak_reps)

    # The real loop's length shapes the learning-rate schedule of the fixed-batch step too: the
    # schedule's length is a constant in the compiled step, so both are then one program, and
    # with JAX's persistent compilation cache on (benchmarks/accelerator.sh) the loop does not
    # compile it again.
    config = make_config(size, dtype=dtype, num_devices=len(devs), attention=attention,
                         num_steps=loop_steps)
    step = time_step(config, devs, steps=steps, warmup=warmup)
    t, flops = step["time"], step["flops"]
    used = attention_used(config, devs[0].platform)
    tokens_per_step = config.batch_size * config.seq_len
    spec = spec_peak(devs[0].device_kind, dtype)
    spec_total = spec * len(devs) if spec else None
    # the GPT-3 sizes write files of their own (trainer-125m-DEVICE.json), so one machine keeps both
    name = f"trainer-{size}" if size in ("125m", "350m") else "trainer"

    def save(peak_after, loop, xla_step, complete: bool) -> dict:
        """Writes the file from what is measured so far: after the step, after the real loop,
        and once the baseline and the second peak are in ("complete": true), so a run stopped
        by a time limit keeps what it measured."""
        peaks = [p for p in (peak_before, peak_after) if p is not None]
        peak = max(peaks, key=lambda p: p["flops_per_s"])
        peak = {**peak, "flops_per_s_before": peak_before["flops_per_s"],
                "flops_per_s_after": peak_after and peak_after["flops_per_s"]}
        tokens_per_s = tokens_per_step / t["median_s"]
        model_flops_per_s = tokens_per_s * flops["flops_per_token"]
        peak_total = peak["flops_per_s"] * len(devs)
        if loop is not None:
            loop = {**loop, "model_flops_per_s": loop["tokens_per_s"] * flops["flops_per_token"]}
            loop["mfu_spec"] = loop["model_flops_per_s"] / spec_total if spec_total else None
            loop["mfu_measured_peak"] = loop["model_flops_per_s"] / peak_total
        m = config.model
        baseline = None
        if xla_step is not None and "error" in xla_step:
            baseline = {"attention": "xla", **xla_step}
        elif xla_step is not None:
            xla_tps = tokens_per_step / xla_step["time"]["median_s"]
            baseline = {"attention": "xla", "step_time": xla_step["time"],
                        "compile_and_init_s": xla_step["compile_and_init_s"],
                        "tokens_per_s": xla_tps,
                        "mfu_spec": (xla_tps * flops["flops_per_token"] / spec_total
                                     if spec_total else None),
                        "mfu": xla_tps * flops["flops_per_token"] / peak_total,
                        # > 1: the step with `attention_used` is that much faster
                        "speedup": xla_step["time"]["median_s"] / t["median_s"]}
        payload = {
            "size": size,
            "shapes": {"batch_size": config.batch_size, "seq_len": config.seq_len,
                       "width": m.width, "num_layers": m.num_layers, "num_heads": m.num_heads,
                       "mlp": m.mlp, "vocab_size": m.vocab_size,
                       "tie_embeddings": m.tie_embeddings, "compute_dtype": dtype,
                       "param_dtype": "float32", "attention_impl": m.attention_impl,
                       "attention_used": used,
                       "devices_used": len(devs), "mesh": dict(config.mesh)},
            "flops_formula": ("6*N + 12*L*T*D per token (forward+backward; N = parameters in "
                              "matmuls, input embedding excluded when untied; attention counted "
                              "without the causal saving)"),
            **flops,
            "peak": peak,
            "step_time": t,
            "compile_and_init_s": step["compile_and_init_s"],
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_s,
            "model_flops_per_s": model_flops_per_s,
            "peak_flops_per_s_total": peak_total,
            # The ratio: model FLOP/s over the matmul peak measured above.
            "mfu": model_flops_per_s / peak_total,
            # ... and over the chip's specification (train/chips.py; null where none is listed).
            "spec_peak_flops_per_s_total": spec_total,
            "mfu_spec": model_flops_per_s / spec_total if spec_total else None,
            "real_loop": loop,
            "last_loss": step["loss"],
            # the same step with the XLA attention (only where `attention_used` is another)
            "step_with_xla_attention": baseline,
            "complete": complete,
        }
        harness.write_result(name, payload, out_dir=out_dir, echo=complete)
        return payload

    # The real loop (the MFU goal's measurement) before the baseline below: a time limit then
    # costs the comparison, not the loop.
    save(None, None, None, complete=False)
    with tempfile.TemporaryDirectory() as workdir:
        loop = real_loop(config, devs, steps=loop_steps, log_every=log_every,
                         checkpoint_every=checkpoint_every, workdir=workdir)
    # The same step with the XLA attention, where the model runs a fused kernel (cuDNN's on a
    # GPU, splash on a TPU): the baseline of the attention's share, timed in the same run.
    xla_step = None
    if used != "xla":
        save(None, loop, None, complete=False)
        # A baseline that fails (out of memory: the XLA attention's [B, H, T, T] scores) is
        # recorded with its error; the measurement of the run's own step is kept.
        try:
            xla_step = time_step(make_config(size, dtype=dtype, num_devices=len(devs),
                                             attention="xla", num_steps=loop_steps),
                                 devs, steps=steps, warmup=warmup)
        except Exception as e:  # noqa: BLE001 - a failed baseline is a result, not a crash
            xla_step = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    peak_after = measure_peak(peak_n, _DTYPES[dtype], devs[0], reps=peak_reps)
    return save(peak_after, loop, xla_step, complete=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--devices", type=int, default=1, help="devices to use (0: all local)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="compute dtype (default float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--peak-n", type=int, default=None,
                   help="matmul size for the peak (default 2048 on CPU, 8192 elsewhere)")
    p.add_argument("--loop-steps", type=int, default=20, help="steps of the real loop")
    p.add_argument("--log-every", type=int, default=5, help="real loop: steps between rows")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="real loop: steps between (asynchronous) checkpoints")
    p.add_argument("--attention", default="auto", choices=layers.DENSE_IMPLS,
                   help="dense attention: auto (cuDNN's flash attention on GPUs, splash on "
                        "TPUs, else xla), cudnn, splash or xla")
    p.add_argument("--out", default=None, help="results folder (default results/benchmarks)")
    a = p.parse_args(argv)
    res = run(a.size, steps=a.steps, warmup=a.warmup, devices=a.devices, dtype=a.dtype,
              peak_n=a.peak_n, out_dir=a.out, loop_steps=a.loop_steps, log_every=a.log_every,
              checkpoint_every=a.checkpoint_every, attention=a.attention)
    spec = (f", MFU {100 * res['mfu_spec']:.1f}% of the specification"
            if res["mfu_spec"] is not None else "")
    print(f"{res['size']}: step {res['tokens_per_s']:,.0f} tokens/s, "
          f"{res['model_flops_per_s'] / 1e9:.2f} model GFLOP/s, measured peak "
          f"{res['peak_flops_per_s_total'] / 1e9:.2f} GFLOP/s ({res['peak']['dtype']}), "
          f"MFU {100 * res['mfu']:.1f}%{spec}; real loop "
          f"{res['real_loop']['tokens_per_s']:,.0f} tokens/s "
          f"(MFU {100 * res['real_loop']['mfu_measured_peak']:.1f}% of the measured peak)")
    if res["step_with_xla_attention"] is not None:
        print(f"{res['shapes']['attention_used']} attention: step "
              f"{res['step_with_xla_attention']['speedup']:.2f}x that with the XLA attention")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
