"""The baseline decoder-only LM.

    python -m train.main --config train/configs/lm.py:tiny --workdir runs/lm_tiny
    python -m train.main --config train/configs/lm.py:paper --workdir gs://BUCKET/lm_paper \
        --config.mesh.fsdp=-1 --config.mesh.data=1

`tiny` trains a 2-layer, width-64 LM on multi-query associative recall (MQAR) in about a minute
on 2 CPU cores; `paper` is a GPT-2-small-sized (~125M parameter) LM on the local prose corpus, the
size a GPU/TPU user starts from. Any field can be overridden with --config.FIELD=VALUE.
The `lm_mqar` figure (eval/lm_mqar.py) trains `tiny` at its sizes (`--size quick|cpu|paper`):
MQAR_SIZES below, the run's trainer config `mqar_config`.

`hf=CHECKPOINT[,tokenizer=TOKENIZER]` fine-tunes a pretrained GPT-2 or LLaMA-family model (a
`save_pretrained` directory, or a hub id when online; models/pretrained.py) on the local prose
corpus, tokenized by the checkpoint's own tokenizer (its folder) or TOKENIZER:

    python -m train.main --config train/configs/lm.py:hf=/models/gpt2 --workdir runs/gpt2_ft
"""
import ml_collections

from train.configs import common
from train.data import pipeline


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg.startswith("hf="):
        return hf_config(arg)
    if arg not in ("tiny", "paper"):
        raise ValueError(f"config variant {arg!r} is not allowed; use 'tiny', 'paper' or "
                         "'hf=CHECKPOINT[,tokenizer=TOKENIZER]'")
    paper = arg == "paper"
    c = ml_collections.ConfigDict()
    c.name = f"lm_{arg}"                     # run name (logs only)
    c.seed = 0                               # one seed → one run, bit for bit on CPU
    c.num_steps = 60_000 if paper else 400   # optimizer steps
    c.batch_size = 256 if paper else 32      # global batch (rows), split over the mesh's data axes
    c.seq_len = 1024 if paper else 64        # tokens per row
    c.checkpoint_every = 1000 if paper else 100   # steps between checkpoints (and one at the end)
    c.eval_every = 1000 if paper else 100    # steps between evaluations (0: never)
    c.log_every = 50 if paper else 20        # steps between metrics.jsonl rows
    c.keep_checkpoints = 3                   # newest checkpoints kept on disk
    c.async_checkpoints = True               # save in a background thread
    c.progress = True                        # tqdm progress bar (loss, tokens/s)
    c.objective = "lm"                       # key into train.trainer.OBJECTIVES
    # the objective's settings (train/objectives/lm.py: loss): ce_chunk > 0 computes the
    # cross-entropy that many positions at a time (large vocabularies); 0: all at once
    c.objective_config = ml_collections.ConfigDict({"ce_chunk": 0})

    # Mesh axes: -1 means "all the remaining devices". data × fsdp × model = device count.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    # Overrides of the logical-axis rules in train/sharding.py, e.g. {"embed": None}.
    c.sharding_rules = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.family = "transformer"           # key into train.trainer.MODELS
    c.model.vocab_size = 320                 # byte tokenizer: 256 bytes + specials
    c.model.width = 768 if paper else 64     # D
    c.model.num_layers = 12 if paper else 2  # L
    c.model.num_heads = 12 if paper else 4   # H (head dim D/H)
    c.model.mlp = "gelu"                     # 'gelu' | 'gelu_tanh' | 'swiglu'
    c.model.norm = "rmsnorm"                 # 'rmsnorm' | 'layernorm' (no bias)
    c.model.tie_embeddings = True            # lm head = embedding table
    c.model.rope_interleaved = False         # half-rotation RoPE (True: pairs, as GPT-J)
    c.model.dtype = "bfloat16" if paper else "float32"   # compute dtype; params stay float32
    c.model.remat = paper                    # recompute blocks in the backward pass
    c.model.remat_policy = "full"            # what remat keeps: 'full' (nothing), 'dots', ...
    c.model.scan_layers = False              # blocks as one nn.scan (one block compiled)
    # dense attention: 'xla' (scores materialised), 'cudnn' (cuDNN's flash attention: GPUs,
    # bfloat16), 'splash' (Pallas splash attention: TPUs) or 'auto' (the backend's kernel
    # where it serves the call, else xla)
    c.model.attention_impl = "auto" if paper else "xla"

    # Data: MQAR for tiny (learnable in a minute), the local prose corpus for paper.
    c.data = pipeline.default_data_config("text" if paper else "mqar")

    c.optim = common.optim(lr=6e-4 if paper else 3e-3,
                           warmup_steps=2000 if paper else 40,
                           weight_decay=0.1 if paper else 0.01)
    c.eval = common.evaluation(20 if paper else 4)
    c.debug = common.debug()
    c.profile_steps = ()                     # (FIRST, LAST): trace those steps (WORKDIR/profile)
    return c


