"""The baselines beside MAC on the real QA streams (Tack et al. 2024, Table 1 and §4.3), for
`eval.streaming_qa.evaluate_qa`: the same frozen LM, its own tokenizer, the same questions.

Uniform fine-tuning (`uniform_finetune`): the official online fine-tuning baseline, CaMeLS's
`model=uniform` (nathanhu0/CaMeLS: run.py `evaluate` → subroutines.py `weighted_train` with
weight_model.py `UniformWeightModel`; MAC's repository, jihoontack/MAC, carries no uniform code,
only its log folder `logs/evals_uniform` in evals/__init__.py). The LM takes one Adam step
(batch 1, no gradient accumulation, one epoch, β = (0.9, 0.999), ε = 1e-8, no weight decay) per
document of the stream, in stream order, on the next-token loss of the document's tokens (at most
1024 LM tokens, exp_datasets.py `max_text_len`; no EOS added, as the GPT-2 tokenizer's call),
gradient clipped at global norm 750 (conf/task/eval.yaml `grad_clip_thresh`); then every question
is answered by the fine-tuned LM. Which documents: StreamingQA trains on every QA row's document
(run.py: `weighted_train_dataset = test_dataset`, a document asked twice is trained on twice),
SQuAD and ArchivalQA on each distinct document once (`get_deduplicated_dataset`). The learning
rate is swept on the validation split (README: 1e-4, 2.5e-5, 6.25e-6, 1.5625e-6), the best by
official F1 scored on the test split.

Retrieval (`retrieval_prompts`): BM25 (`eval/bm25.py`) over the stream's distinct documents,
each question's top-1 document put before it in the LM's prompt — `document tokens` (cut to
`doc_length` LM tokens) + the tokens of "\\n" + `question tokens` — and the answer decoded
greedily; with the bank as well it is MAC + retrieval (the bank modulates while the retrieved
document is in the prompt). Neither the MAC nor the CaMeLS repository holds retrieval code: the
prompt layout and k1 = 1.5, b = 0.75 are ours.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval.bm25 import BM25
from train.data import mac_qa
from train.data import tokenizer as tok_lib
from train.objectives import mac as mac_obj

OFFICIAL_FT_LRS = (1e-4, 2.5e-5, 6.25e-6, 1.5625e-6)   # CaMeLS README: the lr sweep
OFFICIAL_FT_CLIP = 750.0                               # CaMeLS conf/task/eval.yaml
OFFICIAL_FT_DOC_LENGTH = 1024                          # CaMeLS exp_datasets.py max_text_len


@dataclasses.dataclass(frozen=True)
class Baselines:
    """Which baselines `evaluate_qa` adds beside MAC, and their settings (a mac_qa run's
    config.eval.baselines; `from_config`)."""
    ft_lrs: tuple = ()                       # uniform fine-tuning's lr sweep (): no uniform row
    ft_doc_length: int = OFFICIAL_FT_DOC_LENGTH   # LM tokens of a document fine-tuned on
    ft_clip_norm: float = OFFICIAL_FT_CLIP   # gradient global-norm clip
    retrieval: bool = False                  # bm25 and mac_bm25 rows
    retrieval_doc_length: int = 864          # LM tokens of the retrieved document in the prompt

    def __post_init__(self):
        for lr in self.ft_lrs:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"baselines.ft_lrs={self.ft_lrs!r} is not allowed; use positive "
                                 "learning rates")
        for name in ("ft_doc_length", "retrieval_doc_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"baselines.{name}={v!r} is not allowed; use an integer >= 2")
        if not self.ft_clip_norm > 0:
            raise ValueError(f"baselines.ft_clip_norm={self.ft_clip_norm!r} is not allowed; use "
                             "a positive norm")

    def check_fits(self, max_positions: int, prefix_len: int, prompt_room: int) -> None:
        """ValueError unless a fine-tuned document fits the LM's learned positions and a retrieved
        document leaves `prompt_room` LM tokens (question + decoded answer) in the context after
        the P prefix positions. max_positions 0: no limit (RoPE)."""
        if not max_positions:
            return
        if self.ft_lrs and self.ft_doc_length > max_positions:
            raise ValueError(f"baselines.ft_doc_length={self.ft_doc_length} is not allowed: the "
                             f"LM has {max_positions} positions")
        need = self.retrieval_doc_length + 1 + prompt_room + prefix_len
        if self.retrieval and need > max_positions:
            raise ValueError(f"baselines.retrieval_doc_length={self.retrieval_doc_length} is not "
                             f"allowed: with the separator, {prompt_room} question and answer "
                             f"tokens and {prefix_len} prefix positions it needs {need} of the "
                             f"LM's {max_positions} positions")


def from_config(c, **override) -> Baselines:
    """The Baselines of a mac_qa run's config.eval.baselines (absent: the defaults), fields in
    `override` (not None) replacing the config's."""
    b = c.eval.baselines.to_dict() if "eval" in c and "baselines" in c.eval else {}
    b = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in b.items()}
    b.update({k: v for k, v in override.items() if v is not None})
    return Baselines(**b)


