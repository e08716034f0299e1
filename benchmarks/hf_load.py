"""Peak host memory of a sharded Hugging Face load: `python -m benchmarks.hf_load --checkpoint DIR`

`models.pretrained.from_hf(DIR, mesh=...)` reads the checkpoint tensor by tensor into its
shardings on a mesh of 8 fake CPU devices (fsdp × model as --mesh says; on CPU the shards live in
host memory, so the placed model itself is 1× the checkpoint). The baseline, in the same run:
the whole state dict read at once (`safetensors.numpy.load_file` of every shard), then placed.
Each mode runs in a fresh subprocess; its peak resident set (ru_maxrss) is reported beside the
resident set before loading and the checkpoint's size on disk, into
results/benchmarks/hf_load-cpu.json. The checkpoint comes from
`tools/make_hf_fixtures.py --big_llama_params 1e9 --out DIR` (not committed: ~4 GB).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

from benchmarks.harness import write_result

_CHILD = r"""
import json, os, resource, sys, time
import jax, numpy as np
from jax.sharding import AxisType
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mode, ckpt, fsdp, model_axis = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
mesh = jax.make_mesh((8 // (fsdp * model_axis), fsdp, model_axis), ("data", "fsdp", "model"),
                     axis_types=(AxisType.Auto,) * 3)
from models import pretrained
from train import sharding
jax.block_until_ready(jax.device_put(np.zeros(8), jax.devices()[0]))
before = rss()
t0 = time.perf_counter()
if mode == "tensorwise":
    model, params = pretrained.from_hf(ckpt, mesh=mesh, rules=sharding.DEFAULT_RULES)
else:
    import flax.linen as nn
    from flax import traverse_util
    from safetensors.numpy import load_file
    state = {}
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(ckpt, f)))
    hf = pretrained.read_config(ckpt)
    cfg = pretrained.llama_config(hf)
    model = pretrained.Transformer(cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 1), np.int32)))
    specs = nn.get_partition_spec(abstract["params"])
    shardings = traverse_util.flatten_dict(
        sharding.logical_to_mesh_sharding(specs, mesh, sharding.DEFAULT_RULES))
    params = [jax.device_put(a, shardings[p])
              for p, a in pretrained._llama_convert(cfg, state.__getitem__)]
jax.block_until_ready(params)
n = sum(x.size for x in jax.tree_util.tree_leaves(params))
print(json.dumps({"mode": mode, "rss_before_bytes": before, "peak_rss_bytes": rss(),
                  "seconds": time.perf_counter() - t0, "num_params": n}))
"""


def run_mode(mode: str, checkpoint: str, fsdp: int, model_axis: int) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, checkpoint, str(fsdp),
                          str(model_axis)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a LLaMA save_pretrained directory")
    p.add_argument("--fsdp", type=int, default=8)
    p.add_argument("--model", type=int, default=1)
    p.add_argument("--no_baseline", action="store_true", help="skip the whole-state-dict load")
    a = p.parse_args(argv)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(a.checkpoint, "*.safetensors")))
    rows = [run_mode("tensorwise", a.checkpoint, a.fsdp, a.model)]
    if not a.no_baseline:
        rows.append(run_mode("whole_state_dict", a.checkpoint, a.fsdp, a.model))
    for r in rows:
        r["peak_over_checkpoint"] = r["peak_rss_bytes"] / size
        r["added_over_checkpoint"] = (r["peak_rss_bytes"] - r["rss_before_bytes"]) / size
    write_result("hf_load", {"checkpoint_bytes": size, "mesh": {"devices": 8, "fsdp": a.fsdp,
                                                                 "model": a.model},
                             "bar": "peak_over_checkpoint < 1.3 (issue 17)", "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
