"""MAC: cost of adapting to one document, and of aggregating a growing bank.

    python -m benchmarks.mac [--variant tiny|paper] [--banks 16,64,256] [--window 16]
    python -m benchmarks.mac --variant paper --banks 16,64 --runs 3   # the paper's proportions

`tiny` (the CPU figure's sizes) has g about as large as the base LM, so the time ratio says
little; `paper` has the paper's proportions (a T5-small-sized g, 512 wide with 6+6 blocks, vs a
GPT-2-small-sized base LM, 768 wide with 12 layers) and is cheap enough to time on a CPU.

1. Per adapted document: MAC's one amortization forward (g on the document, written to the bank)
   vs one fine-tuning step of the base LM on the same document (forward + backward + Adam), the
   in-repo baseline; median wall time and the compiled programs' temp memory.
2. Aggregation (h over the bank, one question batch) vs bank size, flat vs hierarchical.

Writes results/benchmarks/mac-DEVICE.json (tiny) or mac-VARIANT-DEVICE.json. Parameters are
random: timings do not depend on them.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from benchmarks.harness import time_fn, write_result
from memory import bank as bank_lib
from models.mac import MAC, slot_keys
from train.configs import mac as mac_configs
from train.objectives import mac as obj


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="tiny", choices=mac_configs.VARIANTS)
    p.add_argument("--banks", default="16,64,256")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args(argv)
    c = mac_configs.get_config(a.variant)
    cfg = obj.mac_config(c.model)
    S = c.data.doc_length
    params = obj.init_mac(cfg, jax.random.key(0), doc_len=S, q_len=c.data.question_length)
    lm_params = obj.init_lm(cfg.lm, jax.random.key(1))
    doc = jax.random.randint(jax.random.key(2), (1, S), 0, 256, jnp.int32)
    bank = bank_lib.init(1, cfg.width, (cfg.num_tokens, cfg.width))

    @jax.jit
    def adapt_mac(params, bank, doc):
        phi = MAC(cfg).apply({"params": params}, doc, method=MAC.amortize)
        return bank_lib.write(bank, slot_keys(phi), phi)

    # the streaming-QA baseline's step (train/objectives/mac.py: uniform fine-tuning)
    opt_state = obj.finetune_init(lm_params, 1e-3)

    t_mac = time_fn(lambda: adapt_mac(params, bank, doc), runs=a.runs)
    t_ft = time_fn(lambda: obj.finetune_step(cfg, lm_params, opt_state, doc), runs=a.runs)
    mem_mac = _temp_bytes(adapt_mac.lower(params, bank, doc).compile())
    mem_ft = _temp_bytes(obj.finetune_step.lower(cfg, lm_params, opt_state, doc).compile())

    qs = jax.random.randint(jax.random.key(3), (a.questions, c.data.question_length), 0, 256)
    agg = {}
    for n in [int(x) for x in a.banks.split(",")]:
        mem = jax.random.normal(jax.random.key(4), (n, cfg.num_tokens, cfg.width))
        row = {}
        for name, w in (("flat", 0), ("hierarchical", a.window)):
            f = jax.jit(lambda p, q, m, w=w: MAC(cfg).apply({"params": p}, q, m, window=w,
                                                            method=MAC.aggregate))
            row[name] = time_fn(lambda: f(params, qs, mem), runs=a.runs)["median_s"]
            row[name + "_temp_bytes"] = _temp_bytes(f.lower(params, qs, mem).compile())
        agg[str(n)] = row
    write_result("mac" if a.variant == "tiny" else f"mac-{a.variant}", {
        "variant": a.variant,
        "shapes": {"doc_len": S, "T": cfg.num_tokens, "D": cfg.width, "L": cfg.lm.num_layers,
                   "questions": a.questions, "window": a.window},
        "params": {"mac_g": sum(x.size for k in ("doc_encoder", "slot_mlp")
                                for x in jax.tree_util.tree_leaves(params[k])),
                   "mac_total": sum(x.size for x in jax.tree_util.tree_leaves(params)),
                   "base_lm": sum(x.size for x in jax.tree_util.tree_leaves(lm_params))},
        "adapt_per_document": {
            "mac_amortize_s": t_mac["median_s"], "finetune_step_s": t_ft["median_s"],
            "time_ratio_mac_over_ft": t_mac["median_s"] / t_ft["median_s"],
            "mac_temp_bytes": mem_mac, "finetune_temp_bytes": mem_ft},
        "aggregation_s": agg,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
