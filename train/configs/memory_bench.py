"""The memory benchmark's models (the `memory_bench` figure, eval/memory_bench.py).

    python -m train.main --config train/configs/memory_bench.py:dense --workdir runs/mb_dense
    python -m train.main --config train/configs/memory_bench.py:ssm_bidir,size=cpu --workdir D

Variants `MODEL[,size=quick|cpu|paper]` with MODEL one of MODELS. Every model is trained once per
seed, through the shared trainer, on one mixture of the probes' training splits
(train/data/memory_bench.py: a row is an MQAR, passkey, phone-book or streaming-QA example, each
probe a quarter of the rows, difficulties uniform in SIZES[size]'s training ranges; loss on the
answer tokens only), with the same batch, steps and sequence length, so every model sees the same tokens:

- dense        the baseline Transformer (full causal attention);
- landmark     the same Transformer with landmark attention (blocks of mem_freq tokens), read
               with the block memory at evaluation (models/landmark_memory.py);
- ssm_causal   Birdie's gated SSM, every layer causal, an MLP after each block (mlp_hidden set so
               that the parameter count is within 10 % of the Transformer's);
- ssm_bidir    the same SSM with bidirectional layers ('bc'), reading the prompt both ways
               (prefix-LM, the `prefix` the mixture's rows carry), trained with Birdie: a
               BIRDIE_FRACTION of its rows are Birdie's objectives (compact settings) over
               probe text, the rest the probes; which of Birdie's configurations those rows
               pack (the K that fit a row: train/data/memory_bench.py birdie_objectives, 18;
               17 at quick) is chosen as training goes by Birdie's controller, the paper's
               (`hooks.birdie_controller`, kind "paper", train/objectives/
               birdie_paper_controller.py: validation loss per configuration on the data's
               "validation" split, schedule CONTROLLER_SCHEDULE);
- hawk         Griffin's RG-LRU blocks (mixer 'hawk') at the same parameter budget;
- transformer_birdie  the dense Transformer with prefix-LM attention (train/configs/birdie.py's
               recall arm, `recall_model`), trained like ssm_bidir (the prompt as its prefix,
               a BIRDIE_FRACTION of rows Birdie's objectives under the paper's controller);
- mac          memory of amortized contexts (Tack et al. 2024): the dense run's Transformer,
               frozen (config.base_lm is the dense config: the trainer starts params["lm"] from
               WORKDIR/base_lm, which the figure links to the dense run), steered by an
               amortization network g (each document → T modulation slots, kept in a bank) and an
               aggregation network h (the question's code attends over the bank → a prefix of
               P keys/values per layer); g and h trained through the trainer (objective
               "mac_bench") on the same mixture posed to MAC (train/data/memory_bench_mac.py:
               the example's facts as documents, its question to the LM), the same steps and
               batch of examples.

The sliding-window Transformer (window = the training context T) is the dense run's parameters
evaluated with `model.window = T`: inside a T-token row no query reaches further back than T,
so its training is the dense run's, bit for bit (see `model_config`).
"""
import ml_collections

from train.configs import birdie as birdie_configs
from train.configs import common
from train.data import memory_bench as mb_data
from train.data import pipeline
from train.objectives import birdie_controller
from train.objectives import birdie_paper_controller as paper_controller

# Training order: mac after dense (its frozen LM is the dense run).
MODELS = ("dense", "landmark", "ssm_causal", "ssm_bidir", "hawk", "transformer_birdie", "mac")
# Models the figure evaluates: every trained one, and the window view of the dense run.
EVAL_MODELS = ("dense", "sliding_window", "landmark", "ssm_causal", "ssm_bidir", "hawk",
               "transformer_birdie", "mac")
BIRDIE_MODELS = ("ssm_bidir", "transformer_birdie")   # prefix readers trained with Birdie

