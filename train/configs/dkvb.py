"""DKVB's class-incremental protocol (Träuble et al. 2023, Sec. 4.1) through the shared trainer,
for DKVB and for its baselines, on precomputed embeddings (train/data/embeddings.py).

    python -m eval.figures --only dkvb_toy,dkvb_split_digits --size cpu
    python -m eval.class_incremental --dataset digits --size cpu --workdir runs/digits

The variant is the learner: "dkvb" (model "dkvb", its codebooks as memory "dkvb_codebooks",
objective "dkvb"), "linear" (a linear probe) or "mlp" (one hidden layer of 128). Every learner
trains with plain SGD (no momentum, no weight decay), global-norm clip 1.0, label smoothing 0.1,
batches of up to 256; DKVB's values at lr 0.3 and the probes at lr 1e-3, the official sweeps'
settings (ftraeuble/experiments_discrete_key_value_bottleneck, sweeps/icml2023/*_ours_base.yaml
and *_lp_base.yaml). The toy and split-digits figures keep their probes at 0.3
(`DKVBConfig.probe_lr` of their size tables): their committed numbers were made so, with 10–200
epochs per task where the paper's CIFAR runs take 500–2000. A class-incremental stream is one
phase per task in one workdir (`task_phases`: the train split's classes change, num_steps grows by the task's
epochs; everything else, optimizer state included, carries over); each phase ends with a
checkpoint and an evaluation (metrics.jsonl). The figures set the sizes (codebooks, keys, key
dimension, epochs) and data_dir, the folder of the embeddings.
"""
import dataclasses
import math
from typing import Sequence

import ml_collections

from train.configs import common
from train.data import pipeline

METHODS = ("dkvb", "linear", "mlp")
DKVB_LR = 0.3      # SGD lr of DKVB's values (official sweeps)
PROBE_LR = 1e-3    # SGD lr of the linear probe and the MLP (official sweeps)
# What one phase of a class-incremental stream changes from the one before.
PHASE_CHANGES = ("data.classes", "data.eval_classes")


def get_config(arg: str = "dkvb") -> ml_collections.ConfigDict:
    if arg not in METHODS:
        raise ValueError(f"config variant {arg!r} is not allowed; use one of {METHODS}")
    c = ml_collections.ConfigDict()
    c.name = f"dkvb_{arg}" if arg != "dkvb" else "dkvb"   # run name (logs, progress bar)
    c.seed = 0                                   # one seed → one run, bit for bit on CPU
    c.num_steps = 100                            # set per phase by task_phases
    c.batch_size = 256                           # items per step (the paper's 256)
    c.seq_len = 1                                # one row per item (tokens/s counts items)
    c.input_shape = (64,)                        # (D,): the embeddings' width (figures set it)
    c.checkpoint_every = 0                       # 0: at the end of each phase (task) only
    c.keep_checkpoints = 8                       # one per task: each task's state stays readable
    c.eval_every = 1_000_000                     # in effect: at the end of each phase only
    c.log_every = 10
    c.progress = True
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})

    c.model = ml_collections.ConfigDict()
    c.model.num_classes = 10
    if arg == "dkvb":
        c.model.family = "dkvb"                  # train/objectives/dkvb.py: DKVBModel
        c.model.num_codebooks = 64               # C
        c.model.num_keys = 256                   # K per codebook
        c.model.decoder = "vote"                 # the paper's parameter-free decoder
        c.memory = ml_collections.ConfigDict()   # the codebooks: projection, keys, usage
        c.memory.dkvb_codebooks = ml_collections.ConfigDict()
        c.memory.dkvb_codebooks.key_dim = 8      # d_k
        c.memory.dkvb_codebooks.key_init_epochs = 10   # EMA k-means passes over keys.npz
        c.memory.dkvb_codebooks.key_init_decay = 0.95  # EMA decay (paper)
        c.memory.dkvb_codebooks.key_init_batch = 256
        c.objective = "dkvb"
    else:
        c.model.family = "probe"
        c.model.hidden = 128 if arg == "mlp" else 0
        c.objective = "probe"
    c.objective_config = ml_collections.ConfigDict({"label_smoothing": 0.1})

    c.data = pipeline.default_data_config("embeddings")
    c.optim = common.optim(lr=DKVB_LR if arg == "dkvb" else PROBE_LR, warmup_steps=0,
                           weight_decay=0.0, clip_norm=1.0)
    c.optim.name = "sgd"                         # plain SGD: no momentum, no weight decay
    c.optim.schedule = "constant"
    c.eval = common.evaluation(4)                # test batches per evaluation
    c.debug = common.debug()
    c.profile_steps = ()                     # (FIRST, LAST): trace those steps (WORKDIR/profile)
    return c


