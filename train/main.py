"""Train a model: `mnemax-train --config lm:tiny --workdir DIR` (the console script `pip install`
puts on the PATH), or from a checkout `python -m train.main --config train/configs/lm.py:tiny ...`.

--config takes a config file (`path.py:variant`) or a config of this package by name
(`lm:tiny`, `landmark:tiny`, `birdie:tiny:gated_birdie`, `mac:tiny`: train/configs/NAME.py; MAC's
config trains its base LM into DIR/base_lm first). A bad config ends in one line naming the
field (exit code 2), as do an override naming no field (with the nearest known name), a value
of the wrong type, and a DIR that is a file.

Rerunning the same command resumes from the newest readable checkpoint in DIR. Override any config
field with --config.FIELD=VALUE (e.g. --config.num_steps=100 --config.mesh.model=2). A DIR that
holds a run trained under another config is refused with one line naming the differing fields
(exit code 2); run-control fields (num_steps, checkpoint_every, mesh, ...: train/config_identity.py)
may change freely, and --allow_config_change=FIELD[,FIELD] resumes despite the others (e.g. a
curriculum's next phase: --allow_config_change=data.min_length).
On a multi-host system (TPU pod slice, SLURM) pass --distributed or let the environment say so
(see train/sharding.py: maybe_initialize_distributed). A SIGTERM to any one process makes every
process save the same step and exit 0; a process that dies makes the others abort after
--heartbeat_timeout_s; rerunning every process resumes from the last complete checkpoint.
"""
import json
import logging
import os
import pathlib
import re
import sys
from typing import Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (path.py:variant) or packaged config (NAME:variant).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_ALLOW = flags.DEFINE_list(
    "allow_config_change", [],
    "Config fields (dotted, comma-separated; a name covers the fields under it) that may differ "
    "from the config the workdir's run was trained with; 'all': any field (the start row of "
    "metrics.jsonl logs what changed).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", None,
                                 "Force jax.distributed.initialize() (default: from environment).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", None,
    "Several processes: seconds without a heartbeat after which a process counts as dead and "
    "the others abort (default: JAX's, 100).", lower_bound=1)


def main(argv):
    del argv
    missing = [f"--{n}" for n, v in (("config", _CONFIG.value), ("workdir", _WORKDIR.value))
               if v is None]
    if missing:     # checked here, not by absl, so train.dryrun can share these flags
        print(f"error: {' and '.join(missing)} must be given", file=sys.stderr)
        return 2
    # Imported here, not at the top: the multi-host runtime starts before the trainer's modules
    # (and whatever they touch of JAX at import time) load.
    from train import sharding
    sharding.maybe_initialize_distributed(_DISTRIBUTED.value,
                                          heartbeat_timeout_s=_HEARTBEAT.value)
    from train import trainer
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    logging.getLogger("train").setLevel(logging.INFO)
    from train import checkpoint
    config = _CONFIG.value
    try:
        trainer.validate_config(config)
        checkpoint.check_workdir_path(_WORKDIR.value)   # a file, read-only
    except ValueError as e:     # a bad field: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train(config, _WORKDIR.value, allow_changes=_ALLOW.value)
    except ValueError as e:     # another config in DIR, unreadable data, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except checkpoint.NoReadableCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        # After failed Orbax restores their asyncio machinery reports "Event loop is closed"
        # from other threads at interpreter teardown. Nothing is left to save or close here, so
        # exit now, with the status that says why and before that noise.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:        # a write that failed (disk full, a lost mount)
        steps = checkpoint.saved_steps(_WORKDIR.value)
        kept = f"step {steps[-1]}" if steps else "none"
        print(f"error: {e}; the last complete checkpoint ({kept}) is kept: free the space and "
              "rerun the same command to resume", file=sys.stderr)
        return 1
    out = {k: v for k, v in summary.items() if isinstance(v, (int, float, bool, str))}
    print(json.dumps(out), flush=True)
    return 0


CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


def config_path(spec: str) -> str:
    """`--config` value → a config file argument: `path.py[:variant]` unchanged, `NAME[:variant]`
    → train/configs/NAME.py[:variant] of this package (so commands work from any folder)."""
    name, sep, variant = spec.partition(":")
    if name.endswith(".py") or "/" in name:
        return spec
    path = CONFIG_DIR / f"{name}.py"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                       if p.stem not in ("__init__", "common"))
        raise ValueError(f"config={spec!r} names no packaged config; use a path.py[:variant] or "
                         f"one of {names}")
    return f"{path}{sep}{variant}"


def resolve_config_flag(argv: Sequence[str]) -> list[str]:
    """argv with its `--config NAME[:variant]` (or `--config=...`) resolved by `config_path`;
    `--config.FIELD=VALUE` overrides are left alone."""
    out, it = [], iter(argv)
    for a in it:
        if a == "--config":
            out += [a, config_path(next(it, ""))]
        elif a.startswith("--config="):
            out.append("--config=" + config_path(a[len("--config="):]))
        else:
            out.append(a)
    return out


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with a bad command line as one error line (exit code 2): a
    --config.FIELD override naming no field (with ml_collections' nearest known name), a value of
    the wrong type, an unknown or missing flag."""
    try:
        return flags.FLAGS(list(argv))
    except (KeyError, AttributeError) as e:        # an override naming no config field
        text = str(e)
        near = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
        bad = near.group(2) if near else next(iter(re.findall(r"\w+", text)), "?")
        given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        where = next((g for g in given if bad in g.split(".")), " ".join(given))
        hint = f"; did you mean {near.group(1)!r}?" if near else ""
        print(f"error: {where} names no config field: {bad!r} is unknown{hint}", file=sys.stderr)
    except flags.Error as e:                       # a bad value, an unknown or missing flag
        text = " ".join(str(e).split())
        if "Traceback (most recent call last)" in text:   # raised by the config's get_config
            text = text.split(": Error whilst parsing")[0] + ": " + re.split(r"\w+Error: ",
                                                                             text)[-1]
        print(f"error: {text}", file=sys.stderr)
    raise SystemExit(2)


def run(argv: Optional[Sequence[str]] = None) -> None:
    """The `mnemax-train` console script."""
    argv = list(sys.argv if argv is None else argv)
    try:
        argv = resolve_config_flag(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
