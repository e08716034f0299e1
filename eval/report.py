"""Regenerate the README's result tables from the committed result files.

    python -m eval.report            # rewrite every marked section of README.md
    python -m eval.report --check    # exit 1 (one line) if README.md differs from that

README.md marks each generated section with a pair of HTML comments

    <!-- report:KEY -->
    ...table written here...
    <!-- /report:KEY -->

and KEY names a builder in BUILDERS: one per registered figure (reading
`results/figures/KEY-SIZE-seedS.json`, written by `python -m eval.figures --results
results/figures`; a column per committed size and seed) and `benchmarks` (reading
`results/benchmarks/*.json`, written by `benchmarks/harness.py`). A builder with no files yet
writes a one-line "no committed results yet" instead of a table. `dryrun` reads
`results/dryrun/CONFIG-N.json` (written by `python -m train.dryrun --out`). So a number inside a
marked section comes from a committed file, and `--check` (run by the tests) fails when the two
disagree.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from typing import Any, Callable, Iterable, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE_ORDER = ("quick", "cpu", "paper")   # eval.figures.SIZES, without importing the figures
MARKERS = re.compile(r"(<!-- report:(?P<key>[\w-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=key) -->)",
                     re.S)
OPENERS = re.compile(r"<!-- report:([\w-]+) -->")

Row = tuple[str, Callable[[dict], str]]    # (label, cell of one result document)


# ---------------------------------------------------------------------------------------------
# Reading result files
# ---------------------------------------------------------------------------------------------
def load_json(path: pathlib.Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"result file {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"result file {path} holds a {type(doc).__name__}; expected an object")
    return doc


def figure_results(results: pathlib.Path, name: str) -> list[tuple[pathlib.Path, dict]]:
    """(path, document) of every results/figures/NAME-SIZE-seedS.json, ordered by size, seed and
    options; each must hold a provenance with size and seed."""
    pattern = re.compile(rf"{re.escape(name)}-(?P<size>[a-z]+)-seed(?P<seed>\d+)\.json")
    found = []
    for path in sorted((results / "figures").glob(f"{name}-*-seed*.json")):
        if not pattern.fullmatch(path.name):
            continue
        doc = load_json(path)
        prov = doc.get("provenance")
        if not isinstance(prov, dict) or "size" not in prov or "seed" not in prov:
            raise ValueError(f"result file {path} has no provenance with size and seed")
        found.append((path, doc))

    def order(item):
        prov = item[1]["provenance"]
        size = prov["size"]
        rank = SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER)
        return rank, size, int(prov["seed"]), json.dumps(prov.get("options", {}), sort_keys=True)

    return sorted(found, key=order)


def column_label(doc: dict) -> str:
    """`size`, seed S (and the options, e.g. a class order, when the run had any)."""
    prov = doc["provenance"]
    label = f"`{prov['size']}`, seed {prov['seed']}"
    for k, v in sorted(prov.get("options", {}).items()):
        v = ",".join(str(x) for x in v) if isinstance(v, list) else v
        label += f", {k} {v}"
    return label


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def fmt(x: Any, digits: int = 3) -> str:
    """A number as the README writes it: `digits` decimals for floats, integers as they are."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    raise ValueError(f"value={x!r} is not a number; allowed: int, float")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cell(get: Callable[[dict], Any], digits: int = 3) -> Callable[[dict], str]:
    """A row's cell: `get(doc)` formatted, or "–" where that run lacks the key."""
    def f(doc):
        try:
            return fmt(get(doc), digits)
        except (KeyError, IndexError, TypeError):
            return "–"
    return f


def curve(get: Callable[[dict], dict], xs: Sequence[str], digits: int = 3) -> Callable[[dict], str]:
    """A row's cell: the values of the dict `get(doc)` at `xs`, joined by " / "."""
    def f(doc):
        try:
            d = get(doc)
        except (KeyError, TypeError):
            return "–"
        return " / ".join(fmt(d[x], digits) if x in d else "–" for x in xs)
    return f


def numeric_keys(dicts: Iterable[dict]) -> list[str]:
    """The union of the dicts' keys, sorted as numbers (keys are str(int) in JSON)."""
    keys = {k for d in dicts for k in d}
    return sorted(keys, key=lambda k: (float(k), k))


