"""Landmark attention LM (Mohtashami & Jaggi 2023).

    python -m train.main --config train/configs/landmark.py:tiny --workdir runs/landmark_tiny
    python -m train.main --config train/configs/landmark.py:tiny_baseline --workdir runs/lm_passkey
    python -m train.main --config train/configs/landmark.py:paper --workdir gs://BUCKET/landmark \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

`tiny` (CPU, minutes): a 2-layer, width-64 LM with landmark attention on 256-byte windows, blocks of
31 bytes + 1 landmark (blocks of 15 split the key's digits between blocks too often: 0.225 at
2048 bytes instead of 0.975), trained on the local prose corpus mixed with the paper's
passkey prompts (train/data/passkey_data.py: every row one prompt that fills the window, its
answer digits weighted 10×; untied embeddings, constant lr). The `landmark_passkey` figure
(eval/passkey.py) trains it as a length curriculum in one resumed run: full-window prompts until
the copy circuit forms, then prompts of varied length, i.e.

    python -m train.main --config train/configs/landmark.py:tiny --workdir runs/landmark_tiny \
        --config.num_steps=3000
    python -m train.main --config train/configs/landmark.py:tiny --workdir runs/landmark_tiny \
        --config.num_steps=5500 --config.data.min_length=128 \
        --allow_config_change=data.min_length

(the trainer resumes a workdir only under the config its run was trained with, run-control
fields such as num_steps aside, so the second phase names the field it changes). The figure's
sizes (`--size quick|cpu|paper`) are PASSKEY_SIZES below, its runs' trainer configs
`passkey_phase_configs`; the `landmark_perplexity` figure reuses those runs and reads its
lengths and windows from PERPLEXITY_SIZES.

Evaluate it far beyond 256 bytes with
`python -m eval.passkey --workdir runs/landmark_tiny --lengths 256,512,1024,2048`.
`tiny_baseline` is the same run with plain causal attention and no landmarks (the comparison).
`paper` is the paper's LM (Sec. 4.1): 12 layers, 8 heads × 128, context 512, blocks of 50,
AdamW β=(0.9, 0.95), weight decay 1e-3, lr 2e-3 with cosine decay and 2% warm-up, batch 128, on
PG-19 read through TFDS (array_record; prepare it once with `data.download=True` or point
`data.data_dir` at a prepared copy), in the official lm_benchmark training layout
(`official_layout`, train/data/token_stream.py: the split as one EOS-separated token stream,
rows at random offsets of it, a landmark after every 50th token of the stream, EOS inputs'
targets masked; `official_optim`: no weight decay on norms and the embedding, no clipping,
cosine to lr/5 as the official OneCycleLR). `model.group_dropout` (official --group_dropout) is
0 (off) in every variant; `model.attention_impl` is 'xla' (the blockwise attention; 'pallas'
runs the backend's flash-style kernels, models/landmark_pallas.py on a GPU and
models/landmark_pallas_tpu.py on a TPU; 'auto' too). Differences from
the paper: byte tokens (V = 320) instead of GPT-2's BPE; a row holds 512 raw tokens (the
official 512 count its landmarks). Any field can be overridden with --config.FIELD=VALUE.

`tiny_official` is `tiny`'s model on the local prose corpus in that layout (CPU);
`tiny_xl` / `paper_xl` the Transformer-XL baseline of Table 1 (objective `transformer_xl`,
train/objectives/transformer_xl.py: rows read in pieces, each attending to a cache of the
tokens before it; XL_SIZES), on the same data without landmarks:

    python -m train.main --config train/configs/landmark.py:paper_xl --workdir gs://BUCKET/xl
    python -m eval.landmark_perplexity --workdir gs://BUCKET/xl     # full + the pg19_xl rows

`hf=CHECKPOINT[,tokenizer=TOKENIZER][,size=tiny|paper]` fine-tunes a pretrained LLaMA-family
model with landmarks, as the official `llama/` recipe (epfml/landmark-attention, llama/train.py
and the README's fine-tuning command): the checkpoint's decoder (models/pretrained.py:
model_config; GQA, RoPE base and scaling, SwiGLU, RMSNorm, untied head) with the grouped softmax
in every layer, the tokenizer (the checkpoint's folder, or TOKENIZER) with the LANDMARK token
appended, the embedding (and head) grown to hold it (new rows: the mean row, as the official
`smart_tokenizer_and_embedding_resize`), a landmark after every 50 tokens:

    python -m train.main --config train/configs/landmark.py:hf=/models/llama-7b,size=paper \
        --workdir gs://BUCKET/llama_landmark --config.mesh.fsdp=-1 --config.mesh.data=1

`size=paper` is the official fine-tune: 15,000 steps of 128 rows × 512 tokens (8 GPUs × 2 rows ×
8 accumulation steps), AdamW lr 2e-5, weight decay 0.1, 3% warm-up then cosine to ~10% (HF
`get_cosine_schedule_with_warmup` with num_cycles 0.4 ends at 0.095; ours decays to 0.1),
bfloat16. It trains on the local prose corpus unless `data` is pointed elsewhere (the official
run read RedPajama-Data-1T-Sample through `datasets`, which is not read here). `size=tiny`
(default): a few steps on CPU for the tests (tests/data/hf/llama_gqa with the
tests/data/hf/tok_sp_llama tokenizer).
"""
import ml_collections

