"""What makes two runs the same run: a config's identity, its hash, and the fields that differ.

    identity(config)          -> {"model.num_heads": 4, "data.min_length": 251, ...}
    config_hash(config)       -> "3f9a0c1b2d4e"   (12 hex digits of the canonical JSON)
    config_diff(stored, cur)  -> ["model.num_heads: 4 -> 8"]
    check_compatible(stored, cur, allow_changes=...)   raises ConfigMismatchError
    recipe_hash([phase configs])   the hash a figure's run folder is named with

`config` is an ml_collections.ConfigDict or the JSON dict a run stored (`WORKDIR/config.json`,
a checkpoint's `config` item): both are compared through the same JSON round trip
(`to_json_best_effort`, what the trainer writes), so a workdir written by the trainer of any
version that wrote that JSON is recognised as matching when nothing changed.

The identity is the flattened config (dotted names) without the fields in EXCLUDED below: those
that say how a run is executed, not which model it trains, on which data, with which objective
and optimizer. Every other field, present or absent, is part of it, except a field of
ADDED_DEFAULTS at the value that runs stored before it existed had (so they still match), and a
field of DATASET_ADDED_DEFAULTS[name] likewise in a data section of that dataset.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

# Fields left out of a run's identity (a name covers the fields under it), with why.
EXCLUDED = (
    # Where the run stops: rerunning with a larger num_steps is how a run is extended. (A schedule
    # that decays over num_steps -- train/trainer.py: make_optimizer's cosine when
    # optim.min_lr_ratio < 1 -- does follow it, so extending such a run changes its lr from the
    # resume point on, as a longer run would have had. The figures' run folders hash num_steps
    # in: see recipe_hash.)
    "num_steps",
    # When to save, evaluate and log, how many checkpoints to keep, whether saves are
    # asynchronous, the progress bar, the run's display name: bookkeeping around the same steps.
    "checkpoint_every", "eval_every", "log_every", "keep_checkpoints", "async_checkpoints",
    "progress", "name",
    # How the same global arrays are laid out over devices: a checkpoint restores onto any mesh
    # (tests/train/test_trainer.py: test_restore_onto_different_mesh) and the data pipeline gives
    # each process its rows of the same global batch; only float rounding order changes.
    "mesh", "sharding_rules",
    # Fault injection for tests (SIGKILL or a NaN loss at a given step); which steps a profiler
    # traces.
    "debug", "profile_steps",
    # Validation batches per evaluation: what is measured, not what is trained.
    "eval",
    # Recomputing each block in the backward pass (and what it keeps): the same function,
    # parameters and gradients, traded for memory.
    "model.remat", "model.remat_policy",
    # Which kernel computes the attention (the XLA path, cuDNN's, the splash or landmark Pallas
    # kernels): the same function to float rounding, so a run trained on one chip resumes on
    # another (tests/models/test_fused_attention.py, tests/models/test_landmark_pallas.py).
    "model.attention_impl",
    # Where the same TFDS build lives (a local copy, a bucket) and whether TFDS may prepare it.
    "data.data_dir", "data.download", "data.stream_dir",
    # Reader threads and read-ahead: grain yields records in the same order whatever they are.
    # (data.worker_count stays in: the data iterator's checkpoint is that of grain's worker
    # processes, and restores only into the same count.)
    "data.read_threads", "data.read_buffer",
)

# Fields added after runs were stored, each with the value that gives those runs exactly: at that
# value a field is left out of the identity, as if absent, so a run stored before the field
# existed keeps its hash and resumes; any other value is a different run.
ADDED_DEFAULTS = {
    # The text datasets' tokenizer (train/data/pipeline.py): "byte" is what they always used.
    "data.tokenizer": "byte",
    # The text dataset's local corpus folder and its file patterns (train/data/text_corpus.py):
    # "" is Python's docs, as before.
    "data.text_dir": "",
    "data.text_patterns": ["*.txt", "*.tex"],
    # The lm objective's chunked cross-entropy (train/objectives/lm.py): 0 is the plain loss.
    "objective_config.ce_chunk": 0,
    # The text datasets' window layout (train/data/token_stream.py): today's packed windows.
    "data.windows": "packed",
    "data.mask_after_eos": False,
    "data.stream_mem_freq": 0,
    # Birdie's corpus sources (train/data/birdie_data.py: "local_text", "tfds"), unused before.
    "data.tfds_name": "",
    "data.text_key": "text",
    # The Transformer's blocks as one scan over stacked parameters (models/transformer.py): off,
    # the per-layer parameter tree every run before it had.
    "model.scan_layers": False,
    # Birdie's objective settings chosen by the controller (train/objectives/birdie.py
    # ObjectiveSettings.controlled): none, every run's action space before it existed.
    "data.objective_settings.controlled": [],
    # Landmark attention's group dropout (models/landmark.py): off, as before it existed
    # (0.0 in a config; its JSON round trip writes 0).
    "model.group_dropout": 0,
}

# Data fields added to one dataset after its runs were stored, where another dataset has long had
# a field of that name at that value (so a global ADDED_DEFAULTS entry would change that
# dataset's runs): left out of the identity only in a data section (`data`, or a nested one such
# as `base_lm.data`) whose `name` is the dataset, at the value given.
DATASET_ADDED_DEFAULTS = {
    # The memory benchmark's Birdie controller fields (train/data/memory_bench.py): the uniform
    # Birdie mixture, no balanced rows and the controller's validation split's size, which
    # leave every row of the runs before them as it was.
    "memory_bench": {"mixture": [], "objective_per_row": False, "num_validation": 256},
}

ABSENT = "<absent>"


class ConfigMismatchError(ValueError):
    """A workdir holds a run trained under another config (one line: the fields, what to do),
    or allow_changes names no config field."""


# ---------------------------------------------------------------------------------------------
# Canonical form
# ---------------------------------------------------------------------------------------------
def as_json(config: Any) -> dict:
    """The config as the JSON dict the trainer stores (ConfigDict → `to_json_best_effort`)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(_plain(config), default=str))


