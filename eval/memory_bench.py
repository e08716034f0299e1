"""The memory benchmark: every memory family on the same recall probes, at equal parameters and
tokens (the `memory_bench` figure).

    python -m eval.figures --only memory_bench --size quick|cpu [--seed S] [--results DIR]
    python -m eval.memory_bench --table results/figures     # the README's table (cpu files)

Each model of train/configs/memory_bench.py is trained once per seed through the shared trainer
on the probes' training mixture (train/data/memory_bench.py), then every probe's held-out test
split is evaluated at every difficulty of its sweep: the answer-token accuracy (argmax under
teacher forcing at the answer tokens) and the exact-match rate (every answer token right, what
greedy decoding would write). How each model reads a prompt:

- dense / sliding_window: one causal pass over the whole prompt (past T: RoPE positions it never
  trained on; the window model sees only the last T tokens);
- landmark: the block memory (`landmark_memory.memory_logits`: chunks of T/2 tokens, TOP_K
  blocks retrieved per token and head, a cache holding the whole prompt);
- ssm_causal, hawk: one causal pass (the recurrence carries a fixed-size state);
- ssm_bidir, transformer_birdie: one pass with the prompt as the bidirectional prefix (equal to
  prefill + decoding);
- mac: the prompt's facts as documents of a bank, the question to its frozen LM
  (eval/memory_bench_mac.py; its bytes per context token = the bank's bytes / the context).

Costs, measured in the same run (`measure_costs`): training tokens/s (the median of the run's
metrics.jsonl rows after the first), inference memory per token of context (the bytes of the
cache / state a model keeps after reading the longest passkey prompt C, divided by C: a dense
KV cache of C tokens, a window's ring of T, the landmark block cache of C/mem_freq blocks, the SSMs'
fixed state) and seconds per generated token with that context (the median of one jitted
one-token decoding step, batch 1).

JSON: {"accuracy": {probe: {model: answer-token accuracy at the probe's hardest setting}},
"exact_match" (the same for exact match), "curves": {probe: {"difficulty": [...],
"no_binding": [...], model: {"accuracy": [...], "exact_match": [...]}}}, "cost": {model: {...}},
"params": {model: count} (MAC: its frozen LM's), "mac_network_params" (MAC's g, h and prefix
network), "tokens_seen": {model: tokens}, "no_binding": {probe: level at the
hardest setting}, "final_loss": {model: loss}}.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval import cli, figures
from eval import memory_bench_mac as mb_mac
from train import config_identity
from train import metrics as metrics_lib
from train import trainer
from train.configs import memory_bench as mbc
from train.data import memory_bench as mb_data

PROBE_AXES = {"mqar": ("eval_pairs", "key-value pairs"),
              "passkey": ("eval_lengths", "prompt length (bytes)"),
              "phonebook": ("eval_entries", "phone-book entries"),
              "streamqa": ("eval_documents", "documents in the stream")}
EVAL_BATCH = 16


def validate_size(size: str) -> None:
    """Checks the figure at `size` before any training: every model's trainer config, the
    mixture (each training range fits T) and every swept difficulty. A ValueError names the field,
    its value and what is allowed."""
    if size not in mbc.SIZES:
        raise ValueError(f"size={size!r} is not allowed; use one of {sorted(mbc.SIZES)}")
    for name in mbc.MODELS:
        c = mbc.bench_config(name, size, 0)
        trainer.validate_config(c)
        trainer.build_model(c.model)
    from train.data import pipeline
    pipeline.memory_bench_spec(c.data, c.seq_len)
    s = mbc.SIZES[size]
    from train.data import memory_bench_mac
    for probe, (field, _) in PROBE_AXES.items():
        for d in s[field]:
            ex = mb_data.probe_example(probe, "test", d, 0, 0)   # raises if impossible
            memory_bench_mac.mac_parts(probe, ex, s["mac_doc_length"])
    if s["eval_examples"] < 1:
        raise ValueError(f"SIZES[{size!r}].eval_examples={s['eval_examples']} is not allowed; "
                         "use >= 1")


def figure_settings(size: str) -> dict:
    """The recipe at `size`: SIZES[size] and every model's trainer config at seed 0."""
    return {"size": mbc.SIZES[size], "top_k": mbc.TOP_K,
            "configs": {n: mbc.bench_config(n, size, 0).to_dict() for n in mbc.MODELS}}