from train import optim as optim_lib
from train.configs import common
from train.data import pipeline, tokenizer

VARIANTS = ("tiny", "tiny_baseline", "paper", "tiny_official", "tiny_xl", "paper_xl")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg.startswith("hf="):
        return hf_config(arg)
    if arg in ("tiny_official", "tiny_xl", "paper_xl"):
        return official_config(arg)
    if arg.split(",")[0] in ("paper", "paper_xl") and "," in arg:
        return tokenizer_config(arg)
    if arg not in VARIANTS:
        raise ValueError(f"config variant {arg!r} is not allowed; use one of {VARIANTS} or "
                         "'hf=CHECKPOINT[,tokenizer=TOKENIZER][,size=tiny|paper]'")
    paper = arg == "paper"
    baseline = arg == "tiny_baseline"
    c = ml_collections.ConfigDict()
    c.name = f"landmark_{arg}"               # run name (logs only)
    c.seed = 0                               # init/shuffle seed: one seed → one run, bit for bit on CPU
    c.num_steps = 240_000 if paper else 1500  # optimizer steps (tiny baseline copies keys by ~1400)
    c.batch_size = 128 if paper else 16      # global batch (rows), split over the mesh's data axes
    c.seq_len = 512 if paper else 256        # raw tokens per row (landmarks are added on top)
    c.checkpoint_every = 5000 if paper else 400   # steps between checkpoints (and one at the end)
    c.eval_every = 5000 if paper else 400    # steps between evaluations (0: never)
    c.log_every = 100 if paper else 20       # steps between metrics.jsonl rows
    c.keep_checkpoints = 3                   # newest checkpoints kept on disk
    c.async_checkpoints = True               # save in a background thread
    c.progress = True                        # tqdm progress bar (loss, tokens/s)
    # key into train.trainer.OBJECTIVES: 'landmark' inserts landmarks into each raw batch inside
    # the jitted step (train/objectives/landmark.py); the baseline uses plain next-token 'lm'.
    c.objective = "lm" if baseline else "landmark"

    # Mesh axes: -1 means "all the remaining devices". data × fsdp × model = device count.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    # Overrides of the logical-axis rules in train/sharding.py, e.g. {"embed": None}.
    c.sharding_rules = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.family = "transformer" if baseline else "landmark"   # key into train.trainer.MODELS
    c.model.vocab_size = tokenizer.VOCAB_SIZE   # byte tokenizer: 256 bytes + specials (incl. LANDMARK)
    c.model.width = 1024 if paper else 64    # D
    c.model.num_layers = 12 if paper else 2  # L
    c.model.num_heads = 8 if paper else 4    # H (head dim D/H: 128 for paper, 16 for tiny)
    c.model.mlp = "gelu"                     # 'gelu' (exact, as the official GPT) | 'gelu_tanh' | 'swiglu'
    c.model.norm = "layernorm"               # weight-only LayerNorm, as the official GPT
    # lm head = embedding table (official GPT). tiny unties it: with tied embeddings no tiny run
    # (landmark or baseline, 4 runs, 800-1220 steps) started copying the key; untied, the baseline
    # began copying it after ~600 steps under the same data and optimizer.
    c.model.tie_embeddings = paper
    c.model.rope_interleaved = True          # pairs (x0,x1),(x2,x3)… as the official rotary code
    c.model.attention = "dense" if baseline else "landmark"   # models.landmark.ATTENTION_FNS
    c.model.dtype = "bfloat16" if paper else "float32"   # compute dtype; params stay float32
    c.model.remat = paper                    # recompute blocks in the backward pass
    if not baseline:
        c.model.mem_freq = 50 if paper else 31    # regular tokens per block (block = them + 1 landmark)
        c.model.landmark_id = tokenizer.LANDMARK  # the landmark token (id 260)
        c.model.pos_jump = 0                  # paper's positional jumps after landmarks (0: off)
        # official --group_dropout: each earlier block dropped from a query's attention with
        # this probability in training (models/landmark.py: group_keep); 0 (official None): off
        c.model.group_dropout = 0.0
        # 'landmark' attention's implementation (models.landmark.IMPLS): 'xla' blockwise,
        # 'pallas' (the backend's flash-style kernels: models/landmark_pallas.py on a GPU,
        # models/landmark_pallas_tpu.py on a TPU; no group dropout), 'pallas_gpu' /
        # 'pallas_tpu' (one by name), 'auto' (pallas on a GPU or TPU, xla elsewhere)
        c.model.attention_impl = "xla"

    if paper:
        # PG-19 through the real TFDS path (array_record via tfds.data_source; nothing in tests),
        # in the official lm_benchmark layout (train/data/token_stream.py).
        c.data = pipeline.default_data_config("tfds")
        c.data.tfds_name = "pg19"
        c.data.text_key = "book_text"
        official_layout(c.data, c.model.get_ref("mem_freq"))
    else:
        # The local prose corpus mixed with the paper's passkey prompts (generated when read).
        c.data = pipeline.default_data_config("passkey")
        # Rows that start with a passkey prompt of random length (answer, EOS, then prose fills
        # the window); the rest are prose windows. At 0.5 (0.8) the landmark model had not
        # started copying digits after 1300 (850) steps; the baseline learned on prompts.
        c.data.passkey_fraction = 1.0
        c.data.num_digits = 5                # 5-digit keys
        c.data.intro = False                 # no task line (it would fill half a 256-byte window)
        # Every prompt fills the window (as the baseline, which learned at 256 bytes), and
        # the answer digits weigh 10× so the retrieval signal is not drowned by the filler.
        c.data.min_length = c.seq_len - c.data.num_digits
        c.data.answer_weight = 10.0

    # The paper's optimizer: AdamW β=(0.9, 0.95), lr 2e-3, weight decay 1e-3, cosine with 2%
    # warm-up (a reference: overriding num_steps moves it too).
    c.optim = common.optim(lr=2e-3, weight_decay=1e-3,
                           warmup_steps=c.get_ref("num_steps") // 50 if paper else 60)
    if paper:
        official_optim(c.optim)
    else:
        # tiny: constant lr (the copy circuit forms late; a cosine decay had lowered the lr before
        # it), AdamW's usual β2 = 0.999 and no weight decay.
        c.optim.min_lr_ratio = 1.0
        c.optim.b2 = 0.999
        c.optim.weight_decay = 0.0
    c.eval = common.evaluation(20 if paper else 4)
    c.debug = common.debug()
    c.profile_steps = ()                     # (FIRST, LAST): trace those steps (WORKDIR/profile)
    return c


# ---------------------------------------------------------------------------------------------
# The official lm_benchmark training layout, and the Transformer-XL baseline
# ---------------------------------------------------------------------------------------------
def official_layout(data: ml_collections.ConfigDict, mem_freq) -> None:
    """Sets a text data config ('text' or 'tfds') to the official lm_benchmark layout
    (train/data/token_stream.py): the split as one EOS-separated token stream, rows at uniformly
    random offsets of it (optim/utils.py: get_batch), landmarks after every `mem_freq`-th token
    of the stream (data/utils.py: add_mem_tokens; 0: no landmarks), EOS inputs' targets
    masked. The stream is cached under ~/.cache/mnemax/streams (override data.stream_dir)."""
    data.windows = "random"
    data.mask_after_eos = True
    data.stream_mem_freq = mem_freq
    data.stream_dir = "~/.cache/mnemax/streams"
    data.shard_mode = "records"              # each process reads its own windows
    data.worker_count = 4                    # reading windows is CPU work: use grain workers


def official_optim(o: ml_collections.ConfigDict) -> None:
    """The official optimizer groups and schedule on top of `common.optim` (main.py,
    models/base_new.py: get_parameter_group_specs): no weight decay on biases, norms and the
    (tied) embedding (optim.NO_DECAY), no gradient clipping, and OneCycleLR's cosine end: its
    initial lr is lr / div_factor (100), its last that divided by final_div_factor (0.05), i.e.
    lr / 5 (its warm-up starts at lr / 100; ours at 0)."""
    o.no_decay = optim_lib.NO_DECAY
    o.clip_norm = None
    o.min_lr_ratio = 0.2


def tokenizer_config(arg: str) -> ml_collections.ConfigDict:
    """`paper,tokenizer=TOKENIZER[,text_dir=DIR]` / `paper_xl,...`: the variant on another
    tokenizer's ids (train/data/tokenizer.py: load_tokenizer; GPT-2's BPE as the official
    lm_benchmark: a folder with its tokenizer.json, prepared once with
    `transformers.AutoTokenizer.from_pretrained("gpt2").save_pretrained(DIR)`) and/or another
    corpus: `text_dir` a folder of .txt / .tex files (the arXiv-math set: the papers' sources,
    prepared by the user; the "local_text" TFDS build, train/data/text_corpus.py). The landmark
    variant appends LANDMARK (official: GPT-2's 50257 ids, the landmark 50260); the vocabulary
    is rounded up to a multiple of 64 (official 50304)."""
    name, _, rest = arg.partition(",")
    fields = dict(part.partition("=")[::2] for part in rest.split(","))
    if not fields or not set(fields) <= {"tokenizer", "text_dir"} or not all(fields.values()):
        raise ValueError(f"config variant {arg!r} is not allowed; use "
                         f"'{name},tokenizer=TOKENIZER[,text_dir=DIR]' or '{name},text_dir=DIR'")
    c = get_config(name)
    if fields.get("text_dir"):   # the "text" dataset on the folder, in PG-19's layout
        pg19, c.data = c.data, pipeline.default_data_config("text")
        for key in ("pack", "add_bos", "tokenizer", "windows", "mask_after_eos",
                    "stream_mem_freq", "stream_dir"):
            c.data[key] = pg19[key]
        c.data.text_dir = fields["text_dir"]
    if not fields.get("tokenizer"):
        return c
    xl = name == "paper_xl"
    tok = (tokenizer.load_tokenizer(fields["tokenizer"]) if xl
           else landmark_tokenizer(fields["tokenizer"]))
    c.data.tokenizer = tok.spec              # e.g. "/models/gpt2+LANDMARK"
    c.model.vocab_size = -(-tok.vocab_size // 64) * 64
    if not xl:
        c.model.landmark_id = tok.special("LANDMARK")
    return c


# Transformer-XL (official --optimization_process transformer_xl, --lm_cache kv_cache_train;
# train/objectives/transformer_xl.py): the row length (--total_sequence_length), the piece
# length (--sequence_length) and the cache (--mem_cache_size). The official repository gives no
# training command for its pg19_xl run; the piece and the cache are its evaluation's
# (eval_cmd_generator.py pg19_xl rows: --mid_length 256, --mem_cache_size 256), the row length
# that of its longer Table 1 column but one (2048).
XL_SIZES = {"tiny_xl": dict(seq_len=128, piece_len=32, cache_len=32),
            "paper_xl": dict(seq_len=2048, piece_len=256, cache_len=256)}


def official_config(arg: str) -> ml_collections.ConfigDict:
    """`tiny_official` (the tiny landmark LM on the local prose in the official layout, CPU),
    `tiny_xl` and `paper_xl` (the Transformer-XL baseline: `paper`'s model without landmarks,
    dense attention, trained with the XL cache, in the official layout)."""
    xl = arg in XL_SIZES
    paper = arg == "paper_xl"
    c = get_config("paper" if paper else "tiny")
    c.name = f"landmark_{arg}"
    if paper:
        c.data = pipeline.default_data_config("tfds")     # PG-19, as `paper`
        c.data.tfds_name = "pg19"
        c.data.text_key = "book_text"
        official_layout(c.data, 0)                        # no landmarks
    else:
        # the local prose corpus (generated in memory) instead of the passkey mixture
        c.data = pipeline.default_data_config("text")
        c.data.source = "memory"
        official_layout(c.data, 0 if xl else c.model.get_ref("mem_freq"))
        c.data.stream_dir = ""               # small: kept in memory
        c.data.shard_mode = "rows"
        c.data.worker_count = 0
        c.num_steps = 200
        c.seq_len = 128
        c.checkpoint_every = c.eval_every = 100
        official_optim(c.optim)
        c.optim.weight_decay = 1e-3          # the paper's decay, so no_decay has work to do
    if xl:
        s = XL_SIZES[arg]
        c.seq_len = s["seq_len"]             # tokens per row, read in pieces
        c.objective = "transformer_xl"
        # piece_len: tokens per forward pass; cache_len: earlier tokens each piece attends to
        c.objective_config = ml_collections.ConfigDict(
            {"piece_len": s["piece_len"], "cache_len": s["cache_len"]})
        c.model.family = "transformer"
        c.model.attention = "dense"
        for f in ("mem_freq", "landmark_id", "pos_jump", "group_dropout", "attention_impl"):
            del c.model[f]
    return c


# ---------------------------------------------------------------------------------------------
# The landmark figures' sizes (eval/passkey.py: landmark_passkey; eval/landmark_perplexity.py:
# landmark_perplexity, which reuses landmark_passkey's runs)
# ---------------------------------------------------------------------------------------------
# landmark_passkey: overrides of `tiny` (and `tiny_baseline`) and the evaluation.
# `phases`: (last step, shortest prompt in bytes) in order; None = every prompt fills the window.
# A length curriculum: with full-window prompts the copy circuit forms (the tiny landmark model
# copied the key at the training length after ~3000 steps, but only there: its question always
# ended at the same position); the second phase varies the prompt length (then EOS and prose),
# which is what let memory inference answer beyond one window at all. One trainer run resumed
# per phase (same workdir, optimizer and data iterator carried over).
#
# `quick` (what `make demo` runs) trains nothing: the copy circuit needs thousands of steps (the
# cpu recipe, 5,500), far beyond a demo's minutes, so it evaluates the `cpu` recipe's landmark run
# of seed 3, trained by the project's own command and committed under results/checkpoints/
# (`shipped`: (size, seed) of the recipe; see results/checkpoints/README.md). Its baseline
# transformer is not shipped; `quick` compares memory inference with full attention of the same
# weights.
PASSKEY_SIZES = {
    "quick": dict(shipped=("cpu", 3), lengths=(256, 512, 1024, 2048), trials=20),
    "cpu": dict(phases=((3000, None), (5500, 128)), batch_size=16, seq_len=256, width=64,
                num_layers=2, lengths=(256, 512, 1024, 2048), trials=40),
    "paper": dict(phases=((15000, None), (20000, 256)), batch_size=64, seq_len=512, width=256,
                  num_layers=4, lengths=(512, 1024, 2048, 4096, 8192, 16384), trials=100),
}

# What one phase of the figure's run changes from the one before (the length curriculum); the
# trainer refuses any other difference between the workdir's run and the phase's config.
PASSKEY_PHASE_CHANGES = ("data.min_length",)


def passkey_config(size: str, seed: int, *, baseline: bool = False,
                   phase: int = -1) -> ml_collections.ConfigDict:
    """The trainer config of landmark_passkey's landmark (or baseline) run at the end of `phase`
    (index into PASSKEY_SIZES[size]['phases']; -1: the last)."""
    s = PASSKEY_SIZES[size]
    end_step, min_length = s["phases"][phase]
    c = get_config("tiny_baseline" if baseline else "tiny")
    c.seed = seed
    c.data.data_seed = seed
    c.num_steps = end_step
    c.batch_size = s["batch_size"]
    c.seq_len = s["seq_len"]
    full = s["seq_len"] - c.data.num_digits               # a prompt that fills the window
    c.data.min_length = full if min_length is None else min(min_length, full)
    c.model.width = s["width"]
    c.model.num_layers = s["num_layers"]
    c.checkpoint_every = 0
    c.eval_every = 0
    c.log_every = 10
    c.progress = False
    c.mesh.data = 1                   # one device: the figure's numbers do not depend on the host
    return c


def passkey_phase_configs(size: str, seed: int, *, baseline: bool = False) -> list:
    """The trainer configs of landmark_passkey's landmark (or baseline) run, one per phase of
    PASSKEY_SIZES[size]['phases']."""
    return [passkey_config(size, seed, baseline=baseline, phase=p)
            for p in range(len(PASSKEY_SIZES[size]["phases"]))]


# landmark_perplexity: the evaluation lengths and held-out prose windows per length; its runs
# are landmark_passkey's at the same size.
PERPLEXITY_SIZES = {
    "quick": dict(lengths=(256, 512, 1024, 2048), windows=4),   # the shipped passkey run
    "cpu": dict(lengths=(256, 512, 1024, 2048), windows=8),
    "paper": dict(lengths=(512, 2048, 4096, 8192), windows=8),
}


# ---------------------------------------------------------------------------------------------
# A pretrained LLaMA-family model fine-tuned with landmarks (the official llama/ recipe)
# ---------------------------------------------------------------------------------------------
HF_MEM_FREQ = 50      # a landmark after every 50 tokens (official run_test.py: mem_freq=50; the
                      # llama/train.py flag defaults to 63, the README's command leaves it)


def landmark_tokenizer(spec: str):
    """The tokenizer at `spec` with the LANDMARK special appended (kept if `spec` has one)."""
    t = tokenizer.load_tokenizer(spec)
    try:
        t.special("LANDMARK")
        return t
    except ValueError:
        return t.add_special_tokens(["LANDMARK"])


def hf_config(arg: str) -> ml_collections.ConfigDict:
    """The `hf=CHECKPOINT[,tokenizer=TOKENIZER][,size=tiny|paper]` variant (module docstring):
    model = the checkpoint's decoder (family 'landmark', attention 'landmark'), init_from_hf loads
    its weights, the text dataset uses the tokenizer with LANDMARK appended, vocab_size grows to
    hold it."""
    from models import pretrained
    fields = dict(part.partition("=")[::2] for part in arg.split(","))
    unknown = sorted(set(fields) - {"hf", "tokenizer", "size"})
    size = fields.get("size", "tiny")
    if unknown or not fields.get("hf") or size not in ("tiny", "paper"):
        raise ValueError(f"config variant {arg!r} is not allowed; use "
                         "'hf=CHECKPOINT[,tokenizer=TOKENIZER][,size=tiny|paper]'")
    paper = size == "paper"
    checkpoint = fields["hf"]
    tok = landmark_tokenizer(fields.get("tokenizer") or pretrained.resolve(checkpoint))
    body = pretrained.model_config(checkpoint)
    if body.get("positions") != "rope":
        raise ValueError(f"hf={checkpoint!r} has positions={body.get('positions')!r}; landmark "
                         "fine-tuning needs a RoPE decoder (LLaMA family)")
    c = get_config("tiny")
    c.name = f"landmark_hf_{size}"
    c.init_from_hf = checkpoint              # weights (models/pretrained.py: from_hf)
    c.seed = 0
    c.num_steps = 15_000 if paper else 3     # official: --max_steps 15000
    c.batch_size = 128 if paper else 2       # official: 8 GPUs × 2 rows × 8 accumulation steps
    c.seq_len = 512 if paper else 100        # raw tokens per row (official model_max_length 512)
    c.checkpoint_every = 2000 if paper else 0   # official: --save_steps 2000
    c.eval_every = 0                         # official: --evaluation_strategy "no"
    c.log_every = 1                          # official: --logging_steps 1
    c.progress = paper                       # tqdm progress bar
    c.objective = "landmark"
    c.model = ml_collections.ConfigDict(body)
    c.model.family = "landmark"              # models.landmark.LandmarkLM over the checkpoint's body
    c.model.attention = "landmark"           # the grouped softmax in every layer
    c.model.vocab_size = max(body["vocab_size"], tok.vocab_size)   # grown to hold LANDMARK
    c.model.mem_freq = HF_MEM_FREQ           # regular tokens per block
    c.model.landmark_id = tok.special("LANDMARK")   # the appended token (official "<landmark>")
    c.model.pos_jump = 0                     # the LLaMA fine-tune uses no positional jumps
    c.model.dtype = "bfloat16" if paper else "float32"   # official: --bf16 True
    c.model.remat = paper                    # recompute blocks in the backward pass
    c.data = pipeline.default_data_config("text")
    c.data.tokenizer = tok.spec              # e.g. "/models/llama-7b+LANDMARK"
    # official: AdamW (HF Trainer: β = (0.9, 0.999), ε 1e-8), lr 2e-5, weight decay 0.1,
    # warm-up 3% of the steps, cosine (num_cycles 0.4: ends near 10% of the peak).
    c.optim = common.optim(lr=2e-5, weight_decay=0.1, b2=0.999, min_lr_ratio=0.1,
                           warmup_steps=max(1, round(0.03 * c.num_steps)),
                           grad_accum=8 if paper else 1)
    if not paper:
        c.optim.lr = 1e-3                    # a few CPU steps: large enough to move the loss
    c.eval = common.evaluation(4)
    return c