# One entry per size. seq_len: T, the training context; eval_*: the swept difficulties (MQAR
# pairs, passkey prompt bytes up to 8 x T, phone-book entries, streaming-QA documents);
# train_*: the mixture's ranges; eval_examples: test examples per setting; mac_*: MAC's
# networks (models/mac.py MACConfig: doc_length S bytes per document, T slots, P prefix tokens
# per layer, width and blocks of g's and h's encoder-decoders, h's aggregation blocks, the FFNs'
# hidden ratio): at quick and cpu the networks hold about as many parameters as the LM.
SIZES = {
    "quick": dict(seq_len=128, width=48, num_layers=2, num_heads=4, batch_size=16,
                  num_steps=400, lr=3e-3, init_std=0.125, mem_freq=15,
                  train_pairs=(1, 8), train_lengths=(mb_data.PASSKEY_MIN, 122),
                  train_entries=(1, 2), train_documents=(1, 3),
                  eval_pairs=(2, 4, 8, 16, 32), eval_lengths=(128, 256, 512, 1024),
                  eval_entries=(1, 2, 4, 8, 16), eval_documents=(1, 2, 4, 8, 16),
                  eval_examples=32, mac_doc_length=48, mac_slots=4, mac_prefix=2,
                  mac_enc_width=16, mac_enc_layers=1, mac_agg_blocks=1, mac_mlp_ratio=1),
    "cpu": dict(seq_len=256, width=64, num_layers=2, num_heads=4, batch_size=16,
                num_steps=400, lr=3e-3, init_std=0.125, mem_freq=31,
                train_pairs=(1, 16), train_lengths=(mb_data.PASSKEY_MIN, 250),
                train_entries=(1, 6), train_documents=(1, 7),
                eval_pairs=(2, 4, 8, 16, 32, 48), eval_lengths=(256, 512, 1024, 2048),
                eval_entries=(1, 2, 4, 8, 16, 32), eval_documents=(1, 2, 4, 8, 16, 32),
                eval_examples=64, mac_doc_length=48, mac_slots=4, mac_prefix=2,
                mac_enc_width=16, mac_enc_layers=1, mac_agg_blocks=1, mac_mlp_ratio=1),
    # Not run here: accelerator sizes.
    "paper": dict(seq_len=1024, width=512, num_layers=8, num_heads=8, batch_size=64,
                  num_steps=20000, lr=1e-3, init_std=0.044, mem_freq=63,
                  train_pairs=(1, 64), train_lengths=(mb_data.PASSKEY_MIN, 1018),
                  train_entries=(1, 28), train_documents=(1, 34),
                  eval_pairs=(4, 8, 16, 32, 64), eval_lengths=(1024, 2048, 4096, 8192),
                  eval_entries=(2, 8, 32, 64, 128), eval_documents=(2, 8, 32, 64, 128),
                  eval_examples=256, mac_doc_length=64, mac_slots=12, mac_prefix=2,
                  mac_enc_width=256, mac_enc_layers=4, mac_agg_blocks=4, mac_mlp_ratio=2),
}
BIRDIE_FRACTION = 0.25   # BIRDIE_MODELS: share of rows packed with Birdie's objectives
# The paper controller's schedule below `paper` size: the paper's (updates at steps 10, 50, 250,
# 500, 1000, 1500, 2000, then every 1000; uniform mixture for the first 250) as fractions of the
# `paper` size's steps, which birdie_paper_controller.resolve_step scales to the run's: 400 steps
# update at 1, 5, 10, 20, 30, 40, then every 20, uniform for 5. At `paper` size the paper's steps.
# The exploration steps are the controller's defaults (fractions); the reward model the paper's.
_PAPER = paper_controller.PaperControllerConfig
CONTROLLER_SCHEDULE = dict(
    eval_steps=tuple(v / SIZES["paper"]["num_steps"] for v in _PAPER.eval_steps),
    every=_PAPER.eval_every / SIZES["paper"]["num_steps"],
    warmup=_PAPER.warmup / SIZES["paper"]["num_steps"])
CONTROLLER_ROWS = 2   # balanced validation rows per configuration at each controller update
TOP_K = 4          # landmark memory inference: blocks retrieved per token and head (paper: 2, 4)