# ---------------------------------------------------------------------------------------------
# The figures' sizes (eval/class_incremental.py: dkvb_toy, dkvb_split_digits)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DKVBConfig:
    """Bottleneck sizes and key initialisation."""

    num_codebooks: int = 64  # C
    num_keys: int = 256  # K per codebook
    key_dim: int = 8  # d_k
    key_init_epochs: int = 10  # EMA k-means passes over the unlabelled key data
    key_init_decay: float = 0.95  # EMA decay (paper)
    key_init_batch: int = 256
    decoder: str = "vote"
    probe_lr: float = PROBE_LR  # SGD lr of the baselines (linear probe, MLP)


# The toy and split-digits figures' probes train at lr 0.3 (see the module docstring).
_FIG = dict(probe_lr=0.3)
TOY_SIZES = {
    # size: (DKVBConfig, epochs per task, test items per class, decision-map grid)
    "quick": (DKVBConfig(num_codebooks=8, num_keys=64, key_dim=2, key_init_epochs=10, **_FIG), 50,
              100, 60),
    "cpu": (DKVBConfig(num_codebooks=32, num_keys=128, key_dim=2, key_init_epochs=20, **_FIG), 100,
            200, 100),
    "paper": (DKVBConfig(num_codebooks=64, num_keys=400, key_dim=2, key_init_epochs=40, **_FIG),
              200, 500, 200),
}

DIGITS_SIZES = {
    # size: (DKVBConfig, epochs per task, encoder fitting epochs)
    "quick": (DKVBConfig(num_codebooks=32, num_keys=128, key_dim=8, key_init_epochs=5, **_FIG), 10,
              8),
    "cpu": (DKVBConfig(num_codebooks=64, num_keys=256, key_dim=8, key_init_epochs=10, **_FIG), 10,
            15),
    "paper": (DKVBConfig(num_codebooks=256, num_keys=512, key_dim=8, key_init_epochs=20, **_FIG),
              20, 30),
}

CIFAR_SIZES = {
    # size: (DKVBConfig, {dataset: epochs per task}, encoder fitting epochs (in-repo encoders
    # only)). "paper": the official sweeps (C=256, K=4096, d_k=14, 10 key-init epochs, decay
    # 0.95, probes at lr 1e-3; 2000 epochs per task on CIFAR-10, 500 on CIFAR-100).
    "tiny": (DKVBConfig(num_codebooks=4, num_keys=16, key_dim=4, key_init_epochs=1,
                        key_init_batch=32), {"cifar10": 1, "cifar100": 1}, 1),
    "quick": (DKVBConfig(num_codebooks=32, num_keys=128, key_dim=8, key_init_epochs=5),
              {"cifar10": 10, "cifar100": 10}, 8),
    "cpu": (DKVBConfig(num_codebooks=64, num_keys=256, key_dim=8, key_init_epochs=10),
            {"cifar10": 20, "cifar100": 20}, 15),
    "paper": (DKVBConfig(num_codebooks=256, num_keys=4096, key_dim=14, key_init_epochs=10),
              {"cifar10": 2000, "cifar100": 500}, 30),
}


def steps_for(num_items: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps for `epochs` passes over `num_items` items in batches of `batch_size`:
    as many items as the passes hold, rounded up to whole batches (batches run on across the
    passes' boundaries)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs_per_task={epochs!r} must be a positive int")
    if num_items < 1:
        raise ValueError("a task has no training items")
    return math.ceil(epochs * num_items / batch_size)


def task_phases(base: ml_collections.ConfigDict, tasks: Sequence[Sequence[int]],
                items_per_task: Sequence[int], *, epochs: int, eval_on: str = "seen"):
    """The trainer configs of a class-incremental stream: phase t trains on the classes of
    tasks[t] for `epochs` passes over its items_per_task[t] items, ending at the cumulative
    step; it evaluates on the classes seen so far (eval_on "seen") or on all ("all")."""
    if eval_on not in ("seen", "all"):
        raise ValueError(f"eval_on={eval_on!r} is not allowed; use 'seen' or 'all'")
    out, steps, seen = [], 0, []
    for classes, n in zip(tasks, items_per_task):
        c = base.copy_and_resolve_references()
        steps += steps_for(n, epochs, c.batch_size)
        seen += [int(k) for k in classes]
        c.num_steps = steps
        c.data.classes = tuple(int(k) for k in classes)
        c.data.eval_classes = tuple(seen) if eval_on == "seen" else ()
        c.keep_checkpoints = max(c.keep_checkpoints, len(tasks))
        out.append(c)
    return out