# ---------------------------------------------------------------------------------------------
# The lm_mqar figure's sizes (eval/lm_mqar.py)
# ---------------------------------------------------------------------------------------------
# Overrides of `tiny`. Every query of an example is asked (num_queries = num_pairs). Weights
# start at N(0, init_std²) with init_std ≈ 1/√width, without weight decay, and keys / values
# come from small ranges: with the tiny config's 0.02 init and 127 keys the model stays on the
# no_binding plateau (it copies a value of the context, not the queried key's) for the whole
# quick budget; README, "MQAR" has the runs.
MQAR_SIZES = {
    "quick": dict(num_steps=1000, batch_size=32, seq_len=24, width=64, num_pairs=4,
                  key_range=(1, 9), value_range=(128, 136), lr=3e-3, init_std=0.125,
                  weight_decay=0.0),
    "cpu": dict(num_steps=2000, batch_size=32, seq_len=32, width=64, num_pairs=8,
                key_range=(1, 17), value_range=(128, 144), lr=3e-3, init_std=0.125,
                weight_decay=0.0),
    # Not run here: Zoology-like ranges at width 256 (init_std = 1/√256).
    "paper": dict(num_steps=20000, batch_size=256, seq_len=512, width=256, num_pairs=64,
                  key_range=(1, 128), value_range=(128, 256), lr=1e-3, init_std=0.0625,
                  weight_decay=0.0),
}


def mqar_config(size: str, seed: int) -> ml_collections.ConfigDict:
    """The trainer config of the lm_mqar figure's run: `tiny` with MQAR_SIZES[size]."""
    s = MQAR_SIZES[size]
    c = get_config("tiny")
    c.seed = seed
    c.num_steps = s["num_steps"]
    c.batch_size = s["batch_size"]
    c.seq_len = s["seq_len"]
    c.model.width = s["width"]
    c.model.init_std = s["init_std"]
    c.optim.lr = s["lr"]
    c.optim.weight_decay = s["weight_decay"]
    c.data.source = "memory"          # examples generated on the fly: no build step
    c.data.num_pairs = s["num_pairs"]
    c.data.num_queries = s["num_pairs"]
    c.data.key_range = s["key_range"]
    c.data.value_range = s["value_range"]
    c.data.num_train = 1_000_000      # effectively never repeats: recall, not memorisation
    c.data.data_seed = seed
    c.checkpoint_every = 0
    c.eval_every = max(100, s["num_steps"] // 5)
    c.log_every = 10
    return c


# ---------------------------------------------------------------------------------------------
# Fine-tuning a pretrained checkpoint (models/pretrained.py)
# ---------------------------------------------------------------------------------------------
def hf_config(arg: str) -> ml_collections.ConfigDict:
    """The `hf=CHECKPOINT[,tokenizer=TOKENIZER]` variant: the model section is the checkpoint's
    (`pretrained.model_config`), `init_from_hf` loads its weights, the text dataset uses its
    tokenizer; model.vocab_size grows to the tokenizer's if that is larger (new rows: the mean
    row). Sizes for a few hundred CPU steps; raise them on accelerators."""
    from models import pretrained
    from train.data import tokenizer as tok_lib
    fields = dict(part.partition("=")[::2] for part in arg.split(","))
    unknown = sorted(set(fields) - {"hf", "tokenizer"})
    if unknown or not fields.get("hf"):
        raise ValueError(f"config variant {arg!r} is not allowed; use "
                         "'hf=CHECKPOINT[,tokenizer=TOKENIZER]'")
    checkpoint = fields["hf"]
    tokenizer = fields.get("tokenizer") or pretrained.resolve(checkpoint)
    vocab = tok_lib.load_tokenizer(tokenizer).vocab_size
    c = get_config("tiny")
    c.name = "lm_hf"
    c.init_from_hf = checkpoint              # weights (models/pretrained.py: from_hf)
    c.model = ml_collections.ConfigDict(pretrained.model_config(checkpoint))
    c.model.vocab_size = max(c.model.vocab_size, vocab)
    c.model.dtype = "float32"                # compute dtype ("bfloat16" on accelerators)
    c.num_steps = 200
    c.batch_size = 8
    c.seq_len = min(256, c.model.max_positions or 256)
    c.checkpoint_every = 100
    c.eval_every = 100
    c.data = pipeline.default_data_config("text")
    c.data.tokenizer = tokenizer
    c.optim = common.optim(lr=5e-5, warmup_steps=20, weight_decay=0.0)
    return c