def ssm_mlp_hidden(width: int, num_layers: int) -> int:
    """The SSM's MLP width whose parameter count matches the Transformer's at (width, layers).

    Per layer the Transformer has 4·D² (attention) + 8·D² (4D MLP) + 2·D (norms); the gated SSM
    4·D·D + D·D + D (w_in, w_out, b_f) + 2·D·h (MLP) + norms. Matching the D² terms gives
    h = 3.5·D."""
    del num_layers
    return int(3.5 * width)


def model_config(name: str, size: str) -> ml_collections.ConfigDict:
    """The model section of model `name` (one of EVAL_MODELS) at `size`."""
    if name not in EVAL_MODELS:
        raise ValueError(f"model={name!r} is not allowed; allowed: {EVAL_MODELS}")
    s = SIZES[size]
    if name == "mac":
        return mac_model_config(size)
    m = ml_collections.ConfigDict()
    if name == "transformer_birdie":
        # Birdie's recall arm (prefix-LM attention), at this size, with the dense run's layout.
        m = birdie_configs.recall_model(name, s)
        m.mlp, m.norm, m.dtype = "gelu", "rmsnorm", "float32"
        return m
    if name in ("dense", "sliding_window", "landmark"):
        m.family = "landmark" if name == "landmark" else "transformer"   # train.trainer.MODELS
        m.vocab_size = 320                  # byte tokenizer: 256 bytes + specials
        m.width = s["width"]                # D
        m.num_layers = s["num_layers"]      # L
        m.num_heads = s["num_heads"]        # H
        m.mlp = "gelu"                      # 4·D GELU MLP
        m.norm = "rmsnorm"
        m.tie_embeddings = True             # lm head = embedding table
        m.rope_interleaved = False          # half-rotation RoPE
        m.init_std = s["init_std"]          # N(0, init_std²) weights (MQAR learns from ~1/√D)
        m.dtype = "float32"                 # compute dtype
        if name == "sliding_window":
            m.window = s["seq_len"]         # each query sees its T most recent tokens
        if name == "landmark":
            m.attention = "landmark"        # models.landmark.ATTENTION_FNS
            m.mem_freq = s["mem_freq"]      # regular tokens per block (+ 1 landmark)
            m.landmark_id = 260             # tokenizer.LANDMARK
        return m
    m.family = "ssm"                        # train.trainer.MODELS: models.ssm.BiSSMLM
    m.vocab_size = 320
    m.width = s["width"]                    # D; the recurrent state Dh = D
    m.num_layers = s["num_layers"]          # L recurrent blocks
    m.mixer = "hawk" if name == "hawk" else "gated"     # Griffin's RG-LRU | Birdie's gated SSM
    m.layer_pattern = "bc" if name == "ssm_bidir" else "c"   # 'b' bidirectional, 'c' causal
    m.mlp_hidden = ssm_mlp_hidden(s["width"], s["num_layers"])   # params ≈ the Transformer's
    m.init_std = s["init_std"]              # embedding and MLP init
    m.dtype = "float32"
    return m


def mac_model_config(size: str) -> ml_collections.ConfigDict:
    """MAC's model section (train/objectives/mac.py MetaModel): the dense Transformer as its LM
    and MAC's networks at `size`."""
    s = SIZES[size]
    m = ml_collections.ConfigDict()
    m.family = "mac"                         # train.trainer.MODELS: objectives.mac.MetaModel
    lm = model_config("dense", size).to_dict()
    del lm["family"]
    m.lm = ml_collections.ConfigDict(lm)     # the frozen LM: the dense run's Transformer
    m.num_tokens = s["mac_slots"]            # T modulation slots per document
    m.prefix_len = s["mac_prefix"]           # P prefix tokens per LM layer
    m.enc_width = s["mac_enc_width"]         # g's and h's encoder-decoder width
    m.enc_layers = s["mac_enc_layers"]       # their encoder blocks
    m.dec_layers = 1                         # their decoder blocks (T queries cross-attend)
    m.enc_heads = 4
    m.agg_blocks = s["mac_agg_blocks"]       # h's blocks over the bank (paper: 4)
    m.agg_heads = s["num_heads"]
    m.mlp_ratio = s["mac_mlp_ratio"]         # FFN hidden = ratio · width
    m.prefix_hidden = s["mac_enc_width"]     # the per-row prefix FFN's hidden width
    m.init_scale = 1.0                       # MAC weights ~ N(0, 1/fan_in)
    m.prefix_gain_init = 0.0                 # start from the unmodulated LM
    m.pad_id = 256                           # byte PAD pads documents and questions
    m.window = 0                             # flat aggregation (no hierarchy)
    m.topk = 0                               # every document of the bank
    m.readout_relations = 0                  # no training-only readout heads
    return m


