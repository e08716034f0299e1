"""Memory of Amortized Contexts (Tack et al. 2024) on the synthetic fact stream: both stages
through the shared trainer.

    mnemax-train --config mac:tiny --workdir runs/mac_tiny
    python -m eval.streaming_qa --workdir runs/mac_tiny --seed 0 --documents 16
    python -m eval.figures --only mac_online_adaptation,mac_retention --size cpu --out figures

One command trains both stages (train/objectives/mac.py): stage 1 (`base_lm`, a whole trainer
config) trains the base LM into WORKDIR/base_lm on `document EOS question SEP answer EOS` rows of
the train entities (skipped once finished); stage 2 (this config) starts its "lm" parameters
from it, keeps them frozen through the optimizer (optim.frozen) and meta-trains MAC's
amortization, aggregation and prefix networks. `quick` is the demo's run (--size quick), `tiny`
the cpu figures' (--size cpu), `paper` GPT-2-small sizes with the paper's T, P and batch for
accelerators (the paper's base LMs are DistilGPT2/GPT-2 with T5 amortization nets).
"""
import ml_collections

from train.configs import common
from train.data import facts, pipeline

VARIANTS = ("quick", "tiny", "paper")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"config variant {arg!r} is not allowed; use one of {VARIANTS}")
    quick, paper = arg == "quick", arg == "paper"
    c = ml_collections.ConfigDict()
    c.name = f"mac_{arg}"                        # run name (logs, progress bar)
    # One seed for both stages' initialisation, shuffling and the fact stream's content.
    seed = ml_collections.FieldReference(0)
    c.seed = seed                                # one seed → one run, bit for bit on CPU
    c.num_steps = {"quick": 3200, "tiny": 10000, "paper": 50_000}[arg]  # stage-2 steps
    c.batch_size = 16 if quick else 32           # K documents per stage-2 batch (= the bank)
    c.checkpoint_every = 1000                    # steps between checkpoints (and one at the end)
    c.keep_checkpoints = 2                       # newest checkpoints kept on disk
    c.eval_every = 1000 if paper else 0          # steps between evaluations (0: never)
    c.log_every = 100                            # steps between metrics.jsonl rows
    c.progress = True                            # tqdm progress bars
    # Mesh axes: -1 means "all the remaining devices"; the bank's entry axis is 'memory'.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})

    lm = ml_collections.ConfigDict()             # the frozen base LM (models/transformer.py)
    lm.vocab_size = 320                          # byte tokenizer (train/data/tokenizer.py)
    lm.width = 768 if paper else 64              # D (GPT-2 small: 768)
    lm.num_layers = 12 if paper else 2           # L
    lm.num_heads = 12 if paper else 4            # H

    c.model = ml_collections.ConfigDict()        # train.objectives.mac.MetaModel
    c.model.family = "mac"                       # key into train.trainer.MODELS
    c.model.lm = lm
    # models/mac.py MACConfig fields:
    c.model.num_tokens = 12 if paper else 4      # T modulation slots (paper: 12 for GPT-2)
    c.model.prefix_len = 2 if paper else 4       # P prefix tokens per layer
    c.model.enc_width = 512 if paper else 64     # encoder–decoder width (T5-small: 512)
    c.model.enc_layers = 6 if paper else 2       # encoder blocks
    c.model.dec_layers = 6 if paper else 1       # decoder blocks
    c.model.enc_heads = 8 if paper else 4        # encoder–decoder heads
    c.model.agg_blocks = 4                       # aggregation blocks (paper: 4)
    c.model.agg_heads = 12 if paper else 4       # aggregation heads
    c.model.mlp_ratio = 4                        # FFN hidden = ratio · width
    c.model.prefix_hidden = 256 if paper else 64  # per-row prefix FFN hidden width
    c.model.window = 0                           # hierarchical chunk W at evaluation (0: flat)
    c.model.topk = 0                             # CMT top-k at evaluation (0: all documents)
    c.model.init_scale = 1.0                     # MAC weights ~ N(0, scale/fan_in)
    # Per-row gain of the prefix rows at init: 0 starts meta-training from the unmodulated LM
    # (all-zero prefix keys/values) instead of a random prefix that pushed the frozen LM's answer
    # loss from 0.46 to ~3 nats/token at the first steps.
    c.model.prefix_gain_init = 0.0
    # Readout heads (training only, see objective_config.readout_weight): one per relation.
    c.model.readout_relations = len(facts.RELATIONS)

    # Stage-2 data: one record per document with all its questions (train/data/mac_data.py).
    c.data = pipeline.default_data_config("mac_meta")
    documents = ml_collections.FieldReference(2000 if quick else 16000)
    c.data.documents = documents                 # distinct train entities used (both stages)
    c.data.data_seed = seed                      # the fact stream's content
    c.data.doc_length = 112                      # S document bytes (fact stream ≤ 111)
    c.data.question_length = 32                  # Q question bytes
    c.data.qa_length = 40                        # `question SEP answer EOS`
    c.seq_len = c.data.doc_length                # model init length; tokens/s counts documents

    # Meta-training of g, h and the prefix FFN: Adam, constant after a warm-up (paper: 1e-5 at
    # its sizes), global-norm clipping; the base LM frozen.
    c.optim = _adam(lr=1e-4 if paper else 1e-3)
    c.optim.frozen = ("lm",)
    c.objective = "mac_meta"                     # key into train.trainer.OBJECTIVES
    o = c.objective_config = ml_collections.ConfigDict()   # train.objectives.mac.meta_objective
    # Backpropagation dropout ρ. quick scores every document of its smaller batch: g then sees
    # as many documents with gradients per step as `tiny` does (16) and learns as fast per step.
    o.rho = 1.0 if quick else 0.5
    # Bank curriculum: each question's bank holds only its own document for the first
    # curriculum_start steps (g and h learn to carry the facts), then grows to all K documents
    # over curriculum_steps (h learns to pick the question's document). Growing from the start,
    # h's readout stayed at chance while g's reached 0.99.
    # quick holds the bank of one for 1,000 steps and then adds one document per ~130 steps: in
    # the tuning runs (seed 11) a bank grown to 16 over 500 steps left h's readout at chance
    # for the rest of the run, while this slower growth let it recover as the bank grew.
    o.curriculum_start = 1000 if quick else int(0.4 * c.num_steps)
    o.curriculum_steps = 2000 if quick else int(0.3 * c.num_steps)
    # Weight of the auxiliary readouts (train/objectives/mac.py; 0 disables them): linear heads
    # that read the answers from φ and from h's output, standing in for the paper's pre-trained
    # T5 encoders. Without them the tiny chain stayed at the answer prior.
    o.readout_weight = 1.0
    # Hierarchical term: the questions are also answered through hierarchical aggregation with
    # chunks of W documents (W cycling through these windows, all < batch_size) and that loss is
    # added with this weight; 0 trains flat only, which left hierarchical answers at chance (h
    # never saw its own chunk outputs as a bank).
    o.hierarchical_windows = (4, 8)
    o.hierarchical_weight = 1.0

    c.eval = common.evaluation(4)                # validation batches per evaluation
    c.eval.documents = 16                        # figures: test documents streamed into a bank
    # Independent banks of `documents` test documents each (disjoint entities); EM/F1 are over
    # all their questions. One bank of 16 has 48 questions, where guessing (1/20) alone scores
    # above 0.1 one time in ten.
    c.eval.banks = 1 if quick else 4
    c.debug = common.debug()
    c.profile_steps = ()                     # (FIRST, LAST): trace those steps (WORKDIR/profile)

    # Stage 1, the base LM: its own trainer run in WORKDIR/base_lm, before stage 2.
    b = c.base_lm = ml_collections.ConfigDict()
    b.name = f"mac_{arg}_base_lm"
    b.seed = seed
    # The frozen LM only needs the QA format and the answer sets (the prefix supplies the
    # facts); 800 steps reach loss 0.25 on the mixed document+QA / QA-only rows at width 64;
    # quick stops at 500 (loss 0.3–0.4) to fit the demo.
    b.num_steps = {"quick": 500, "tiny": 800, "paper": 20_000}[arg]
    b.batch_size = 32                            # rows per step
    b.seq_len = 160                              # row length
    b.checkpoint_every = 1000 if paper else 0    # 0: only at the end
    b.keep_checkpoints = 1
    b.eval_every = 0
    b.log_every = 100
    b.progress = True
    b.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    b.model = ml_collections.ConfigDict({"family": "transformer", **lm.to_dict()})
    b.data = pipeline.default_data_config("mac_lm")
    b.data.documents = documents
    b.data.data_seed = seed
    # Fraction of rows that are packed `question SEP answer EOS` sequences without the document:
    # the frozen LM must answer in format (with the answer prior) when the question directly
    # follows the prefix, as in stage 2 and evaluation.
    b.data.qa_only_fraction = 0.5
    b.optim = _adam(lr=6e-4 if paper else 3e-3)
    b.objective = "lm"
    b.eval = common.evaluation(4)
    b.debug = common.debug()
    return c


def _adam(*, lr: float) -> ml_collections.ConfigDict:
    """Adam (no weight decay, β2 0.999), linear warm-up over 100 steps to a constant lr,
    global-norm clipping at 1."""
    o = common.optim(lr=lr, warmup_steps=100, weight_decay=0.0, b2=0.999, clip_norm=1.0)
    o.schedule = "constant"
    return o
