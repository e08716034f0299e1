"""Train a model: `python -m train.main --config train/configs/lm.py:tiny --workdir DIR`.

Rerunning the same command resumes from the newest readable checkpoint in DIR. Override any config
field with --config.FIELD=VALUE (e.g. --config.num_steps=100 --config.mesh.model=2).
On a multi-host system (TPU pod slice, SLURM) pass --distributed or let the environment say so
(see train/sharding.py: maybe_initialize_distributed).
"""
import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py:variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", None,
                                 "Force jax.distributed.initialize() (default: from environment).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from train import sharding
    sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
    from train import trainer
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    logging.getLogger("train").setLevel(logging.INFO)
    try:
        summary = trainer.train(_CONFIG.value, _WORKDIR.value)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = {k: v for k, v in summary.items() if isinstance(v, (int, float, bool, str))}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    app.run(main)