def _plain(x: Any) -> Any:
    if hasattr(x, "to_json_best_effort"):
        return json.loads(x.to_json_best_effort())
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _canon(v: Any) -> Any:
    """Integral floats as ints (2.0 and 2 are one setting); lists and dicts recursively."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_canon(x) for x in v]
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    return v


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"model": {"width": 64}} → {"model.width": 64}; an empty dict stays a value ({})."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = _canon(v)
    return out


def _covers(name: str, field: str) -> bool:
    """`name` is `field` or one of its parents (dotted)."""
    return field == name or field.startswith(name + ".")


def identity(config: Any) -> dict[str, Any]:
    """The flattened config without the EXCLUDED run-control fields and the ADDED_DEFAULTS
    fields at their defaults, keys sorted."""
    flat = flatten(as_json(config))
    return {k: flat[k] for k in sorted(flat) if not any(_covers(e, k) for e in EXCLUDED)
            and not (k in ADDED_DEFAULTS and _dumps(flat[k]) == _dumps(ADDED_DEFAULTS[k]))
            and not _dataset_default(flat, k)}


def _dataset_default(flat: Mapping[str, Any], key: str) -> bool:
    """`key` is "<section>data.<field>" of a dataset whose DATASET_ADDED_DEFAULTS hold <field>
    at the value it has."""
    section, dot, field = key.rpartition(".")
    if not dot or not (section == "data" or section.endswith(".data")):
        return False
    defaults = DATASET_ADDED_DEFAULTS.get(flat.get(f"{section}.name"), {})
    return field in defaults and _dumps(flat[key]) == _dumps(defaults[field])


def _dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(config: Any) -> str:
    """12 hex digits of sha256 over the identity's canonical JSON."""
    return canonical_hash(identity(config))


# ---------------------------------------------------------------------------------------------
# Differences
# ---------------------------------------------------------------------------------------------
def _differing(a: dict, b: dict) -> list[str]:
    """The keys of two flattened configs whose values differ (present in one only counts),
    sorted."""
    return [k for k in sorted(set(a) | set(b))
            if k not in a or k not in b or _dumps(a[k]) != _dumps(b[k])]


