"""MAC's own experiment (Tack et al. 2024, §4): a frozen pretrained GPT-2-family LM, amortization
(g) and aggregation (h) networks initialised from T5 encoders, meta-trained on a real QA stream
(StreamingQA, ArchivalQA or SQuAD in their official formats) through the shared trainer.

    mnemax-train --config mac_qa:VARIANT[,OPTION=VALUE...] --workdir RUN
    python -m eval.streaming_qa --dataset streamingqa --data_dir D --workdir RUN
        [--uniform] [--retrieval]      (the baselines beside MAC: eval/qa_baselines.py)

VARIANT: `tiny` (CPU, the tests: tests/data/hf/gpt2 with tests/data/hf/tok_bpe, T5 encoders from
tests/data/hf/t5_relu with tests/data/hf/tok_sp, the synthetic tests/data/qa files) or a paper
setting of the official code (jihoontack/MAC, conf/mode/amortize_encdec_*.yaml, conf/config.yaml):

| variant          | base LM (lm=)  | g's T5 (t5=) | h's T5 (question_t5=) | T  | ρ    |
|------------------|----------------|--------------|-----------------------|----|------|
| paper            | distilgpt2     | t5-base      | t5-base               | 12 | 1.0  |
| paper-gpt2-large | gpt2-large     | t5-base      | t5-base               | 24 | 0.25 |
| paper-gpt2-xl    | gpt2-xl        | t5-large     | t5-base               | 24 | 0.25 |
| paper-llama2-7b  | meta-llama/Llama-2-7b-hf | t5-large | t5-base           | 24 | 0.25 |

all with P = 2 prefix tokens per layer, Adam lr 1e-5 (constant after a warm-up over 1% of the
steps, global-norm clipping at 100, no weight decay), 64 QA rows per step (official micro-batches
of 16, accumulated), 50 epochs of the train split, 4 aggregation blocks; the auxiliary readouts,
the bank curriculum and the hierarchical term of the CPU toy (train/configs/mac.py) are off.
Departures: g's and h's T5 *encoders* are loaded (the official code loads whole T5
encoder–decoders and feeds learnable prompts to the decoder; here T learnable queries cross-attend
through `models/mac.py`'s decoder blocks, trained from scratch); answers are decoded greedily.

OPTIONs: dataset=streamingqa|archivalqa|squad, data_dir=D (the official train.csv/val.csv/test.csv;
SQuAD: the TFDS data_dir), lm=, t5=, question_t5= (save_pretrained folders, or hub ids when
online), lm_tokenizer=, amort_tokenizer= (default: the lm and t5 folders). Paper variants count
the train split's rows to set num_steps (SQuAD: the official 39,893), so D must hold train.csv.
"""
from __future__ import annotations

import math
import pathlib

import ml_collections

from train.configs import common
from train.data import facts, mac_qa, pipeline

HF = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data"
PAPER = {   # variant → (lm, g's T5, h's T5, T, ρ)
    "paper": ("distilgpt2", "t5-base", "t5-base", 12, 1.0),
    "paper-gpt2-large": ("gpt2-large", "t5-base", "t5-base", 24, 0.25),
    "paper-gpt2-xl": ("gpt2-xl", "t5-large", "t5-base", 24, 0.25),
    "paper-llama2-7b": ("meta-llama/Llama-2-7b-hf", "t5-large", "t5-base", 24, 0.25),
}
VARIANTS = ("tiny",) + tuple(PAPER)
OPTIONS = ("dataset", "data_dir", "lm", "t5", "question_t5", "lm_tokenizer", "amort_tokenizer")
EPOCHS = 50                    # official n_epochs
BATCH = 64                     # QA rows per optimizer step
SQUAD_TRAIN_ROWS = 82011 - 42118   # facts.SQUAD_SPLITS["train"]