def run_dir(name: str, size: str, seed: int, out: pathlib.Path) -> pathlib.Path:
    """OUT/runs/memory_bench-NAME-SIZE-seedS-HASH (a changed recipe trains into a new folder)."""
    h = config_identity.recipe_hash([mbc.bench_config(name, size, seed)])
    return pathlib.Path(out) / "runs" / f"memory_bench-{name}-{size}-seed{seed}-{h}"


def _param_shapes(name: str, size: str):
    """The variables of model `name`'s trainer build at `size`, as shapes (jax.eval_shape:
    nothing is allocated)."""
    c = mbc.bench_config(name, size, 0)
    model = trainer.build_model(c.model)
    return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, c.seq_len), jnp.int32)))


def _size(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


@functools.lru_cache(maxsize=None)
def count_params(name: str, size: str) -> int:
    """Parameters of model `name` at `size`, from shapes only."""
    if name in ("sliding_window", "mac"):   # the dense run's parameters (MAC: its frozen LM)
        return count_params("dense", size)
    return _size(_param_shapes(name, size))


@functools.lru_cache(maxsize=None)
def mac_network_params(size: str) -> int:
    """Parameters of MAC's trained networks (g, h, the prefix FFN) at `size`, its frozen LM
    left out (shapes only)."""
    return _size(_param_shapes("mac", size)["params"]["mac"])


# ---------------------------------------------------------------------------------------------
# Reading a prompt: model name → logits [B, n, V] of tokens [B, n]
# ---------------------------------------------------------------------------------------------
def eval_model(name: str, size: str):
    """The module that evaluates model `name` (the window view for sliding_window)."""
    return trainer.build_model(mbc.model_config(name, size))


def _jitted(model, with_prefix: bool):
    if with_prefix:
        return jax.jit(lambda p, x, pre: model.apply({"params": p}, x, prefix=pre))
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def longest_prompt(size: str) -> int:
    """The most tokens any evaluated example at `size` has."""
    s = mbc.SIZES[size]
    return max(mb_data.probe_length(probe, d) for probe, (field, _) in PROBE_AXES.items()
               for d in s[field])


def logits_fn(name: str, size: str):
    """fn(params, tokens [B, n] int32, prefix [B, n] bool) → logits [B, n, V] (numpy)."""
    model = eval_model(name, size)
    if name == "landmark":
        from models import landmark_memory
        chunk = mbc.SIZES[size]["seq_len"] // 2
        # One cache size for every prompt (one compiled step): room for the longest.
        blocks = max(longest_prompt(size) // model.config.mem_freq, mbc.TOP_K)

        def fn(params, tokens, prefix):
            del prefix
            return np.asarray(landmark_memory.memory_logits(
                params, model.config, tokens, chunk_len=chunk, top_k=mbc.TOP_K,
                cache_blocks=blocks))
        return fn
    if name in mbc.BIRDIE_MODELS:
        f = _jitted(model, True)
        return lambda params, tokens, prefix: np.asarray(f(params, tokens, prefix))
    f = _jitted(model, False)
    return lambda params, tokens, prefix: np.asarray(f(params, tokens))


def probe_batches(probe: str, difficulty: int, num: int, seed: int, pad_to: int = 0):
    """The first `num` test examples of (probe, difficulty) as arrays padded at the end to
    max(pad_to, the setting's longest), EVAL_BATCH rows at a time: (examples, tokens [B, n],
    answer [B, n], prefix [B, n]). Padding after the answer changes no prediction (every model
    is causal after the prompt), so one padded length serves a whole sweep: one compilation."""
    n = max(pad_to, mb_data.probe_length(probe, difficulty))
    for start in range(0, num, EVAL_BATCH):
        exs = [mb_data.probe_example(probe, "test", difficulty, i, seed)
               for i in range(start, min(start + EVAL_BATCH, num))]
        tokens = np.zeros((len(exs), n), np.int32)
        answer = np.zeros((len(exs), n), bool)
        prefix = np.zeros((len(exs), n), bool)
        for r, ex in enumerate(exs):
            k = ex["tokens"].size
            tokens[r, :k], answer[r, :k] = ex["tokens"], ex["answer"]
            prefix[r, :ex["prefix_len"]] = True
        yield exs, tokens, answer, prefix


def probe_accuracy(fn, params, probe: str, difficulty: int, num: int, seed: int, *,
                   pad_to: int = 0) -> dict:
    """{"accuracy": answer-token accuracy, "exact_match": share of examples all right,
    "no_binding": the probe's floor on the same examples}."""
    hits = total = exact = 0.0
    examples = []
    for exs, tokens, answer, prefix in probe_batches(probe, difficulty, num, seed, pad_to):
        pred = fn(params, tokens[:, :-1], prefix[:, :-1]).argmax(-1)
        right = (pred == tokens[:, 1:]) | ~answer[:, 1:]
        hits += float((right & answer[:, 1:]).sum())
        total += float(answer[:, 1:].sum())
        exact += float(right.all(-1).sum())
        examples.extend(exs)
    return {"accuracy": hits / total, "exact_match": exact / len(examples),
            "no_binding": mb_data.no_binding(probe, examples)}


# ---------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------
def _nbytes(tree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def train_tokens_per_s(workdir) -> float:
    """The median tokens/s of a run's metrics.jsonl rows, the first (compilation) left out."""
    rows = [r["tokens_per_s"] for r in metrics_lib.read_metrics(workdir) if "tokens_per_s" in r]
    return float(statistics.median(rows[1:] or rows))


def final_loss(workdir) -> float:
    """The training loss of a run's last metrics.jsonl row that has one (a finished run reused
    from an earlier figure run included)."""
    rows = [r["loss"] for r in metrics_lib.read_metrics(workdir) if "loss" in r]
    if not rows:
        raise ValueError(f"workdir={str(workdir)!r} has no training loss in metrics.jsonl")
    return float(rows[-1])


def measure_costs(name: str, size: str, params, context: int, *, runs: int = 5) -> dict:
    """{"bytes_per_context_token", "state_bytes", "seconds_per_token", "context"} of model
    `name` after reading `context` tokens (batch 1; see the module docstring)."""
    from models import landmark_memory, ssm, transformer
    model = eval_model(name, size)
    tok = jnp.zeros((1,), jnp.int32)
    if name in ("dense", "sliding_window", "transformer_birdie"):
        cfg = model.cfg
        keep = min(context, cfg.window) if cfg.window else context
        state_bytes = _nbytes(jax.eval_shape(lambda: transformer.init_cache(cfg, 1, keep)))
        # The window model decodes with a ring cache of its W slots (models/transformer.py
        # KVCache): its time is that of W keys; the dense one's cache holds every token read.
        cache = transformer.init_cache(cfg, 1, keep if cfg.window else context + 1)._replace(
            length=jnp.asarray(context, jnp.int32))
        step = jax.jit(lambda p, t, c: model.apply({"params": p}, t[:, None], kv_cache=c))
        fn = lambda: step(params, tok, cache)                          # noqa: E731
    elif name == "landmark":
        lc = model.config
        blocks = max(context // lc.mem_freq, mbc.TOP_K)
        caches = landmark_memory.init_caches(lc, 1, blocks)
        state_bytes = _nbytes(caches)
        chunk = mbc.SIZES[size]["seq_len"] // 2
        sel = landmark_memory.selection_index("per_token_and_head")
        kw = dict(config=lc, top_k=mbc.TOP_K, positions="lm_benchmark")
        prompt = np.zeros((1, chunk), np.int32)
        for _ in range(0, context, chunk):                           # fill the block memory
            _, caches = landmark_memory._step_greedy(params, prompt, caches, chunk, sel, **kw)
        fn = lambda: landmark_memory._step_greedy(params, tok[:, None], caches, 1, sel,  # noqa
                                                  **kw)
    else:
        state = ssm.init_decode_state(model.cfg, 1)
        state_bytes = _nbytes(state)
        step = jax.jit(lambda p, s, t: model.apply({"params": p}, s, t, method=ssm.BiSSMLM.step))
        fn = lambda: step(params, state, tok)                          # noqa: E731
    return {"context": context, "state_bytes": state_bytes,
            "bytes_per_context_token": state_bytes / context,
            "seconds_per_token": _median_seconds(fn, runs)}


def _median_seconds(fn, runs: int) -> float:
    """The median wall time of `runs` calls of fn (its result waited for), after two untimed
    calls (compilation, warm-up)."""
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------
def run_bench(size: str, seed: int, out: pathlib.Path) -> dict:
    """Trains every model (or reuses its finished run under OUT/runs), evaluates and measures."""
    s = mbc.SIZES[size]
    trained, result = {}, {"accuracy": {}, "exact_match": {}, "curves": {}, "cost": {},
                           "params": {}, "tokens_seen": {}, "no_binding": {}, "final_loss": {}}
    for name in mbc.MODELS:
        c = mbc.bench_config(name, size, seed)
        workdir = run_dir(name, size, seed, out)
        if name == "mac":
            # MAC's stage 1 is the dense run (config.base_lm = the dense config): linked, so the
            # trainer finds it finished and starts params["lm"] from it.
            workdir.mkdir(parents=True, exist_ok=True)
            if not (workdir / "base_lm").exists():
                (workdir / "base_lm").symlink_to(trained["dense"][1].resolve(),
                                                 target_is_directory=True)
        summary = trainer.train(c, workdir)
        trained[name] = (jax.device_get(summary["state"].params), workdir)
        result["final_loss"][name] = final_loss(workdir)
    context = max(s["eval_lengths"])
    for name in mbc.EVAL_MODELS:
        params, workdir = trained["dense" if name == "sliding_window" else name]
        result["params"][name] = count_params(name, size)
        # MAC: its frozen LM's tokens (the dense run's); g and h read the same examples.
        result["tokens_seen"][name] = s["num_steps"] * s["batch_size"] * s["seq_len"]
        fn = None if name == "mac" else logits_fn(name, size)
        for probe, (field, _) in PROBE_AXES.items():
            curve = result["curves"].setdefault(probe, {"difficulty": list(s[field])})
            pad_to = max(mb_data.probe_length(probe, d) for d in s[field])
            if name == "mac":
                rows = [mb_mac.probe_accuracy(params, probe, d, s["eval_examples"], seed, size)
                        for d in s[field]]
            else:
                rows = [probe_accuracy(fn, params, probe, d, s["eval_examples"], seed,
                                       pad_to=pad_to) for d in s[field]]
            curve[name] = {"accuracy": [r["accuracy"] for r in rows],
                           "exact_match": [r["exact_match"] for r in rows]}
            curve["no_binding"] = [r["no_binding"] for r in rows]
            result["accuracy"].setdefault(probe, {})[name] = rows[-1]["accuracy"]
            result["exact_match"].setdefault(probe, {})[name] = rows[-1]["exact_match"]
            result["no_binding"][probe] = rows[-1]["no_binding"]
        if name == "mac":
            result["mac_network_params"] = mac_network_params(size)
            cost = mb_mac.measure_costs(params, size, context,
                                        lambda f: _median_seconds(f, 5))
        else:
            cost = measure_costs(name, size, params, context)
        cost["train_tokens_per_s"] = train_tokens_per_s(workdir)
        result["cost"][name] = cost
    return result


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    probes = [p for p in PROBE_AXES if p in result["curves"]]
    fig, axes = plt.subplots(1, len(probes) + 1, figsize=(4.2 * (len(probes) + 1), 3.6))
    models = list(result["cost"])
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    for ax, probe in zip(axes, probes):
        curve = result["curves"][probe]
        x = curve["difficulty"]
        for m in models:
            ax.plot(x, curve[m]["accuracy"], "o-", color=colors[m], label=m, ms=3)
        ax.plot(x, curve["no_binding"], "k:", label="no binding")
        ax.set(xscale="log", xlabel=PROBE_AXES[probe][1], ylabel="answer-token accuracy",
               title=probe, ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for m in models:
        b = result["cost"][m]["bytes_per_context_token"]
        ax.scatter([b], [np.mean([result["accuracy"][p][m] for p in probes])], color=colors[m],
                   label=m)
        ax.annotate(m, (b, np.mean([result["accuracy"][p][m] for p in probes])), fontsize=7)
    ctx = next(iter(result["cost"].values()))["context"]
    ax.set(xscale="log", xlabel=f"inference bytes per context token (context {ctx})",
           ylabel="mean accuracy at the hardest settings", title="cost", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def csv_rows(result: dict):
    for probe, curve in result["curves"].items():
        for m in result["cost"]:
            for i, d in enumerate(curve["difficulty"]):
                yield [probe, m, d, curve[m]["accuracy"][i], curve[m]["exact_match"][i],
                       curve["no_binding"][i]]


@figures.register("memory_bench", settings=figure_settings, in_demo=False)
def memory_bench_figure(*, size: str, seed: int, out: pathlib.Path, **_) -> dict:
    validate_size(size)
    out = pathlib.Path(out)
    result = run_bench(size, seed, out)
    print(json.dumps({"params": result["params"]}), flush=True)
    figures.write_csv(out / "memory_bench.csv",
                      ["probe", "model", "difficulty", "accuracy", "exact_match", "no_binding"],
                      csv_rows(result))
    plot(result, out / "memory_bench.png")
    return result


# ---------------------------------------------------------------------------------------------
# The README table
# ---------------------------------------------------------------------------------------------
def table(results: pathlib.Path, size: str = "cpu") -> str:
    """Markdown: a row per model, per probe the accuracy at the hardest setting on each committed
    seed (results/memory_bench-SIZE-seedS.json), then the costs of the first seed's run."""
    docs = [json.loads(p.read_text())
            for p in sorted(pathlib.Path(results).glob(f"memory_bench-{size}-seed*.json"))]
    if not docs:
        raise ValueError(f"results={str(results)!r} holds no memory_bench-{size}-seed*.json")
    seeds = [d["provenance"]["seed"] for d in docs]
    # Files of an older model or probe set: what a file lacks is shown as absent ("—").
    probes = [p for p in PROBE_AXES if any(p in d["accuracy"] for d in docs)]
    probes += [p for d in docs for p in d["accuracy"] if p not in probes]
    hardest = {p: next(d["curves"][p]["difficulty"][-1] for d in docs if p in d["curves"])
               for p in probes}
    models = []
    for d in docs:
        models += [m for m in d["cost"] if m not in models]

    def acc(d, p, m):
        v = d["accuracy"].get(p, {}).get(m)
        return "—" if v is None else f"{v:.3f}"

    def floor(d, p):
        v = d["no_binding"].get(p)
        return "—" if v is None else f"{v:.3f}"
    head = (["model", "params"] + [f"{p} @ {hardest[p]} (seeds {'/'.join(map(str, seeds))})"
                                   for p in probes]
            + ["train tok/s", "bytes / ctx token", "ms / token"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        first = next(d for d in docs if m in d["cost"])
        cost = first["cost"][m]
        cells = [m, f"{first['params'][m]:,}"]
        cells += [" / ".join(acc(d, p, m) for d in docs) for p in probes]
        cells += [f"{cost['train_tokens_per_s']:,.0f}", f"{cost['bytes_per_context_token']:.2f}",
                  f"{1e3 * cost['seconds_per_token']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    floors = ["no binding", ""] + [" / ".join(floor(d, p) for d in docs)
                                   for p in probes] + ["", "", ""]
    lines.append("| " + " | ".join(floors) + " |")
    ctx = next(iter(docs[0]["cost"].values()))["context"]
    commits = sorted({d["provenance"]["git_commit"][:7] for d in docs
                      if d["provenance"].get("git_commit")})
    return ("\n".join(lines) + f"\n\nAnswer-token accuracy at each probe's hardest setting; costs "
            f"at a context of {ctx} tokens (seed {seeds[0]}'s run). From "
            f"`results/figures/memory_bench-{size}-seed*.json` (commit {', '.join(commits)}).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The memory_bench README table")
    p.add_argument("--table", required=True, help="folder of memory_bench-SIZE-seedS.json")
    p.add_argument("--size", default="cpu")
    a = p.parse_args(argv)
    print(table(pathlib.Path(a.table), a.size))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