def changed_fields(stored: Any, current: Any) -> list[str]:
    """Dotted names of the identity fields that differ (present in one only counts), sorted."""
    return _differing(identity(stored), identity(current))


def _fmt(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _lines(a: dict, b: dict, keys: Iterable[str]) -> list[str]:
    return [f"{k}: {_fmt(a[k]) if k in a else ABSENT} -> {_fmt(b[k]) if k in b else ABSENT}"
            for k in keys]


def config_diff(stored: Any, current: Any) -> list[str]:
    """["model.num_heads: 4 -> 8", "data.min_length: <absent> -> 128", ...] for messages."""
    return _lines(identity(stored), identity(current), changed_fields(stored, current))


def run_control_diff(stored: Any, current: Any) -> list[str]:
    """The EXCLUDED (run-control) fields that differ, as config_diff's lines."""
    a, b = flatten(as_json(stored)), flatten(as_json(current))
    keys = [k for k in _differing(a, b) if any(_covers(e, k) for e in EXCLUDED)]
    return _lines(a, b, keys)


ALLOW_ALL = "all"   # allow_changes=["all"]: every field may differ


def check_compatible(stored: Any, current: Any, *, allow_changes: Iterable[str] = (),
                     where: str = "the workdir") -> list[str]:
    """Raises ConfigMismatchError (one line) if an identity field differs that `allow_changes`
    does not name (a name covers the fields under it: "data" allows every data.* field; "all"
    allows every field); else returns the allowed differences as config_diff's lines.

    A name in allow_changes that is no field of either config raises ConfigMismatchError too (a
    typo would otherwise allow nothing, silently)."""
    allow = [x.strip() for x in allow_changes if x and x.strip()]
    if ALLOW_ALL in allow:          # every field: a deliberate override, logged by the trainer
        return config_diff(stored, current)
    fields = set(flatten(as_json(current))) | set(flatten(as_json(stored)))
    unknown = [x for x in allow if not any(_covers(x, f) for f in fields)]
    if unknown:
        raise ConfigMismatchError(f"allow_changes names no config field: {unknown} ({where})")
    changed = changed_fields(stored, current)
    keys = [k for k in changed if not any(_covers(x, k) for x in allow)]
    if not keys:
        return _lines(identity(stored), identity(current), changed)
    diff = _lines(identity(stored), identity(current), keys)
    raise ConfigMismatchError(
        f"{where} holds a run trained with another config ({'; '.join(diff)}): use a new "
        f"workdir, or resume it anyway with --allow_config_change={','.join(keys)} "
        f"(allow_changes= in trainer.train)")


# ---------------------------------------------------------------------------------------------
# Figures: one folder per recipe
# ---------------------------------------------------------------------------------------------
def recipe(configs: Sequence[Any], *, keep: Sequence[str] = ("num_steps",)) -> list[dict]:
    """The identities of a run's phases in order, each with the `keep` fields put back
    (num_steps: where each phase ends, which a figure's recipe fixes)."""
    out = []
    for c in configs:
        flat = flatten(as_json(c))
        ident = identity(c)
        ident.update({k: flat[k] for k in flat if any(_covers(x, k) for x in keep)})
        out.append(dict(sorted(ident.items())))
    return out


def canonical(x: Any) -> str:
    """The canonical JSON of an identity or recipe (sorted keys, no spaces): equal strings,
    equal settings."""
    return _dumps(_canon(json.loads(json.dumps(_plain(x), default=str))))


def canonical_hash(x: Any) -> str:
    """12 hex digits of sha256 over `canonical(x)`."""
    return hashlib.sha256(canonical(x).encode()).hexdigest()[:12]


def recipe_hash(configs: Sequence[Any], *, keep: Sequence[str] = ("num_steps",)) -> str:
    """12 hex digits naming a (phased) run: a changed recipe trains into a new folder."""
    return canonical_hash(recipe(configs, keep=keep))