def ordered(keys: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """`keys` with those in `preferred` first, in its order, then the rest sorted."""
    keys = set(keys)
    return [k for k in preferred if k in keys] + sorted(keys - set(preferred))


def source_line(name: str, docs: Sequence[tuple[pathlib.Path, dict]]) -> str:
    commits = []
    for _, doc in docs:
        prov = doc["provenance"]
        c = (prov.get("git_commit") or "unknown")[:7] + (" (dirty)" if prov.get("dirty") else "")
        if c not in commits:
            commits.append(c)
    devices = sorted({doc["provenance"].get("device", {}).get("device_kind", "unknown")
                      for _, doc in docs})
    return (f"From `results/figures/{name}-*.json` ({len(docs)} files; commit "
            f"{', '.join(commits)}; device {', '.join(devices)}).")


def seed_table(name: str, results: pathlib.Path,
               rows_for: Callable[[list[dict]], tuple[str, list[Row]]]) -> str:
    """A table with a column per committed result file of figure `name`; rows_for(docs) gives
    the first column's header and the rows."""
    found = figure_results(results, name)
    if not found:
        return f"`{name}`: no committed results yet (`results/figures/{name}-SIZE-seedS.json`)."
    docs = [d for _, d in found]
    first, rows = rows_for(docs)
    table = markdown_table([first] + [column_label(d) for d in docs],
                           [[label] + [get(d) for d in docs] for label, get in rows])
    return table + "\n\n" + source_line(name, found)


# ---------------------------------------------------------------------------------------------
# One builder per figure (the keys each figure function returns)
# ---------------------------------------------------------------------------------------------
def lm_mqar_rows(docs):
    return "`lm_mqar`", [
        ("test answer accuracy", cell(lambda d: d["accuracy"])),
        ("no_binding (a uniformly drawn value of the example's own pairs)",
         cell(lambda d: d["no_binding"])),
        ("final train loss", cell(lambda d: d["final_loss"])),
    ]


def passkey_rows(docs):
    xs = numeric_keys(a for d in docs for a in d["accuracy"].values())
    methods = ordered({m for d in docs for m in d["accuracy"]},
                      ("landmark_memory", "landmark_full", "baseline"))
    return (f"passkey accuracy at {' / '.join(xs)} tokens",
            [(m, curve(lambda d, m=m: d["accuracy"][m], xs)) for m in methods]
            + [("trials per length", cell(lambda d: d["trials"]))])


def perplexity_rows(docs):
    xs = numeric_keys(p for d in docs for p in d["perplexity"].values())
    settings = ordered({s for d in docs for s in d["perplexity"]},
                       ("baseline_full", "landmark_full", "landmark_k2", "landmark_k4",
                        "landmark_k4_cache8"))
    return (f"perplexity at {' / '.join(xs)} tokens",
            [(s, curve(lambda d, s=s: d["perplexity"][s], xs, 2)) for s in settings])


def birdie_recall_rows(docs):
    xs = numeric_keys(a for d in docs for a in d["accuracy"].values())
    models = ordered({m for d in docs for m in d["accuracy"]},
                     ("transformer_ntp", "transformer_birdie", "gated_ntp", "gated_bidir",
                      "gated_birdie", "gated_birdie_causal"))
    return (f"answer accuracy at {' / '.join(xs)} pairs",
            [(m, curve(lambda d, m=m: d["accuracy"][m], xs)) for m in models]
            + [("no_binding (a random value from the prompt)",
                curve(lambda d: d["no_binding_baseline"], xs))])


def birdie_phonebook_rows(docs):
    xs = numeric_keys(a for d in docs for a in d["digit_accuracy"].values())
    models = sorted({m for d in docs for m in d["digit_accuracy"]})
    return (f"at {' / '.join(xs)} queried names",
            [(f"{m}, digit accuracy", curve(lambda d, m=m: d["digit_accuracy"][m], xs))
             for m in models]
            + [(f"{m}, exact match", curve(lambda d, m=m: d["exact_match"][m], xs))
               for m in models])


def dkvb_toy_rows(docs):
    methods = ordered({m for d in docs for m in d["accuracy_after_task"]},
                      ("dkvb", "mlp", "linear"))
    return ("accuracy on all classes", [
        (f"{m}, after the last task", cell(lambda d, m=m: d["accuracy_after_task"][m][-1]))
        for m in methods] + [
        (f"{m}, i.i.d.", cell(lambda d, m=m: d["iid_accuracy"][m])) for m in methods])


def dkvb_split_digits_rows(docs):
    methods = ordered({m for d in docs for m in d["accuracy_after_task"]},
                      ("dkvb", "linear_ci", "mlp_ci"))
    return ("accuracy on the seen classes", [
        (f"{m}, after the last task", cell(lambda d, m=m: d["accuracy_after_task"][m][-1]))
        for m in methods] + [
        (f"{m}, i.i.d.", cell(lambda d, m=m: d[f"{m}_iid"])) for m in ("linear", "mlp", "dkvb")])


def mac_online_adaptation_rows(docs):
    methods = ordered({m for d in docs for m in d["em"]},
                      ("mac_flat", "mac_hierarchical", "mac_topk", "gold_removed", "no_memory",
                       "uniform_ft"))
    return ("EM", [(m, cell(lambda d, m=m: d["em"][m])) for m in methods] + [
        ("questions", cell(lambda d: d["questions"])),
        ("uniform_ft lr", cell(lambda d: d["uniform_ft_lr"], 4))])


def mac_retention_rows(docs):
    xs = numeric_keys(d["f1"] for d in docs)
    return (f"at {' / '.join(xs)} documents in the bank", [
        ("F1 on the first documents' questions", curve(lambda d: d["f1"], xs)),
        ("relative to the first bank", curve(lambda d: d["relative_f1"], xs))])


FIGURE_ROWS = {
    "lm_mqar": lm_mqar_rows,
    "landmark_passkey": passkey_rows,
    "landmark_perplexity": perplexity_rows,
    "birdie_recall": birdie_recall_rows,
    "birdie_phonebook": birdie_phonebook_rows,
    "dkvb_toy": dkvb_toy_rows,
    "dkvb_split_digits": dkvb_split_digits_rows,
    "mac_online_adaptation": mac_online_adaptation_rows,
    "mac_retention": mac_retention_rows,
}


# ---------------------------------------------------------------------------------------------
# Benchmarks: one row per results/benchmarks/NAME-DEVICE.json
# ---------------------------------------------------------------------------------------------
_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(x: float, unit: str) -> str:
    """51.1 GFLOP/s."""
    scale, prefix = next(((s, p) for s, p in _PREFIXES if abs(x) >= s), (1.0, ""))
    return f"{x / scale:.3g} {prefix}{unit}"


def count(x: float) -> str:
    """13.5k, 48.9M."""
    scale, prefix = next(((s, p) for s, p in _PREFIXES if abs(x) >= s), (1.0, ""))
    return f"{x / scale:.3g}{prefix}"


def ms(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def kilo(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def trainer_summary(d: dict) -> str:
    s = d["shapes"]
    spec_total = d.get("spec_peak_flops_per_s_total")
    if "spec_peak_flops_per_s_total" not in d:   # a file from before the benchmark recorded it
        from train.chips import spec_peak
        one = spec_peak(d["device"]["device_kind"], s["compute_dtype"])
        spec_total = one * s["devices_used"] if one else None
    spec = (f", {d['model_flops_per_s'] / spec_total:.2f} of the specification's "
            f"{si(spec_total, 'FLOP/s')}" if spec_total else "")
    loop = d.get("real_loop")
    loop = (f"; the real loop (data, metrics, checkpoints) {loop['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {loop['mfu_measured_peak']:.2f}"
            + (f" / {loop['mfu_spec']:.2f}" if loop.get("mfu_spec") else "") if loop else "")
    xla = d.get("step_with_xla_attention")
    if xla and "error" in xla:
        xla = f"; the step with the XLA attention failed ({xla['error'][:80]})"
    else:
        xla = (f"; {xla['speedup']:.2f}× the step with the XLA attention "
               f"({xla['tokens_per_s']:,.0f} tokens/s)" if xla else "")
    attention = f", {s['attention_used']} attention" if "attention_used" in s else ""
    stopped = ""
    if d.get("complete") is False:
        stopped = ("; **the run stopped before its real loop ended**" if not d.get("real_loop")
                   else "; **the run stopped before the step with the XLA attention ended**")
    return (f"step {d['tokens_per_s']:,.0f} tokens/s, MFU {d['mfu']:.2f} of the measured "
            f"{si(d['peak_flops_per_s_total'], 'FLOP/s')}{spec}{loop}{xla}{stopped} "
            f"({d['n_params_total']:,} parameters, width {s['width']}, {s['num_layers']} layers, "
            f"T {s['seq_len']}, {s['compute_dtype']}{attention})")


def dkvb_summary(d: dict) -> str:
    r, s = d["results"], d["shapes"]
    chunks = sorted((k for k in r if k.startswith("chunked_")), key=lambda k: int(k.split("_")[1]))
    n = r["naive_dense"]
    agrees = all(r[k]["agrees_with_naive"] == 1.0 for k in chunks)

    def each(f):
        return " / ".join(f(r[k]) for k in chunks)

    return (f"chunks of {' / '.join(k.split('_')[1] for k in chunks)} codebooks: "
            f"{each(lambda x: count(x['lookups_per_s']))} lookups/s at "
            f"{each(lambda x: mib(x['memory']['peak_bytes']))}; dense: "
            f"{count(n['lookups_per_s'])} lookups/s at {mib(n['memory']['peak_bytes'])}; "
            f"{'agree' if agrees else 'DISAGREE'} with dense (C {s['C']}, K {s['K']}, "
            f"B {s['B']})")


def mac_summary(d: dict) -> str:
    a, s = d["adapt_per_document"], d["shapes"]
    return (f"g forward per document {ms(a['mac_amortize_s'])} vs a fine-tuning step "
            f"{ms(a['finetune_step_s'])}: **{a['time_ratio_mac_over_ft']:.3f}** (variant "
            f"{d['variant']}, D {s['D']}, L {s['L']})")


def ssm_summary(d: dict) -> str:
    lengths = [str(n) for n in d["config"]["lengths"]]
    pairs = list(zip(lengths, lengths[1:]))

    def ratios(key):
        return " / ".join(f"{d[key][f't({b})/t({a})']:.2f}" for a, b in pairs)

    steps = " / ".join(f"{kilo(int(b))}÷{kilo(int(a))}" for a, b in pairs)
    return (f"prefill scaling {steps}: {ratios('prefill_scaling')} in chunks of "
            f"{d['config']['block_chunk']}, {ratios('prefill_one_pass_scaling')} in one pass; "
            f"bidirectional ÷ causal layer {d['bidirectional_over_causal']:.2f}; transformer ÷ "
            f"SSM forward at 4k {d['transformer_over_ssm']['4096']:.0f}×")


def _launch_label(launch: dict) -> str:
    """A Pallas kernel's launch: its tiles, and on a GPU its warps and pipeline stages."""
    label = f"{launch['block_q']}×{launch['block_k']} tiles"
    if "num_warps" in launch:
        label += f", {launch['num_warps']} warps, {launch['num_stages']} stages"
    return label


def _tile_sweep(sw: dict) -> str:
    """One head dimension of the Pallas kernel's tile sweep: its fastest configuration, and it
    and the default (the first) against jax.nn.dot_product_attention."""
    def ratio(key):
        return "—" if sw.get(key) is None else f"{sw[key]:.2f}"

    where = f"tile sweep at T {sw['T']}, D {sw['D']}"
    if "best" not in sw:
        return f"{where}: no configuration ran"
    return (f"{where} ({len(sw['configs'])} configurations): fastest "
            f"{_launch_label(sw['best'])}, ÷ "
            f"jax.nn.dot_product_attention {ratio('best_over_dot_product_attention')} "
            f"(default {ratio('default_over_dot_product_attention')})")


def landmark_attention_summary(d: dict) -> str:
    tr, inf = d["training_fwd_bwd"], d["inference_per_token"]

    def cells(rows, key, digits):   # "—" where a candidate failed (e.g. out of memory)
        return " / ".join("—" if r.get(key) is None else f"{r[key]:.{digits}f}" for r in rows)

    pallas = ""
    for key, label in (("pallas_over_dot_product_attention", "jax.nn.dot_product_attention"),
                       ("pallas_over_official_triton", "the official Triton kernel")):
        if any(r.get(key) is not None for r in tr):
            pallas += f"; Pallas ÷ {label} {cells(tr, key, 2)}"
    parts = []
    if tr:
        parts.append(f"training fwd+bwd ÷ dense causal {cells(tr, 'ratio', 2)} at "
                     f"T {' / '.join(str(r['T']) for r in tr)}{pallas}")
    parts += [_tile_sweep(sw) for sw in d.get("tile_sweep", [])]
    if inf:
        parts.append(f"per-token memory inference ÷ full KV {cells(inf, 'ratio', 3)} at "
                     f"{' / '.join(kilo(r['context']) for r in inf)} context")
    if d.get("complete") is False:
        parts.append("**the run stopped part-way**: these are the lengths it finished")
    return "; ".join(parts) or "no length finished"


def hf_load_summary(d: dict) -> str:
    rows = {r["mode"]: r for r in d["results"]}
    t, w = rows["tensorwise"], rows.get("whole_state_dict")
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    base = (f"; the whole state dict first: {gib(w['peak_rss_bytes'])} "
            f"({w['peak_over_checkpoint']:.2f}×)") if w else ""
    return (f"{t['num_params'] / 1e9:.2f}B-parameter LLaMA ({gib(d['checkpoint_bytes'])} "
            f"float32) onto {d['mesh']['devices']} fake devices (fsdp {d['mesh']['fsdp']}): "
            f"peak resident **{gib(t['peak_rss_bytes'])} = {t['peak_over_checkpoint']:.2f}×** "
            f"the checkpoint in {t['seconds']:.1f} s{base}")


def _gpu_resources(t: dict) -> str:
    """A GPU target's launch (when not the kernels' default) and, per dtype over its cases, the
    most registers a thread of a kernel uses and each kernel's largest spill."""
    launch = t.get("launch")
    label = _launch_label(launch) if isinstance(launch, dict) and launch else ""
    by_dtype: dict = {}
    for c in t["cases"]:
        for k, r in c.get("resources", {}).items():
            if "registers" in r:
                by_dtype.setdefault(c["dtype"], []).append((k, r))
    parts = []
    for dtype, res in by_dtype.items():
        spills: dict = {}
        for k, r in res:
            spills[k] = max(spills.get(k, 0), r["spill_stores"])
        spilled = ", ".join(f"{k} {v} B" for k, v in sorted(spills.items()) if v) or "none"
        parts.append(f"{dtype} ≤ {max(r['registers'] for _, r in res)} registers, spill stores "
                     f"{spilled}")
    inner = ": ".join(x for x in (label, "; ".join(parts)) if x)
    return f" ({inner})" if inner else ""


def aot_compile_summary(d: dict) -> str:
    def cell(t):
        if "cases" not in t:
            return f"{t['topology']}: no topology"
        cases = t["cases"]
        ok = sum(c["ok"] for c in cases)
        why = next((c["error"][0] for c in cases if not c["ok"]), "")
        code = re.search(r"E\d{4}: \w+", why)
        why = f" ({code.group(0) if code else why[:60]})" if why else ""
        n = f" ×{t['devices']}" if t["devices"] > 1 else ""
        return f"{t['device_kind']}{n} {ok}/{len(cases)}{why}{_gpu_resources(t)}"

    return ("deviceless compile (no chip) of the Pallas kernels' forward + dk/dv + dq, cases "
            "compiled: " + "; ".join(cell(t) for t in d["targets"]))


BENCHMARK_SUMMARIES: dict[str, Callable[[dict], str]] = {
    "aot_compile": aot_compile_summary,
    "hf_load": hf_load_summary,
    "trainer": trainer_summary,
    "trainer-125m": trainer_summary,
    "trainer-350m": trainer_summary,
    "dkvb": dkvb_summary,
    "mac": mac_summary,
    "mac-paper": mac_summary,
    "ssm": ssm_summary,
    "landmark_attention": landmark_attention_summary,
}


def device_label(device: dict) -> str:
    kind = "CPU" if device["platform"] == "cpu" else device["device_kind"]
    return kind + (f" ×{device['device_count']}" if device["device_count"] > 1 else "")


def benchmarks_table(results: pathlib.Path) -> str:
    paths = sorted((results / "benchmarks").glob("*.json"))
    if not paths:
        return "`benchmarks`: no committed results yet (`results/benchmarks/NAME-DEVICE.json`)."
    rows = []
    for path in paths:
        d = load_json(path)
        for field in ("benchmark", "device", "versions"):
            if field not in d:
                raise ValueError(f"benchmark file {path} has no {field!r}; the harness writes it")
        name = d["benchmark"]
        if name not in BENCHMARK_SUMMARIES:
            raise ValueError(f"benchmark={name!r} in {path} has no summary; allowed: "
                             f"{sorted(BENCHMARK_SUMMARIES)}")
        v = d["versions"]
        rows.append([f"`{name}`", device_label(d["device"]), BENCHMARK_SUMMARIES[name](d),
                     f"{d.get('time_utc', '')[:10]}, jax {v.get('jax', '?')}",
                     f"`results/benchmarks/{path.name}`"])
    return markdown_table(["benchmark", "device", "result", "measured", "file"], rows)


# ---------------------------------------------------------------------------------------------
# The demo: each quick figure's effect against the bar it must clear (issue: "make demo shows
# each paper's effect"), one column per committed quick seed
# ---------------------------------------------------------------------------------------------
BIDIRECTIONAL = ("gated_bidir", "gated_birdie", "hawk_birdie")
MEMORY_SETTINGS = ("landmark_k2", "landmark_k4", "landmark_k4_cache8")


def _longest(d: dict) -> str:
    return max(d, key=int)


def _passkey_bar(doc):
    acc, ctx = doc["accuracy"], doc["train_context"]
    L = _longest(acc["landmark_memory"])
    mem, full = acc["landmark_memory"][L], acc["landmark_full"][L]
    return (f"memory {fmt(mem)}, full attention {fmt(full)} at {L} ({int(L) // ctx}×)",
            int(L) >= 4 * ctx and mem >= 0.8 and full <= 0.2)


def _perplexity_bar(doc):
    ppl = doc["perplexity"]
    L = _longest(ppl["landmark_full"])
    mem = max(ppl[m][L] for m in MEMORY_SETTINGS if m in ppl)
    full = ppl["landmark_full"][L]
    return (f"memory ≤ {fmt(mem, 2)} vs full attention {fmt(full, 2)} at {L}",
            mem < full and mem < 64)


def _recall_bar(doc):
    acc = doc["accuracy"]
    P = _longest(acc["gated_ntp"])
    best = max((acc[m][P], m) for m in BIDIRECTIONAL if m in acc)
    gap = best[0] - acc["gated_ntp"][P]
    return (f"{best[1]} {fmt(best[0])} − gated_ntp {fmt(acc['gated_ntp'][P])} = {fmt(gap)} "
            f"at {P} pairs", gap >= 0.15)


def _toy_bar(doc):
    a = doc["accuracy_after_task"]
    return (f"DKVB {fmt(a['dkvb'][-1])}, MLP {fmt(a['mlp'][-1])}",
            a["dkvb"][-1] >= 0.9 and a["mlp"][-1] <= 0.5)


def _digits_bar(doc):
    a = doc["accuracy_after_task"]
    return (f"DKVB {fmt(a['dkvb'][-1])}, linear (CI) {fmt(a['linear_ci'][-1])}",
            a["dkvb"][-1] >= 0.85 and a["linear_ci"][-1] <= 0.45)


def _mac_bar(doc):
    em = doc["em"]
    return (f"flat {fmt(em['mac_flat'])}, no memory {fmt(em['no_memory'])}, gold removed "
            f"{fmt(em['gold_removed'])}",
            em["mac_flat"] >= 0.5 and em["no_memory"] <= 0.15 and em["gold_removed"] <= 0.15)


def _mqar_bar(doc):
    return (f"{fmt(doc['accuracy'])} vs no_binding {fmt(doc['no_binding'])}",
            doc["accuracy"] > doc["no_binding"])


# (figure, the bar in words, doc -> (measured, met))
DEMO_BARS = (
    ("landmark_passkey", "memory ≥ 0.8 and full attention ≤ 0.2 at ≥ 4× the context",
     _passkey_bar),
    ("landmark_perplexity", "memory below full attention and below 64 at the longest length",
     _perplexity_bar),
    ("birdie_recall", "best bidirectional − causal gated SSM ≥ 0.15 at the most pairs",
     _recall_bar),
    ("dkvb_toy", "DKVB ≥ 0.9, MLP ≤ 0.5", _toy_bar),
    ("dkvb_split_digits", "DKVB ≥ 0.85, class-incremental linear ≤ 0.45", _digits_bar),
    ("mac_online_adaptation", "MAC flat EM ≥ 0.5; no memory, gold removed ≤ 0.15", _mac_bar),
    ("lm_mqar", "accuracy above no_binding", _mqar_bar),
)


def demo_table(results: pathlib.Path) -> str:
    """Each demo figure's effect at `--size quick` against its bar, a column per committed seed
    (results/figures/NAME-quick-seedS.json), with the figures' own seconds."""
    runs: dict[int, dict[str, dict]] = {}
    for name, _, _ in DEMO_BARS + (("mac_retention", "", None),):
        for _, doc in figure_results(results, name):
            if doc["provenance"]["size"] == "quick":
                runs.setdefault(int(doc["provenance"]["seed"]), {})[name] = doc
    if not runs:
        return "`demo`: no committed results yet (`results/figures/NAME-quick-seedS.json`)."
    seeds = sorted(runs)
    rows = []
    for name, bar, check in DEMO_BARS:
        cells = []
        for seed in seeds:
            doc = runs[seed].get(name)
            if doc is None:
                cells.append("–")
                continue
            text, met = check(doc)
            cells.append(f"{text} {'**met**' if met else '**not met**'}")
        rows.append([f"`{name}`", bar] + cells)
    rows.append(["all figures", "seconds (each figure's own clock, summed)"] + [
        fmt(round(sum(d["provenance"]["seconds"] for d in runs[seed].values())), 0)
        for seed in seeds])
    commits = sorted({d["provenance"]["git_commit"][:7] for r in runs.values() for d in r.values()})
    return (markdown_table(["figure", "bar"] + [f"seed {s}" for s in seeds], rows) + "\n\n"
            + f"From `results/figures/*-quick-seedS.json` (commit {', '.join(commits)}).")


# ---------------------------------------------------------------------------------------------
# Will it fit? The dry runs (results/dryrun/CONFIG-N.json, written by train.dryrun --out)
# ---------------------------------------------------------------------------------------------
DRYRUN_ORDER = ("lm:", "landmark:", "mac:", "birdie:paper:transformer", "birdie:paper:gated",
                "birdie:paper:hawk", "dkvb:")   # the README's order of the families
MESH_FLAGS = ("--config.mesh.fsdp=-1", "--config.mesh.data=1")   # every row's mesh


def _gb(nbytes: int, digits: int = 3) -> str:
    """Bytes in GB (10⁹): `digits` decimals, 3 below 1 GB."""
    return f"{nbytes / 1e9:.{digits if nbytes >= 1e9 else 3}f} GB"


def _flop_ratio(d: dict) -> str:
    """XLA's step FLOPs over the analytic count, "—" where either is missing."""
    xla, analytic = d.get("step_flops"), d.get("analytic_step_flops")
    return f"{xla / analytic:.2f}" if xla and analytic else "—"


def dryrun_table(results: pathlib.Path) -> str:
    """A row per dry run: the config (with any override but the mesh's), the devices (and the
    chip of a --topology or --gpu run, whose scratch is XLA:TPU's or XLA:GPU's, not the CPU's)
    and mesh, parameters (all, per device), Adam state, scratch and total per device, the chips
    the total fits, and XLA's step FLOPs over the trainer benchmark's analytic count (an LM's,
    where both were reported; "—" otherwise), ordered by DRYRUN_ORDER and device count."""
    paths = sorted((results / "dryrun").glob("*.json"))
    if not paths:
        return "`dryrun`: no committed results yet (`results/dryrun/CONFIG-N.json`)."
    docs = []
    for path in paths:
        d = load_json(path)
        for field in ("command", "commit", "num_devices", "mesh", "fits"):
            if field not in d:
                raise ValueError(f"dry-run file {path} has no {field!r}; "
                                 "`python -m train.dryrun --out` writes it")
        args = d["command"].split()
        config = args[args.index("--config") + 1]
        extra = [a[len("--config."):] for a in args
                 if a.startswith("--config.") and a not in MESH_FLAGS]
        rank = next((i for i, p in enumerate(DRYRUN_ORDER) if config.startswith(p)),
                    len(DRYRUN_ORDER))
        docs.append(((rank, config, " ".join(extra), d["num_devices"]), config, extra, d))
    rows = []
    for _, config, extra, d in sorted(docs, key=lambda x: x[0]):
        label = f"`{config}`" + (f" ({', '.join(f'`{e}`' for e in extra)})" if extra else "")
        kind = f" {d['device_kind']}" if "device_kind" in d else ""
        rows.append([label, f"{d['num_devices']}{kind} ({d['mesh'].replace(' × ', '×')})",
                     _gb(d["params_bytes_total"]), _gb(d["params_bytes_per_device"]),
                     _gb(d["optimizer_bytes_per_device"]), _gb(d["temp_bytes_per_device"], 1),
                     _gb(d["total_bytes_per_device"], 1),
                     ", ".join(k for k, v in d["fits"].items() if v) or "none",
                     _flop_ratio(d)])
    commits = sorted({d["commit"] for *_, d in docs})
    return (markdown_table(["config", "devices (mesh)", "parameters, all", "parameters / device",
                            "Adam state / device", "scratch / device (CPU's, or the chip named)",
                            "total / device", "fits (by that total)",
                            "XLA / analytic step FLOPs"], rows) + "\n\n"
            + f"From `results/dryrun/CONFIG-N.json` (commit {', '.join(commits)}).")


def memory_bench_table(results: pathlib.Path) -> str:
    """The memory benchmark's `cpu` table (eval/memory_bench.py: table), one column group per
    committed seed."""
    if not sorted((results / "figures").glob("memory_bench-cpu-seed*.json")):
        return ("`memory_bench`: no committed results yet "
                "(`results/figures/memory_bench-SIZE-seedS.json`).")
    from eval import memory_bench
    return memory_bench.table(results / "figures", "cpu")


BUILDERS: dict[str, Callable[[pathlib.Path], str]] = {
    **{name: (lambda results, name=name, rows=rows: seed_table(name, results, rows))
       for name, rows in FIGURE_ROWS.items()},
    "memory_bench": memory_bench_table,
    "benchmarks": benchmarks_table,
    "demo": demo_table,
    "dryrun": dryrun_table,
}


# ---------------------------------------------------------------------------------------------
# The README
# ---------------------------------------------------------------------------------------------
def render(readme: str, results: pathlib.Path) -> str:
    """`readme` with every marked section replaced by its builder's output."""
    opened = OPENERS.findall(readme)
    closed = [m.group("key") for m in MARKERS.finditer(readme)]
    if sorted(opened) != sorted(closed):
        unclosed = sorted(set(opened) - set(closed)) or sorted(opened)
        raise ValueError(f"README markers {unclosed} are not closed by <!-- /report:KEY --> on "
                         "a line of its own")
    for key in opened:
        if key not in BUILDERS:
            raise ValueError(f"README marker report:{key} is unknown; allowed: {sorted(BUILDERS)}")
    return MARKERS.sub(lambda m: m.group(1) + BUILDERS[m.group("key")](results) + "\n"
                       + m.group(4), readme)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="exit 1 if README.md differs from what this would write")
    p.add_argument("--readme", default=str(REPO_ROOT / "README.md"))
    p.add_argument("--results", default=str(REPO_ROOT / "results"))
    a = p.parse_args(argv)
    readme = pathlib.Path(a.readme)
    old = readme.read_text()
    try:
        new = render(old, pathlib.Path(a.results))
    except ValueError as e:
        print(f"eval.report: {e}", file=sys.stderr)
        return 1
    stale = [m.group("key") for m, n in zip(MARKERS.finditer(old), MARKERS.finditer(new))
             if m.group(0) != n.group(0)]
    if a.check:
        if old != new:
            print(f"{readme} is out of date in sections {stale}: run `python -m eval.report`",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(f"{readme}: rewrote {stale}" if stale else f"{readme}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
