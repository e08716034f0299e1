"""Birdie (Blouir et al. 2024): the six models of the comparison, one config file.

    python -m train.main --config train/configs/birdie.py:tiny --workdir runs/birdie_tiny
    python -m train.main --config train/configs/birdie.py:tiny:transformer_ntp --workdir runs/tr
    python -m train.main --config train/configs/birdie.py:paper:hawk_birdie \
        --workdir gs://BUCKET/hawk_birdie --config.mesh.fsdp=-1 --config.mesh.data=1

The argument is SIZE[:MODEL] with SIZE `tiny` (CPU, minutes) or `paper` (1.4B-parameter class,
accelerators) and MODEL one of MODELS (default gated_birdie):

| MODEL               | model                                  | data (birdie_data.py)  |
|---------------------|----------------------------------------|------------------------|
| transformer_ntp     | Transformer (models/transformer.py)    | next-token prediction  |
| transformer_birdie  | Transformer, prefix-LM attention       | Birdie's mixture       |
| gated_ntp           | gated SSM, every layer causal          | next-token prediction  |
| gated_birdie        | gated SSM, bidirectional/causal layers | Birdie's mixture       |
| gated_birdie_causal | gated SSM, every layer causal          | Birdie's mixture       |
| hawk_birdie         | Hawk (RG-LRU), bidirectional/causal    | Birdie's mixture       |

Every model of one size sees the same tokens per step (batch_size × seq_len) for the same number
of steps, and the sizes are chosen for (nearly) equal parameter counts (`param_counts` below
reports them, `python -m train.configs.birdie paper` prints them; `tests/eval/test_birdie_recall.py`
checks they agree within 10%, and the paper's within 2 % of 1.4B). The data are packed rows of the
objective set over text that holds no phone book (`tiny`: the local prose; `paper`: a prepared
TFDS text dataset, `--config.data.tfds_name=...`, with `--config.data.tokenizer=...`); the
phone-book task is not mixed in (`data.task_weight` 0). A phone-book fine-tune is the same command
in a fresh workdir started from the pre-trained parameters:

    python -m train.main --config train/configs/birdie.py:tiny --workdir runs/birdie_ft \
        --config.init_from=runs/birdie_tiny --config.data.task_weight=1.0

The Birdie models (`transformer_birdie`, `gated_birdie`, `gated_birdie_causal`, `hawk_birdie`)
train with the
reward-driven controller as a trainer hook (`hooks.birdie_controller`,
train/objectives/birdie_controller.py): it starts from Birdie's uniform mixture over objective
classes and, every `hooks.birdie_controller.every` steps, measures each configuration's
validation loss, updates and sets the mixture the following rows are drawn from (written to
metrics.jsonl as "mixture"). The NTP baselines have one objective and no controller.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from models import layers
from train import optim, trainer
from train.configs import common
from train.data import birdie_data, pipeline, recall
from train.data import tokenizer as tok
from train.objectives import birdie, birdie_controller

MODELS = ("transformer_ntp", "transformer_birdie", "gated_ntp", "gated_birdie",
          "gated_birdie_causal", "hawk_birdie")

# Paper sizes (`paper`), ≈1.4B parameters each (`param_counts("paper")`; tested within 2 %): the
# layer counts, the gated SSM's fused blocks (no separate MLP) with state 2560, Hawk's MLP ×3 and
# the Transformer's RoPE base 250k are the paper's table; the widths not given there are chosen
# to reach 1.4B: the Transformer's SwiGLU hidden 5,888, Hawk's D = 2,176 with a recurrence of
# 4/3·D (Griffin's), a gated (GeGLU) MLP as Griffin's. Vocabulary: the paper's 32k tokenizer plus
# Birdie's 64 special ids (PAPER_VOCAB; train/data/birdie_data.py maps a tokenizer's ids around
# them), untied input and output embeddings (the reference model's default).
PAPER_VOCAB = 32_000 + birdie_data.NUM_SPECIAL_IDS
PAPER = {
    "transformer": dict(width=2048, num_layers=24, num_heads=16, mlp="swiglu", mlp_hidden=5888,
                        rope_base=250_000.0),
    "gated": dict(width=2048, state_width=2560, num_layers=48, mlp_hidden=0),
    "hawk": dict(width=2176, state_width=2896, num_layers=20, mlp="geglu", mlp_hidden=3 * 2176,
                 hawk_heads=16),
}
# Tiny sizes: D = 64, 2 layers; SSM state 48 so the SSMs match the Transformer's ≈120k parameters.
TINY = {
    "transformer": dict(width=64, num_layers=2, num_heads=4),
    "gated": dict(width=64, state_width=48, num_layers=2, mlp_hidden=256),
    "hawk": dict(width=64, state_width=64, num_layers=2, mlp_hidden=256, hawk_heads=4),
}


def _model(name: str, paper: bool) -> ml_collections.ConfigDict:
    sizes = PAPER if paper else TINY
    m = ml_collections.ConfigDict()
    if name.startswith("transformer"):
        m.family = "transformer"                 # key into train.trainer.MODELS
        t = sizes["transformer"]
        m.vocab_size = PAPER_VOCAB if paper else tok.VOCAB_SIZE   # see PAPER_VOCAB; byte: 320
        m.width = t["width"]                     # D
        m.num_layers = t["num_layers"]           # L
        m.num_heads = t["num_heads"]             # H (head dim D/H)
        m.mlp = t.get("mlp", "gelu")             # 'gelu' | 'gelu_tanh' | 'swiglu'
        if "mlp_hidden" in t:
            m.mlp_hidden = t["mlp_hidden"]       # MLP hidden width (default 4·D)
        if "rope_base" in t:
            m.rope_base = t["rope_base"]         # RoPE base (θ)
        m.tie_embeddings = not paper             # lm head = embedding table (paper: untied)
        m.rope_interleaved = False               # half-rotation RoPE
        if name == "transformer_birdie":
            m.prefix_lm = True                   # the prompt attended bidirectionally
        m.dtype = "bfloat16" if paper else "float32"   # compute dtype; params stay float32
        m.remat = paper                          # recompute blocks in the backward pass
        return m
    mixer = "hawk" if name.startswith("hawk") else "gated"
    s = sizes[mixer]
    m.family = "ssm"                             # key into train.trainer.MODELS (models/ssm.py)
    m.vocab_size = PAPER_VOCAB if paper else tok.VOCAB_SIZE   # see PAPER_VOCAB; byte: 320
    m.width = s["width"]                         # D: residual width
    m.state_width = s["state_width"]             # Dh: recurrent state per layer (halves if 'b')
    m.num_layers = s["num_layers"]               # L: recurrent blocks
    m.mixer = mixer                              # 'gated' (Birdie §3.4) | 'hawk' (RG-LRU)
    # 'b' bidirectional, 'c' causal, cycled over layers: Birdie alternates them.
    m.layer_pattern = "c" if name in ("gated_ntp", "gated_birdie_causal") else "bc"
    m.mlp_hidden = s["mlp_hidden"]               # MLP after every recurrent block (0: none)
    if "mlp" in s:
        m.mlp = s["mlp"]                         # its kind (default GELU): 'geglu' is Griffin's
    m.hawk_heads = s.get("hawk_heads", 1)        # Hawk: block-diagonal gate blocks
    m.conv_width = 4                             # Hawk: causal Conv1D width
    m.chunk_size = 256 if paper else 0           # chunked scan for long rows (0: one scan)
    m.remat = paper                              # recompute blocks in the backward pass
    m.tie_embeddings = not paper                 # lm head = embedding table transposed
    m.dtype = "bfloat16" if paper else "float32"   # matmul dtype; recurrences stay float32
    return m


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    size, _, name = arg.partition(":")
    name = name or "gated_birdie"
    if size not in ("tiny", "paper"):
        raise ValueError(f"config variant {arg!r} is not allowed; use 'tiny' or 'paper', "
                         f"optionally ':MODEL' with MODEL in {MODELS}")
    if name not in MODELS:
        raise ValueError(f"config model {name!r} is not allowed; use one of {MODELS}")
    paper = size == "paper"
    ntp = name.endswith("_ntp")
    c = ml_collections.ConfigDict()
    c.name = f"birdie_{size}_{name}"         # run name (logs only)
    c.seed = 0                               # one seed → one run, bit for bit on CPU
    c.num_steps = 50_000 if paper else 200   # optimizer steps (same for every model)
    c.batch_size = 256 if paper else 8       # global batch (rows), split over the data axes
    c.seq_len = 2048 if paper else 384       # tokens per row: equal token budget per step
    c.checkpoint_every = 1000 if paper else 100   # steps between checkpoints (and at the end)
    c.eval_every = 1000 if paper else 100    # steps between evaluations (0: never)
    c.log_every = 50 if paper else 10        # steps between metrics.jsonl rows
    c.keep_checkpoints = 3                   # newest checkpoints kept on disk
    c.async_checkpoints = True               # save in a background thread
    c.progress = True                        # tqdm progress bar (loss, tokens/s)
    c.objective = "birdie"                   # key into train.trainer.OBJECTIVES (packed rows)
    c.init_from = ""                         # a workdir: start from its parameters (fine-tune)

    # Mesh axes: -1 means "all the remaining devices". data × fsdp × model = device count.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    # Overrides of the logical-axis rules in train/sharding.py, e.g. {"embed": None}.
    c.sharding_rules = ml_collections.ConfigDict()

    c.model = _model(name, paper)

    c.data = pipeline.default_data_config("birdie")
    c.data.objectives = "ntp" if ntp else "birdie"   # objective set (see birdie_data.py)
    # Pre-training text without the evaluation task's (item 7 of the Birdie issue): the local
    # prose on CPU; at paper size a prepared TFDS text dataset, the Pile in the paper
    # (--config.data.tfds_name=NAME, and --config.data.tokenizer=DIR for the paper's tokenizer).
    c.data.corpus = "tfds" if paper else "text"
    c.data.task_weight = 0.0                 # share of phone-book task examples (fine-tune: 1.0)
    c.data.with_prefix = name != "transformer_ntp"   # the causal Transformer takes no prefix
    c.data.phonebook_entries = (16, 48) if paper else (2, 4)   # entries per book
    c.data.phonebook_queries = (1, 8) if paper else (1, 2)     # queried names per task
    # How the objectives are built: the paper's settings; tiny keeps the compact ones, which the
    # CPU recipes (and the phone-book figure built on this config) were tuned on.
    c.data.objective_settings = pipeline.objective_settings_config(
        birdie.PAPER_SETTINGS if paper else birdie.COMPACT_SETTINGS)

    if not ntp:   # Birdie's reward-driven mixture (paper: its settings; tiny: a smaller model)
        c.hooks = ml_collections.ConfigDict()
        c.hooks.birdie_controller = (   # paper: the paper's controller, schedule and actions
            birdie_controller.hook_config(every=1000, kind="paper") if paper else
            birdie_controller.hook_config(every=10, hidden=32, train_steps=100,
                                          num_candidates=512))

    c.optim = common.optim(lr=3e-4 if paper else 3e-3,
                           warmup_steps=2000 if paper else 20,
                           weight_decay=0.1 if paper else 0.01)
    if paper:   # no decay on norms, biases, embeddings and the recurrences' own parameters
        c.optim.no_decay = optim.NO_DECAY
    c.eval = common.evaluation(20 if paper else 2)
    c.debug = common.debug()
    c.profile_steps = ()                     # (FIRST, LAST): trace those steps (WORKDIR/profile)
    return c


def param_counts(size: str = "tiny", names: tuple = MODELS) -> dict:
    """{MODEL: parameters} of the models `names` at `size`, from abstract shapes (nothing
    allocated). `python -m train.configs.birdie [SIZE]` prints them."""
    out = {}
    for name in names:
        c = get_config(f"{size}:{name}")
        model = trainer.build_model(c.model)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        out[name] = sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes))
    return out


# ---------------------------------------------------------------------------------------------
# The phone-book figure (eval/birdie_recall.py: birdie_phonebook), the paper's Fig. 1
# ---------------------------------------------------------------------------------------------
# Each arm trains in two phases through the trainer: pre-training (Birdie's objectives with the
# controller for the Birdie models, next-token prediction for the NTP baselines), then
# fine-tuning on the lookup task from the pre-trained parameters (init_from); books of
# `train_entries` names in both phases, evaluated on books of `entries` names with `queries`
# numbers asked (the x-axis; fine-tuning draws them uniformly from 1..max).
#
# paper: the paper's protocol. Pre-training is `get_config("paper:MODEL")` as it is (the 1.4B
# model on a TFDS text corpus without phone books, 50,000 steps of 256 × 2,048 tokens); then
# 1,000 fine-tuning steps of 64 rows × 16,384 tokens at lr 5e-5 on books of 200–800 entries;
# evaluated on 1,024 books of 750–800 entries, 1–32 numbers asked. Row lengths are in the
# paper's tokenizer's tokens (a run names it: `tokenizer`; 800 entries are ~28k byte tokens).
# cpu: the same proportions at a size 2 cores train: rows as full as the paper's (books of up
# to 21 entries fill 1,024 bytes with 4 numbers asked, max_example_length), evaluated books at
# 94–100 % of that (750–800 of 800), fine-tuning books from a quarter of it (200 of 800). Kept
# from the earlier recipe, not the paper's: pre-training on phone-book text (no queries; the
# prose alone teaches a 2-layer model no lookup in minutes), as many fine-tuning steps as
# pre-training steps (the paper's 2 % would be 3 steps), 1–4 numbers asked.
# quick: the demo-sized recipe (one book size).
PHONEBOOK_SIZES: dict[str, dict] = {
    "quick": dict(entries=(2, 2), train_entries=(2, 2), queries=(1, 2), tokenizer="byte",
                  width=32, state_width=32, num_layers=2, num_heads=2, pretrain_steps=20,
                  finetune_steps=20, rows=4, finetune_rows=4, row_length=320, lr=3e-3,
                  finetune_lr=3e-3, controller_every=10, eval_examples=8),
    "cpu": dict(entries=(20, 21), train_entries=(5, 21), queries=(1, 2, 4), tokenizer="byte",
                width=64, state_width=48, num_layers=2, num_heads=4, pretrain_steps=150,
                finetune_steps=150, rows=8, finetune_rows=8, row_length=1024, lr=3e-3,
                finetune_lr=3e-3, controller_every=50, eval_examples=32),
    # tokenizer None: the run gives it (eval.figures --tokenizer); pretrain_steps / rows /
    # lr / controller_every None: the paper config's own.
    "paper": dict(entries=(750, 800), train_entries=(200, 800), queries=(1, 2, 4, 8, 16, 32),
                  tokenizer=None, pretrain_steps=None, finetune_steps=1000, rows=None,
                  finetune_rows=64, row_length=16384, lr=None, finetune_lr=5e-5,
                  controller_every=None, eval_examples=1024),
}


def phonebook_phases(size: str, name: str, seed: int, *, tokenizer: str | None = None,
                     tfds_name: str = "") -> list:
    """[pre-training, fine-tuning] trainer configs of arm `name` of the phone-book figure at
    `size` (a PHONEBOOK_SIZES key). `tokenizer` replaces the size's (paper: required);
    `tfds_name`: the paper's pre-training corpus. The fine-tuning config's init_from is left to
    the caller (the pre-training run's workdir)."""
    s = PHONEBOOK_SIZES[size]
    tokenizer = tokenizer or s["tokenizer"]
    if tokenizer is None:
        raise ValueError(f"PHONEBOOK_SIZES[{size!r}].tokenizer is None: the {size} phone book's "
                         "rows are counted in the paper's tokenizer; give one (eval.figures "
                         "--tokenizer PATH: a folder or tokenizer.json)")
    pre = get_config(f"{'paper' if size == 'paper' else 'tiny'}:{name}")
    pre.seed = pre.data.data_seed = seed
    pre.data.tokenizer = tokenizer
    pre.data.phonebook_entries = tuple(s["train_entries"])
    pre.data.phonebook_queries = (min(s["queries"]), max(s["queries"]))
    pre.checkpoint_every = pre.eval_every = 0   # a checkpoint at the end of each phase
    if size == "paper":
        pre.data.tfds_name = tfds_name
    else:
        m = pre.model
        m.width, m.num_layers = s["width"], s["num_layers"]
        if m.family == "transformer":
            m.num_heads = s["num_heads"]
        else:
            m.state_width, m.mlp_hidden = s["state_width"], 4 * s["width"]
        pre.batch_size, pre.seq_len = s["rows"], s["row_length"]
        pre.data.corpus = "phonebook"
        pre.optim.lr, pre.optim.b2 = s["lr"], 0.98
        pre.num_steps = s["pretrain_steps"]
        pre.optim.warmup_steps = max(pre.num_steps // 20, 1)
        if "hooks" in pre:
            pre.hooks.birdie_controller.every = s["controller_every"]
    tune = pre.copy_and_resolve_references()
    pre.data.task_weight = 0.0
    tune.data.task_weight = 1.0                  # the task alone
    tune.data.corpus = "phonebook"               # (no text drawn: the task is every example)
    tune.batch_size, tune.seq_len = s["finetune_rows"], s["row_length"]
    tune.num_steps, tune.optim.lr = s["finetune_steps"], s["finetune_lr"]
    tune.optim.warmup_steps = max(tune.num_steps // 20, 1)
    if "hooks" in tune:          # the task alone: no mixture to choose
        del tune.hooks
    return [pre, tune]


# ---------------------------------------------------------------------------------------------
# The recall figure (eval/birdie_recall.py: birdie_recall)
# ---------------------------------------------------------------------------------------------
# Each arm is one trainer run (`recall_config`) on dataset "recall" (train/data/recall.py) with
# the loss on the answers: the NTP/bidirectional arms on the task throughout, the Birdie arms on
# the controller's mixture over Birdie's objectives on the key-value text and the task (the
# controller hook with `finetune_at`) for the first `pretrain_frac` of the steps, then on the
# task alone, under one learning-rate schedule.


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """An arm of the Birdie figures (recall and phone book)."""
    family: str             # "transformer" | "ssm"
    bidirectional: bool     # SSM: bidir_pattern (True) or all 'c'; True: gets the prefix
    mixer: str = "gated"    # SSM mixer
    birdie: bool = False    # pre-train on the controller's objective mixture, then fine-tune
    controller: str = "simple"   # the Birdie arms' controller kind (birdie_controller.KINDS)


ARMS = {
    "transformer_ntp": ArmSpec("transformer", False),
    "transformer_birdie": ArmSpec("transformer", True, birdie=True),
    "gated_ntp": ArmSpec("ssm", False),
    "gated_bidir": ArmSpec("ssm", True),
    "gated_birdie": ArmSpec("ssm", True, birdie=True),
    "gated_birdie_causal": ArmSpec("ssm", False, birdie=True),
    "hawk_birdie": ArmSpec("ssm", True, mixer="hawk", birdie=True),
    # gated_birdie under the paper's controller (train/objectives/birdie_paper_controller.py)
    "gated_birdie_paper": ArmSpec("ssm", True, birdie=True, controller="paper"),
}
RECALL_MODELS = ("transformer_ntp", "transformer_birdie", "gated_ntp", "gated_bidir",
                 "gated_birdie", "gated_birdie_causal", "gated_birdie_paper")

# The paper controller's schedule in the recall figure's CPU recipe (RECALL_SIZES "quick"/"cpu",
# whose controller chooses for 750 / 1,500 steps): the paper's steps (10, 50, 250, 500, 1000,
# 1500, 2000, then every 1000; warm-up 250) divided by 10. The exploration steps stay the
# controller's defaults (fractions of its steps); the reward model is the paper's.
RECALL_PAPER_CONTROLLER = dict(eval_steps=(1, 5, 25, 50, 100, 150, 200), every=100, warmup=25)

# Width-64 models: every model's embedding, untied head and (Transformer) weight matrices start at
# N(0, 0.125²) ≈ N(0, 1/D) instead of the 0.02 that suits D ≈ 768, with no weight decay. With
# the 0.02 init the models sat on the "random value from the prompt" plateau (the Transformer
# solved 2 pairs after 12k steps, never 8 in 24k); with this init the binding is learned within a
# few thousand steps (README, Birdie section).
_SMALL = dict(init_std=0.125, tie_embeddings=False, weight_decay=0.0)

RECALL_SIZES: dict[str, dict[str, Any]] = {
    # task: RecallTask fields. pairs: the x-axis; train_pairs: the pair counts mixed in training.
    # rows × row_length tokens per step for `steps` steps, the same for every model.
    # SSMs: `ssm_layers` blocks cycling `bidir_pattern`, MLP `ssm_mlp` wide (parameters matched
    # to the `num_layers`-layer Transformer, `transformer_mlp` wide, default 4·width); the Birdie
    # arms pre-train for `pretrain_frac`. init_std / tie_embeddings / weight_decay: see _SMALL
    # (defaults 0.02 / True / 0.01).
    # quick (the demo): the paper's claim only, causal vs bidirectional gated SSM, 3,000 steps
    # at lr 2e-3, blocks 'bc' cycled (b-c-b, the trainer config's pattern). With 'cbc' the
    # bidirectional model's escape from the loss plateau (~0.8) depended on the seed: step
    # ~1,000 on seed 0, ~1,400 on seed 5, never within 3,000 on seed 13 (gap 0.043). With 'bc'
    # it left by step 750 / 975 / 1,150 on seeds 0 / 5 / 13 (1.0 at 2 / 4 / 6 pairs on each).
    # Not the levers on seed 13 (cbc): lr 3e-3 / 4e-3, rows 8 × 6,000 steps, no 1-pair
    # examples, a distinct query form; init std 0.05 left at ~2,150. `models`: the arms trained.
    "quick": dict(task=dict(num_queries=1, key_range=(0, 8), value_range=(64, 72),
                            query_offset=0),
                  pairs=(2, 4, 6), train_pairs=(1, 2, 4, 6), width=64, state_width=32,
                  num_layers=2, num_heads=4, ssm_layers=3, bidir_pattern="bc", ssm_mlp=176,
                  steps=3000, rows=24, row_length=64, lr=2e-3, eval_examples=256,
                  controller_every=50, pretrain_frac=0.5, models=("gated_ntp", "gated_bidir"),
                  **_SMALL),
    # cpu: the Birdie arms pre-train for the first quarter; with half, the 3,000 fine-tuning
    # steps (the decayed half of the schedule) did not leave the plateau (README). Up to 6 pairs
    # and 24 rows: at 8 pairs, or with 16 rows, the Transformer's escape from the plateau
    # depended on the seed (README, "Why 6 pairs and 24 rows").
    "cpu": dict(task=dict(num_queries=1, key_range=(0, 8), value_range=(64, 72),
                          query_offset=0),
                pairs=(2, 4, 6), train_pairs=(1, 2, 4, 6), width=64, state_width=32,
                num_layers=2, num_heads=4, ssm_layers=3, bidir_pattern="cbc", ssm_mlp=176,
                steps=6000, rows=24, row_length=64, lr=1e-3, eval_examples=512,
                controller_every=100, pretrain_frac=0.25, **_SMALL),
    "paper": dict(task=dict(num_queries=4, key_range=(0, 128), value_range=(128, 192),
                            query_offset=0),
                  pairs=(16, 32, 64, 96, 128), train_pairs=(8, 16, 32, 64, 96, 128),
                  width=512, state_width=256, num_layers=4, num_heads=8, ssm_layers=6,
                  bidir_pattern="cbc", ssm_mlp=1408, steps=20000, rows=64, row_length=1024,
                  lr=1e-3, eval_examples=2048, controller_every=500, pretrain_frac=0.5),
}


def recall_task(size: str) -> recall.RecallTask:
    """The recall task's layout at `size` (a RECALL_SIZES key)."""
    return recall.RecallTask(**RECALL_SIZES[size]["task"])


def recall_model(name: str, s: dict) -> ml_collections.ConfigDict:
    """The model config of arm `name` at size dict `s` (a RECALL_SIZES entry).

    The Transformer has `num_layers` layers (attention 4·D² + MLP 8·D² each). SSMs have
    `ssm_layers` (default num_layers) recurrent blocks of state width `state_width`, each followed
    by a GELU MLP of `ssm_mlp` (default 4·D) so that parameter counts match; bidirectional SSMs
    cycle `bidir_pattern` ('b' bidirectional, 'c' causal), causal ones are all 'c'."""
    arm = ARMS[name]
    m = ml_collections.ConfigDict()
    m.family = arm.family                        # key into train.trainer.MODELS
    m.vocab_size = tok.VOCAB_SIZE
    m.width = s["width"]
    m.init_std = s.get("init_std", layers.DEFAULT_INIT_STD)
    m.tie_embeddings = s.get("tie_embeddings", True)
    if arm.family == "transformer":
        m.num_layers, m.num_heads = s["num_layers"], s["num_heads"]
        m.rope_interleaved = False
        if arm.bidirectional:
            m.prefix_lm = True                   # prefix-LM attention over the prompt
        if s.get("transformer_mlp"):
            m.mlp_hidden = s["transformer_mlp"]
        return m
    m.state_width = s["state_width"]
    m.num_layers = s.get("ssm_layers", s["num_layers"])
    m.mixer = arm.mixer
    m.layer_pattern = s.get("bidir_pattern", "bc") if arm.bidirectional else "c"
    m.mlp_hidden = s.get("ssm_mlp", 4 * s["width"])
    m.hawk_heads = 4 if arm.mixer == "hawk" else 1
    return m


def recall_config(size, name: str, seed: int) -> ml_collections.ConfigDict:
    """The trainer config of arm `name` of the recall figure at `size` (a RECALL_SIZES key, or a
    dict of its fields): `steps` steps of `rows` rows of `row_length` tokens, AdamW (warm-up over
    5 % of the steps, cosine to lr/10, b2 0.98, clip 1.0), the data seeded by `seed`. A Birdie
    arm with pretrain_frac 1 keeps the controller for the whole run (no fine-tuning)."""
    s = RECALL_SIZES[size] if isinstance(size, str) else size
    arm = ARMS[name]
    c = ml_collections.ConfigDict()
    c.name = f"birdie_recall_{size if isinstance(size, str) else 'custom'}_{name}"
    c.seed = seed
    c.num_steps = s["steps"]
    c.batch_size = s["rows"]
    c.seq_len = s["row_length"]
    c.checkpoint_every = 1000                # a killed figure run resumes from here
    c.keep_checkpoints = 1
    c.eval_every = 0                         # the figure scores the run when it ends
    c.log_every = 25
    c.progress = True
    c.objective = "birdie"                   # weighted next-token loss on packed rows
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    c.model = recall_model(name, s)
    c.data = pipeline.default_data_config("recall")
    for field, value in s["task"].items():
        c.data[field] = value
    c.data.pairs = tuple(s.get("train_pairs", s["pairs"]))
    c.data.objectives = "birdie"
    # The paper's objective settings at paper size; the CPU sizes (and custom ones) keep the
    # compact settings their recipes were tuned on.
    settings = birdie.PAPER_SETTINGS if size == "paper" else birdie.COMPACT_SETTINGS
    if arm.controller == "paper":   # the paper's action space: its settings are actions too
        settings = dataclasses.replace(settings, controlled=birdie.CONTROLLABLE)
    c.data.objective_settings = pipeline.objective_settings_config(settings)
    c.data.with_prefix = arm.bidirectional   # causal models read no prefix
    c.data.data_seed = seed
    c.data.num_validation = 64
    if arm.birdie:
        pretrain = int(round(s["steps"] * s["pretrain_frac"]))
        c.hooks = ml_collections.ConfigDict()
        finetune_at = pretrain if pretrain < s["steps"] else 0
        if arm.controller == "paper":
            # the paper's controller; at paper size its schedule, at CPU sizes the paper's / 10
            sched = {} if size == "paper" else dict(RECALL_PAPER_CONTROLLER)
            c.hooks.birdie_controller = birdie_controller.hook_config(
                every=sched.pop("every", 1000), kind="paper", finetune_at=finetune_at,
                rows_per_objective=2, **sched)
        else:
            c.hooks.birdie_controller = birdie_controller.hook_config(
                every=s["controller_every"], finetune_at=finetune_at, rows_per_objective=2,
                history=64, hidden=32, train_steps=100, num_candidates=512)
    c.optim = common.optim(lr=s["lr"], warmup_steps=max(s["steps"] // 20, 1), b2=0.98,
                           weight_decay=s.get("weight_decay", 0.01))
    c.eval = common.evaluation(1)
    return c


if __name__ == "__main__":
    import sys
    for model_name, n in param_counts(sys.argv[1] if len(sys.argv) > 1 else "paper").items():
        print(f"{model_name:20s} {n:>15,d}")
