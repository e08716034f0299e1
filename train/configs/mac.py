"""Memory of Amortized Contexts (Tack et al. 2024) on the synthetic fact stream.

    python -m eval.figures --only mac_online_adaptation,mac_retention --size cpu --out figures
    python -m eval.streaming_qa --workdir figures/mac_run-cpu-s0 --seed 0 --documents 16

The figure command trains what it needs with this config (`quick` for --size quick, `tiny` for
--size cpu, `paper` for --size paper): stage 1 trains the base LM on `document EOS question SEP
answer EOS` rows of the train entities, stage 2 freezes it and meta-trains MAC's amortization,
aggregation and prefix networks (train/objectives/mac.py). The run is saved under
figures/mac_run-SIZE-sSEED and reused. `paper` holds GPT-2-small sizes with the paper's T, P and
batch for accelerators (the paper's base LMs are DistilGPT2/GPT-2 with T5 amortization nets).
"""
import ml_collections

from models.mac import MACConfig
from models.transformer import TransformerConfig

VARIANTS = ("quick", "tiny", "paper")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"config variant {arg!r} is not allowed; use one of {VARIANTS}")
    quick, paper = arg == "quick", arg == "paper"
    c = ml_collections.ConfigDict()
    c.name = f"mac_{arg}"                        # run name (logs only)
    # MAC's two stages do not train through train/trainer.py yet (issue 16): train.main points
    # here instead of running.
    c.run_with = (f"python -m eval.figures --only mac_online_adaptation,mac_retention --size "
                  f"{'cpu' if arg == 'tiny' else arg}")
    c.seed = 0                                   # one seed → one run, bit for bit on CPU
    c.num_steps = {"quick": 3200, "tiny": 10000, "paper": 50_000}[arg]  # stage-2 steps
    c.batch_size = 16 if quick else 32           # K documents per stage-2 batch (= the bank)
    c.checkpoint_every = 1000 if paper else 0    # steps between checkpoints (0: only the end)
    c.eval_every = 1000 if paper else 0          # steps between evaluations (0: never)
    c.log_every = 100                            # steps between printed metrics
    # Mesh axes: -1 means "all the remaining devices"; the bank's entry axis is 'memory'.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})

    c.lm = ml_collections.ConfigDict()           # the frozen base LM (models/transformer.py)
    c.lm.vocab_size = 320                        # byte tokenizer (train/data/tokenizer.py)
    c.lm.width = 768 if paper else 64            # D (GPT-2 small: 768)
    c.lm.num_layers = 12 if paper else 2         # L
    c.lm.num_heads = 12 if paper else 4          # H

    c.mac = ml_collections.ConfigDict()          # models/mac.py MACConfig fields
    c.mac.num_tokens = 12 if paper else 4        # T modulation slots (paper: 12 for GPT-2)
    c.mac.prefix_len = 2 if paper else 4         # P prefix tokens per layer
    c.mac.enc_width = 512 if paper else 64       # encoder–decoder width (T5-small: 512)
    c.mac.enc_layers = 6 if paper else 2         # encoder blocks
    c.mac.dec_layers = 6 if paper else 1         # decoder blocks
    c.mac.enc_heads = 8 if paper else 4          # encoder–decoder heads
    c.mac.agg_blocks = 4                         # aggregation blocks (paper: 4)
    c.mac.agg_heads = 12 if paper else 4         # aggregation heads
    c.mac.mlp_ratio = 4                          # FFN hidden = ratio · width
    c.mac.prefix_hidden = 256 if paper else 64   # per-row prefix FFN hidden width
    c.mac.window = 0                             # hierarchical chunk W at training (0: flat)
    c.mac.topk = 0                               # CMT top-k at training (0: all documents)
    c.mac.init_scale = 1.0                       # MAC weights ~ N(0, scale/fan_in)
    # Per-row gain of the prefix rows at init: 0 starts meta-training from the unmodulated LM
    # (all-zero prefix keys/values) instead of a random prefix that pushed the frozen LM's answer
    # loss from 0.46 to ~3 nats/token at the first steps.
    c.mac.prefix_gain_init = 0.0

    c.lengths = ml_collections.ConfigDict()      # token lengths (train/objectives/mac.Lengths)
    c.lengths.doc = 112                          # S document bytes (fact stream ≤ 111)
    c.lengths.question = 32                      # Q question bytes
    c.lengths.qa = 40                            # `question SEP answer EOS`
    c.lengths.lm = 160                           # stage-1 row length

    c.data = ml_collections.ConfigDict()
    c.data.train_documents = 2000 if quick else 16000   # distinct train entities used

    c.stage1 = ml_collections.ConfigDict()       # base-LM training
    # The frozen LM only needs the QA format and the answer sets (the prefix supplies the
    # facts); 800 steps reach loss 0.25 on the mixed document+QA / QA-only rows at width 64
    # (~360 s on a loaded 2-core machine); quick stops at 500 (loss 0.3–0.4) to fit the demo.
    c.stage1.num_steps = {"quick": 500, "tiny": 800, "paper": 20_000}[arg]
    c.stage1.batch_size = 32                     # rows per step
    c.stage1.lr = 3e-3 if not paper else 6e-4    # Adam, constant after warm-up
    c.stage1.warmup_steps = 100                  # linear warm-up steps
    # Fraction of stage-1 rows that are packed `question SEP answer EOS` sequences without the
    # document: the frozen LM must answer in format (with the answer prior) when the question
    # directly follows the prefix, as in stage 2 and evaluation.
    c.stage1.qa_only_fraction = 0.5

    c.stage2 = ml_collections.ConfigDict()       # meta-training of g, h and the prefix FFN
    c.stage2.lr = 1e-3 if not paper else 1e-4    # Adam, constant after warm-up (paper: 1e-5)
    c.stage2.warmup_steps = 100                  # linear warm-up steps
    c.stage2.clip = 1.0                          # global-norm gradient clipping
    # Backpropagation dropout ρ. quick scores every document of its smaller batch: g then sees
    # as many documents with gradients per step as `tiny` does (16) and learns as fast per step.
    c.stage2.rho = 1.0 if quick else 0.5
    # Bank curriculum: each question's bank holds only its own document for the first
    # curriculum_start steps (g and h learn to carry the facts), then grows to all K documents
    # over curriculum_steps (h learns to pick the question's document). Growing from the start,
    # h's readout stayed at chance while g's reached 0.99.
    # quick holds the bank of one for 1,000 steps and then adds one document per ~130 steps: in
    # the tuning runs (seed 11) a bank grown to 16 over 500 steps left h's readout at chance
    # for the rest of the run, while this slower growth let it recover as the bank grew.
    c.stage2.curriculum_start = 1000 if quick else int(0.4 * c.num_steps)
    c.stage2.curriculum_steps = 2000 if quick else int(0.3 * c.num_steps)
    # Weight of the auxiliary readouts (train/objectives/mac.py; 0 disables them): linear heads
    # that read the answers from φ and from h's output, standing in for the paper's pre-trained
    # T5 encoders. Without them the tiny chain stayed at the answer prior.
    c.stage2.readout_weight = 1.0
    # Hierarchical term (train/objectives/mac.py): the questions are also answered through
    # hierarchical aggregation with chunks of W documents (W cycling through these windows, all
    # < batch_size) and that loss is added with this weight; 0 trains flat only, which left
    # hierarchical answers at chance (h never saw its own chunk outputs as a bank).
    c.stage2.hierarchical_windows = (4, 8)
    c.stage2.hierarchical_weight = 1.0

    c.eval = ml_collections.ConfigDict()
    c.eval.documents = 16                        # test documents streamed into the bank
    # Independent banks of `documents` test documents each (disjoint entities); EM/F1 are over
    # all their questions. One bank of 16 has 48 questions, where guessing (1/20) alone scores
    # above 0.1 one time in ten.
    c.eval.banks = 1 if quick else 4
    return c


def mac_config(c: ml_collections.ConfigDict) -> MACConfig:
    """The MACConfig (and base-LM TransformerConfig) of a config from `get_config`."""
    m = dict(c.mac)
    m["window"] = m["window"] or None
    m["topk"] = m["topk"] or None
    return MACConfig(lm=TransformerConfig(**dict(c.lm)), **m)