def parse(arg: str) -> tuple[str, dict]:
    """'VARIANT[,OPTION=VALUE...]' → (variant, options); ValueError naming what is wrong."""
    variant, *rest = arg.split(",")
    if variant not in VARIANTS:
        raise ValueError(f"config variant {variant!r} is not allowed; use one of {VARIANTS}")
    opts = {}
    for part in rest:
        k, eq, v = part.partition("=")
        if k not in OPTIONS or not eq or not v:
            raise ValueError(f"config option {part!r} is not allowed; use OPTION=VALUE with "
                             f"OPTION in {OPTIONS}")
        opts[k] = v
    if opts.get("dataset", "streamingqa") not in facts.QA_FORMATS:
        raise ValueError(f"dataset={opts['dataset']!r} is not allowed; use one of "
                         f"{facts.QA_FORMATS}")
    return variant, opts


def train_rows(dataset: str, data_dir: str) -> int:
    """Rows of the train split (num_steps = EPOCHS · rows / BATCH)."""
    if dataset == "squad":
        return SQUAD_TRAIN_ROWS
    return len(facts.load_qa_split(dataset, data_dir, "train"))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    from models import pretrained
    from train.objectives import mac as mac_obj
    variant, o = parse(arg)
    tiny = variant == "tiny"
    dataset = o.get("dataset", "streamingqa")
    if tiny:
        lm, t5, qt5, T, rho = (str(HF / "hf" / "gpt2"), str(HF / "hf" / "t5_relu"),
                               str(HF / "hf" / "t5_relu"), 4, 1.0)
        data_dir = o.get("data_dir", str(HF / "qa" / dataset) if dataset != "squad" else "")
        lm_tok = o.get("lm_tokenizer", str(HF / "hf" / "tok_bpe"))
        amort_tok = o.get("amort_tokenizer", str(HF / "hf" / "tok_sp"))
    else:
        lm, t5, qt5, T, rho = PAPER[variant]
        data_dir = o.get("data_dir", "")
        if dataset != "squad" and not data_dir:
            raise ValueError(f"config variant {variant!r} with dataset={dataset!r} needs "
                             "data_dir=D, the folder of the official train.csv, val.csv, test.csv")
        lm_tok, amort_tok = o.get("lm_tokenizer"), o.get("amort_tokenizer")
    lm, t5 = o.get("lm", lm), o.get("t5", t5)
    qt5 = o.get("question_t5", qt5 if "t5" not in o else t5)
    lm_tok = lm_tok or pretrained.resolve(lm)
    amort_tok = amort_tok or pretrained.resolve(t5)
    lm_vocab = mac_qa.tokenizer(lm_tok).vocab_size
    amort = mac_qa.tokenizer(amort_tok)

    c = ml_collections.ConfigDict()
    c.name = f"mac_qa_{variant}_{dataset}"       # run name (logs, progress bar)
    c.seed = 0                                   # init, shuffling, the objective's draws
    rows = 48 if tiny else train_rows(dataset, data_dir)
    c.batch_size = 8 if tiny else BATCH          # QA rows per step (their documents: the bank)
    c.num_steps = 4 if tiny else math.ceil(EPOCHS * rows / BATCH)   # optimizer steps
    c.checkpoint_every = 0 if tiny else 1000     # steps between checkpoints (and at the end)
    c.keep_checkpoints = 2                       # newest checkpoints kept
    c.eval_every = 2 if tiny else 1000           # steps between validation losses (0: never)
    c.log_every = 1 if tiny else 50              # steps between metrics.jsonl rows
    c.progress = not tiny                        # tqdm progress bars
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    # Pretrained weights (models/pretrained.py): the frozen LM, g's and h's T5 encoders.
    c.init_from_hf = ml_collections.ConfigDict({"lm": lm, "doc_encoder": t5,
                                                "question_encoder": qt5})

    m = c.model = ml_collections.ConfigDict()    # train.objectives.mac.MetaModel
    m.family = "mac"                             # key into train.trainer.MODELS
    lm_cfg = pretrained.model_config(lm)         # the checkpoint's architecture
    lm_cfg.pop("family")
    lm_cfg["vocab_size"] = max(lm_cfg["vocab_size"], lm_vocab)   # grown for the tokenizer
    lm_cfg["dtype"] = "float32" if tiny else "bfloat16"          # compute dtype
    m.lm = lm_cfg
    # g's and h's T5 encoders (models/t5.py T5Config fields, vocabulary grown likewise).
    m.doc_encoder = mac_obj.t5_fields(t5, amort.vocab_size)
    m.question_encoder = mac_obj.t5_fields(qt5, amort.vocab_size)
    m.num_tokens = T                             # T modulation slots per document
    m.prefix_len = 2                             # P prefix tokens per LM layer (official 2)
    m.enc_width = m.doc_encoder.d_model          # unused with T5 encoders (kept valid)
    m.enc_layers = 1                             # unused with T5 encoders
    m.dec_layers = 1 if tiny else 2              # query blocks after each T5 encoder
    m.enc_heads = m.doc_encoder.num_heads        # heads of those blocks
    m.agg_blocks = 4                             # aggregation blocks (official 4)
    m.agg_heads = lm_cfg["num_heads"]            # heads of h's cross-attention (divide D)
    m.mlp_ratio = 4                              # FFN hidden = ratio · width
    m.prefix_hidden = 32 if tiny else lm_cfg["width"]   # per-row prefix FFN hidden width
    m.window = 0                                 # hierarchical chunk W at evaluation (0: flat)
    m.topk = 0                                   # CMT top-k at evaluation (0: all)
    m.init_scale = 1.0                           # MAC weights ~ N(0, scale/fan_in)
    m.prefix_gain_init = 1.0                     # a random prefix from the start (official)
    m.pad_id = mac_qa.pad_id(amort)              # g's and h's padding: the T5 tokenizer's
    m.readout_relations = 0                      # no readout heads (a CPU-toy aid)

    d = c.data = pipeline.default_data_config("mac_qa")
    d.format = dataset
    d.data_dir = data_dir
    d.lm_tokenizer = lm_tok
    d.amort_tokenizer = amort_tok
    d.doc_length = 48 if tiny else 1022          # S (official: 1024 - P)
    d.question_length = 16 if tiny else 104      # Q (official: 128 - 24 answer tokens)
    d.qa_length = 32 if tiny else 152            # L (official: 128 + 24)
    c.seq_len = d.qa_length                      # model init length (the LM's rows)

    micro = 8 if tiny else 16                    # official micro-batch of QA rows
    c.optim = common.optim(lr=1e-4 if tiny else 1e-5,
                           warmup_steps=max(1, int(0.01 * c.num_steps)), weight_decay=0.0,
                           b2=0.999, clip_norm=100.0, grad_accum=c.batch_size // micro)
    c.optim.schedule = "constant"                # constant after the warm-up (official)
    c.optim.frozen = ("lm",)                     # the base LM is frozen
    c.objective = "mac_meta"                     # key into train.trainer.OBJECTIVES
    ob = c.objective_config = ml_collections.ConfigDict()
    ob.rho = rho                                 # backpropagation dropout ratio (official lift)
    ob.readout_weight = 0.0                      # CPU-toy readouts: off
    ob.hierarchical_windows = ()                 # CPU-toy hierarchical term: off
    ob.hierarchical_weight = 0.0
    ob.curriculum_start = 0                      # CPU-toy bank curriculum: off
    ob.curriculum_steps = 0
    c.eval = common.evaluation(1 if tiny else 20)   # validation batches per evaluation
    # Baselines of `eval.streaming_qa --dataset D --uniform --retrieval` (eval/qa_baselines.py).
    b = c.eval.baselines = ml_collections.ConfigDict()
    b.ft_lrs = (1e-3, 1e-2) if tiny else (1e-4, 2.5e-5, 6.25e-6, 1.5625e-6)  # uniform lr sweep
    b.ft_doc_length = 48 if tiny else 1024       # LM tokens fine-tuned on per document
    b.ft_clip_norm = 750.0                       # gradient global-norm clip (official)
    b.retrieval_doc_length = 24 if tiny else 864  # LM tokens of the retrieved document shown
    c.debug = common.debug()
    c.profile_steps = ()                     # (FIRST, LAST): trace those steps (WORKDIR/profile)
    return c