def bench_config(name: str, size: str, seed: int) -> ml_collections.ConfigDict:
    """The trainer config of model `name` (one of MODELS) at `size` under `seed`."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not allowed; allowed: {MODELS}")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed; use one of {sorted(SIZES)}")
    s = SIZES[size]
    c = ml_collections.ConfigDict()
    c.name = f"memory_bench_{name}_{size}"   # run name (logs only)
    c.seed = seed                            # init, shuffle and the mixture's content
    c.num_steps = s["num_steps"]             # optimizer steps (same for every model)
    c.batch_size = s["batch_size"]           # global batch (rows)
    c.seq_len = s["seq_len"]                 # T: tokens per row (the training context)
    c.checkpoint_every = 0                   # one checkpoint, at the end
    c.eval_every = 0                         # the figure evaluates the probes itself
    c.log_every = 10                         # metrics.jsonl rows (tokens_per_s: the cost)
    c.keep_checkpoints = 1
    c.async_checkpoints = False
    c.progress = False
    # lm: plain next-token loss; landmark: landmarks inserted in the step; birdie: the loss
    # with the row's `prefix` passed to the model (the bidirectional SSM's prompt).
    c.objective = {"landmark": "landmark", "ssm_bidir": "birdie", "transformer_birdie": "birdie",
                   "mac": "mac_bench"}.get(name, "lm")
    c.objective_config = ml_collections.ConfigDict()
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    c.sharding_rules = ml_collections.ConfigDict()
    c.model = model_config(name, size)
    c.data = pipeline.default_data_config("memory_bench")
    c.data.mqar_pairs = s["train_pairs"]
    c.data.passkey_lengths = s["train_lengths"]
    c.data.phonebook_entries = s["train_entries"]
    c.data.streamqa_documents = s["train_documents"]
    c.data.data_seed = seed
    c.data.birdie_fraction = BIRDIE_FRACTION if name in BIRDIE_MODELS else 0.0
    if name in BIRDIE_MODELS:   # Birdie's reward-driven mixture over its configurations
        sched = {} if size == "paper" else dict(CONTROLLER_SCHEDULE)
        c.hooks = ml_collections.ConfigDict()
        c.hooks.birdie_controller = birdie_controller.hook_config(
            every=sched.pop("every", _PAPER.eval_every), kind="paper",
            rows_per_objective=CONTROLLER_ROWS, **sched)
    c.optim = common.optim(lr=s["lr"], warmup_steps=max(1, s["num_steps"] // 20),
                           weight_decay=0.0)
    if name == "mac":
        c.data.mac_doc_length = s["mac_doc_length"]   # the facts as documents of S bytes
        c.optim.frozen = ("lm",)                  # the dense LM stays as trained
        c.base_lm = bench_config("dense", size, seed)   # stage 1: the dense run
    c.eval = common.evaluation(1)
    c.debug = common.debug()
    c.profile_steps = ()
    return c


def get_config(arg: str = "dense") -> ml_collections.ConfigDict:
    name, _, rest = arg.partition(",")
    size = "quick"
    if rest:
        key, _, value = rest.partition("=")
        if key != "size" or not value:
            raise ValueError(f"config variant {arg!r} is not allowed; use "
                             f"'MODEL[,size=SIZE]' with MODEL in {MODELS}")
        size = value
    return bench_config(name, size, 0)