def validate(config) -> Baselines:
    """The Baselines of a mac_qa config, checked against its LM before anything runs (the
    `paper` variants' validation): a fine-tuned document fits the LM's positions, and a
    retrieved document leaves data.qa_length tokens (question and answer) of the context."""
    b = from_config(config)
    dataclasses.replace(b, retrieval=True).check_fits(
        config.model.lm.get("max_positions") or 0, config.model.prefix_len,
        config.data.qa_length)
    return b


# ---------------------------------------------------------------------------------------------
# Uniform fine-tuning
# ---------------------------------------------------------------------------------------------
def ft_documents(records: Sequence[dict], *, dedupe: bool) -> list[str]:
    """The documents the uniform baseline trains on, in stream order: one per record, or each
    distinct document once at its first appearance (dedupe: SQuAD, ArchivalQA)."""
    docs = [r["document"] for r in records]
    return list(dict.fromkeys(docs)) if dedupe else docs


def dedupes(dataset: str) -> bool:
    """Whether the official uniform baseline trains on distinct documents (`ft_documents`)."""
    return dataset != "streamingqa"


def encode_documents(t: tok_lib.Tokenizer, texts: Sequence[str],
                     length: int) -> tuple[np.ndarray, np.ndarray]:
    """LM tokens [N, S] of each text (no EOS added, cut at S, pad-filled) and weights [N, S]
    (1 on the text's tokens)."""
    tokens = np.full((len(texts), length), mac_qa.pad_id(t), np.int32)
    weights = np.zeros((len(texts), length), np.float32)
    for i, s in enumerate(texts):
        ids = np.asarray(t.encode(s), np.int32)[:length]
        tokens[i, :len(ids)] = ids
        weights[i, :len(ids)] = 1.0
    return tokens, weights


def uniform_finetune(lm_cfg, lm_params, tokens_NxS, weights_NxS, *, lr: float,
                     clip_norm: float = OFFICIAL_FT_CLIP):
    """The LM's params after one Adam step (`mac_obj.lm_finetune_step`) per document, in order."""
    state, p = mac_obj.finetune_init(lm_params, lr), lm_params
    clip = jnp.asarray(clip_norm, jnp.float32)
    for i in range(tokens_NxS.shape[0]):
        p, state = mac_obj.lm_finetune_step(lm_cfg, p, state, jnp.asarray(tokens_NxS[i:i + 1]),
                                            jnp.asarray(weights_NxS[i:i + 1]), clip)
    return jax.block_until_ready(p)


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------
def retrieve(documents: Sequence[str], questions: Sequence[str], **bm25) -> np.ndarray:
    """int [B]: each question's BM25 top-1 among `documents` (-1: no term matches)."""
    return BM25(documents, **bm25).top1(questions)


def retrieval_prompts(t: tok_lib.Tokenizer, documents: Sequence[str], top1: np.ndarray,
                      questions: Sequence[str], doc_length: int,
                      room: Optional[int] = None) -> list[np.ndarray]:
    """LM prompts: the retrieved document's first `doc_length` tokens, "\n", the question (just
    the question where nothing was retrieved, top1 = -1). With `room`, a document is cut further
    so that its prompt keeps to `room` tokens (the question is never cut for the document)."""
    sep = np.asarray(t.encode("\n"), np.int32)
    doc_ids = {int(d): np.asarray(t.encode(documents[d]), np.int32)[:doc_length]
               for d in set(top1.tolist()) if d >= 0}
    out = []
    for d, q in zip(top1.tolist(), questions):
        qi = mac_qa.encode_prompt(t, q)
        if d < 0:
            out.append(qi)
            continue
        keep = doc_length if room is None else max(0, min(doc_length, room - len(sep) - len(qi)))
        out.append(np.concatenate([doc_ids[d][:keep], sep, qi]))
    return out
