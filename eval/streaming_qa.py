"""Online adaptation evaluation for MAC (Tack et al. 2024, §4.1 and Table 1; retention, Fig. 4).

Test documents are streamed into a modulation bank (`memory/bank.py`) one amortization forward
pass each, with no gradients; then every question aggregates the bank and the frozen LM decodes
the answer greedily. EM/F1 with SQuAD normalisation (`eval/metrics.py`).

Baselines: the frozen LM without memory; MAC with the answer's document removed from the bank
("gold removed"); uniform fine-tuning (one Adam step per document on the base LM's next-token
loss, learning rate picked from a small sweep on a validation stream).

    python -m eval.streaming_qa --workdir RUN --seed S --documents N
    python -m eval.streaming_qa --dataset streamingqa --data_dir D --workdir RUN [--split test]
                                [--uniform [--ft_lrs 1e-4,2.5e-5]] [--retrieval]

The first reads the newest checkpoint of the MAC run the trainer wrote to RUN (`mnemax-train
--config mac:tiny --workdir RUN`) and evaluates it on the synthetic fact stream; the second
evaluates a run of train/configs/mac_qa.py (a pretrained LM, T5-initialised g and h) on an
official split of a real stream (`evaluate_qa`: official, SQuAD and lenient EM/F1 of MAC, the
no-memory LM and the gold-removed bank; with --uniform the official uniform fine-tuning of the
same LM, its lr swept on the val split; with --retrieval BM25 top-1 prompting, alone and with
MAC: eval/qa_baselines.py). Each prints one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval import cli, metrics, qa_baselines
from eval.figures import register, write_csv
from memory import bank as bank_lib
from models.mac import MAC, MACConfig, modulated_logits, slot_keys
from train import config_identity, trainer
from train.configs import mac as mac_configs
from train.data import facts, pipeline
from train.data import tokenizer as tok
from train.objectives import mac as mac_obj


# ---------------------------------------------------------------------------------------------
# Streaming documents into the bank
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg",))
def _amortize_one(cfg: MACConfig, params, doc_1xS):
    return MAC(cfg).apply({"params": params}, doc_1xS, method=MAC.amortize)[0]


@jax.jit
def _write(bank, phi_TxD):
    return bank_lib.write(bank, slot_keys(phi_TxD[None]), phi_TxD[None])


def init_bank(cfg: MACConfig, capacity: int) -> bank_lib.Bank:
    """An empty modulation bank: keys [N, D] (unit mean-pooled φ), values [N, T, D]."""
    return bank_lib.init(capacity, cfg.width, (cfg.num_tokens, cfg.width))


def stream_documents(cfg: MACConfig, params, docs_NxS, bank: bank_lib.Bank) -> bank_lib.Bank:
    """Appends each document's modulation to the bank: one g forward per document, no grads."""
    for i in range(docs_NxS.shape[0]):
        bank = _write(bank, _amortize_one(cfg, params, jnp.asarray(docs_NxS[i:i + 1])))
    return bank


# ---------------------------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "window", "topk", "use_memory",
                                             "eos_id", "pad_id"))
def _answer(cfg: MACConfig, params, lm_params, questions_BxQ, prompts_BxL, prompt_len_B,
            memory_NxTxD, valid_BxN, *, max_new: int, window: int, topk: int,
            use_memory: bool, eos_id: int = tok.EOS, pad_id: int = tok.PAD):
    """Greedy decoding after the prompts (right-padded, prompt_len_B real tokens each): tokens
    [B, L + max_new] with the answers filled in; a row stops after its first `eos_id`."""
    B, L = prompts_BxL.shape
    buf = jnp.concatenate([prompts_BxL, jnp.full((B, max_new), pad_id, jnp.int32)], axis=1)
    if use_memory:
        mac = MAC(cfg)
        z = mac.apply({"params": params}, questions_BxQ, memory_NxTxD, valid_BxN,
                      window=window, topk=topk, method=MAC.aggregate)
        prefix_kv = mac.apply({"params": params}, z, method=MAC.prefix)
    else:
        prefix_kv = None
    rows = jnp.arange(B)

    def body(i, buf):
        logits = modulated_logits(cfg, lm_params, buf, prefix_kv)
        pos = prompt_len_B + i - 1                      # the last filled position
        nxt = jnp.argmax(logits[rows, pos], -1).astype(jnp.int32)
        gen = jnp.arange(buf.shape[1])[None]
        done = (gen >= prompt_len_B[:, None]) & (gen < prompt_len_B[:, None] + i) & (buf == eos_id)
        nxt = jnp.where(done.any(-1), pad_id, nxt)
        return buf.at[rows, prompt_len_B + i].set(nxt)

    return jax.lax.fori_loop(0, max_new, body, buf)


def answer(cfg: MACConfig, params, lm_params, questions: Sequence[str], *,
           memory=None, valid=None, max_new: int = 12, window: Optional[int] = None,
           topk: Optional[int] = None, q_len: int = 32, batch: int = 64) -> list[str]:
    """Greedy answers to `questions` (strings), with memory [N, T, D] (+ valid [N] or [B, N]) or
    without (memory=None: the frozen LM alone, at the same position offset)."""
    prompts = facts.encode_prompts(questions, q_len)
    qtok = facts.encode_questions(questions, q_len)
    plen = (prompts != tok.PAD).sum(-1).astype(np.int32)
    use_memory = memory is not None
    if not use_memory:
        memory = jnp.zeros((1, cfg.num_tokens, cfg.width))
    n = len(questions)
    if valid is None:
        valid = np.ones((n, memory.shape[0]), bool)
    valid = np.broadcast_to(np.asarray(valid, bool), (n, memory.shape[0]))
    out = []
    for s in range(0, n, batch):
        e = min(n, s + batch)
        pad = batch - (e - s) if n > batch else 0   # keep one compiled shape across batches
        sl = lambda a: np.concatenate([a[s:e], np.repeat(a[s:s + 1], pad, 0)])  # noqa: E731
        buf = _answer(cfg, params, lm_params, jnp.asarray(sl(qtok)), jnp.asarray(sl(prompts)),
                      jnp.asarray(sl(plen)), jnp.asarray(memory), jnp.asarray(sl(valid)),
                      max_new=max_new, window=window or 0, topk=topk or 0,
                      use_memory=use_memory)
        buf = np.asarray(buf)
        for b in range(e - s):
            gen = buf[b, plen[s + b]:]
            stop = np.flatnonzero(gen >= tok.NUM_BYTES)
            gen = gen[: stop[0]] if stop.size else gen
            out.append(tok.decode(gen))
    return out


def score(preds: Sequence[str], answers, *, lenient: bool = False) -> dict:
    return metrics.squad_scores(list(preds), list(answers), lenient=lenient)


# ---------------------------------------------------------------------------------------------
# The full evaluation
# ---------------------------------------------------------------------------------------------
def _stream(split: str, n: int, seed: int, doc_len: int):
    docs = facts.fact_stream(split, n, seed)
    recs = facts.qa_records(docs, questions_per_doc=None)
    return docs, recs, facts.encode_documents([d["document"] for d in docs], doc_len)


def gold_removed_valid(valid_N, gold_B) -> np.ndarray:
    """[B, N] bool: question b sees every valid bank entry except entry gold_B[b] (its own
    document's), the "gold removed" baseline."""
    valid_N, gold_B = np.asarray(valid_N, bool), np.asarray(gold_B)
    return valid_N[None, :] & (np.arange(valid_N.shape[0])[None, :] != gold_B[:, None])


def evaluate(cfg: MACConfig, params, lm_params, *, documents: int = 16, seed: int = 0,
             doc_len: int = 112, q_len: int = 32, window: Optional[int] = None,
             topk: Optional[int] = None, baselines: bool = True,
             ft_lrs: Sequence[float] = (1e-4, 1e-3, 1e-2), lenient: bool = False,
             banks: int = 1) -> dict:
    """EM/F1 over `banks` independent test streams of `documents` documents each (disjoint
    entities; every question of every document, each answered from its own stream's bank).

    Keys: mac_flat, mac_hierarchical (window W or N/4), mac_topk (k or N/4), gold_removed,
    no_memory, uniform_ft (best lr of the sweep on a validation stream; the base LM fine-tuned
    on each stream from scratch), and adapt_seconds_per_document.
    """
    if not isinstance(banks, int) or banks < 1:
        raise ValueError(f"banks={banks!r} is not allowed; use a positive integer")
    _, all_recs, all_tok = _stream("test", documents * banks, seed, doc_len)
    w = window or max(2, documents // 4)
    k = topk or max(1, documents // 4)
    methods = ["mac_flat", "mac_hierarchical", "mac_topk"]
    if baselines:
        methods += ["gold_removed", "no_memory", "uniform_ft"]
        vdocs, vrecs, vtok = _stream("validation", documents, seed + 1, doc_len)
        sweep = {}
        for lr in ft_lrs:
            p = mac_obj.uniform_finetune(cfg, lm_params, vtok, lr=lr)
            sweep[lr] = score(answer(cfg, params, p, [r["question"] for r in vrecs],
                                     q_len=q_len), [r["answer"] for r in vrecs])["f1"]
        best = max(sweep, key=sweep.get)
    preds: dict[str, list[str]] = {m: [] for m in methods}
    ans: list = []
    jax.block_until_ready(_amortize_one(cfg, params, jnp.asarray(all_tok[:1])))  # compile first
    adapt_s = 0.0
    for b in range(banks):
        lo = b * documents
        recs = [r for r in all_recs if lo <= r["doc_id"] < lo + documents]
        dtok = all_tok[lo:lo + documents]
        qs = [r["question"] for r in recs]
        ans += [r["answer"] for r in recs]
        gold = np.array([r["doc_id"] - lo for r in recs])
        t0 = time.perf_counter()
        bank = stream_documents(cfg, params, dtok, init_bank(cfg, documents))
        jax.block_until_ready(bank.values)
        adapt_s += time.perf_counter() - t0
        mem, valid = bank.values, np.asarray(bank.valid)
        run = functools.partial(answer, cfg, params, lm_params, qs, q_len=q_len)
        preds["mac_flat"] += run(memory=mem, valid=valid, window=0, topk=0)
        preds["mac_hierarchical"] += run(memory=mem, valid=valid, window=w, topk=0)
        preds["mac_topk"] += run(memory=mem, valid=valid, window=0, topk=k)
        if baselines:
            preds["gold_removed"] += run(memory=mem, valid=gold_removed_valid(valid, gold),
                                         window=0, topk=0)
            preds["no_memory"] += run(memory=None)
            p = mac_obj.uniform_finetune(cfg, lm_params, dtok, lr=best)
            preds["uniform_ft"] += answer(cfg, params, p, qs, q_len=q_len)
    res: dict[str, Any] = {"documents": documents, "banks": banks, "questions": len(ans)}
    for m in methods:
        res[m] = score(preds[m], ans, lenient=lenient)
    if baselines:
        res["uniform_ft"]["lr"] = best
        res["uniform_ft_sweep"] = {str(k_): v for k_, v in sweep.items()}
    res["adapt_seconds_per_document"] = adapt_s / (documents * banks)
    return res


def retention(cfg: MACConfig, params, lm_params, *, first: int = 16,
              bank_sizes: Sequence[int] = (16, 32, 48, 64), seed: int = 0,
              doc_len: int = 112, q_len: int = 32, window: Optional[int] = None) -> dict:
    """F1 on the first `first` documents' questions as the bank grows, relative to its value
    when the bank holds only them (paper Fig. 4)."""
    if not bank_sizes or not 1 <= first <= min(bank_sizes):
        raise ValueError(f"first={first} is not allowed with bank_sizes={tuple(bank_sizes)}; "
                         "use 1 <= first <= the smallest bank size")
    n = max(bank_sizes)
    docs, recs, dtok = _stream("test", n, seed, doc_len)
    first_recs = [r for r in recs if r["doc_id"] < first]
    qs = [r["question"] for r in first_recs]
    ans = [r["answer"] for r in first_recs]
    bank = init_bank(cfg, n)
    f1, done = {}, 0
    for size in sorted(bank_sizes):
        bank = stream_documents(cfg, params, dtok[done:size], bank)
        done = size
        f1[size] = score(answer(cfg, params, lm_params, qs, memory=bank.values, valid=bank.valid,
                                window=window or 0, q_len=q_len), ans)["f1"]
    return {"f1": f1, "relative_f1": relative_retention(f1)}


def relative_retention(f1: dict) -> dict:
    """{bank size: F1 / F1 at the smallest bank} for F1 measured on the same questions at each
    bank size; all 0.0 when the smallest bank's F1 is 0 (nothing to retain)."""
    if not f1:
        raise ValueError("f1={} is not allowed: give the F1 of at least one bank size")
    base = f1[min(f1)]
    return {s: (v / base if base > 0 else 0.0) for s, v in f1.items()}


# ---------------------------------------------------------------------------------------------
# The real streams (StreamingQA, ArchivalQA, SQuAD): train/configs/mac_qa.py runs
# ---------------------------------------------------------------------------------------------
MAX_NEW = 16   # answer tokens decoded (official: max_length = prompt + 16)


def prompt_room(cfg: MACConfig, max_new: int = MAX_NEW) -> int:
    """LM prompt tokens that fit after the P prefix positions with `max_new` answer tokens."""
    return (cfg.lm.max_positions or 1 << 30) - cfg.prefix_len - max_new


def answer_tokens(cfg: MACConfig, params, lm_params, lm_tok, questions_BxQ, prompts: list,
                  *, memory=None, valid=None, window: int = 0, topk: int = 0,
                  max_new: int = MAX_NEW, batch: int = 32,
                  width: Optional[int] = None) -> list[str]:
    """Greedy answers (the LM tokenizer's decode of the tokens before the first EOS, stripped, as
    the official `decode_to_clean_text`) to LM prompts (token arrays) with h's question tokens
    [B, Q], from `memory` [N, T, D] (+ valid [B, N]) or the frozen LM alone (memory None).
    `width` (≥ the longest prompt) pads every call to one compiled shape; a prompt longer than
    the LM's room keeps its last tokens."""
    from train.data import mac_qa
    eos, pad = lm_tok.eos_id, mac_qa.pad_id(lm_tok)
    width = max([len(p) for p in prompts] + [width or 0])
    room = prompt_room(cfg, max_new)
    if width > room:   # the official code keeps the last 256 prompt tokens; keep what fits
        prompts, width = [p[-room:] for p in prompts], room
    buf = np.full((len(prompts), width), pad, np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    plen = np.array([len(p) for p in prompts], np.int32)
    use_memory = memory is not None
    if not use_memory:
        memory = jnp.zeros((1, cfg.num_tokens, cfg.width))
    n = len(prompts)
    valid = np.broadcast_to(np.ones((1, memory.shape[0]), bool) if valid is None
                            else np.asarray(valid, bool), (n, memory.shape[0]))
    q = np.asarray(questions_BxQ)
    out = []
    for s in range(0, n, batch):
        e = min(n, s + batch)
        pad_rows = batch - (e - s) if n > batch else 0
        sl = lambda a: np.concatenate([a[s:e], np.repeat(a[s:s + 1], pad_rows, 0)])  # noqa: E731
        res = np.asarray(_answer(cfg, params, lm_params, jnp.asarray(sl(q)), jnp.asarray(sl(buf)),
                                 jnp.asarray(sl(plen)), jnp.asarray(memory),
                                 jnp.asarray(sl(valid)), max_new=max_new, window=window,
                                 topk=topk, use_memory=use_memory, eos_id=eos, pad_id=pad))
        for b in range(e - s):
            gen = res[b, plen[s + b]:]
            stop = np.flatnonzero(gen == eos)
            out.append(lm_tok.decode(gen[: stop[0]] if stop.size else gen).strip())
    return out


def qa_scores(preds: Sequence[str], records: Sequence[dict]) -> dict:
    """{"official": MAC's EM/F1 against the target answer, "squad": SQuAD EM/F1 against every
    gold, "lenient": the lenient EM (eval/metrics.py says how each differs)}."""
    golds = [r["answers"] for r in records]
    return {"official": metrics.official_scores(list(preds), [r["answer"] for r in records]),
            "squad": metrics.squad_scores(list(preds), golds),
            "lenient": metrics.squad_scores(list(preds), golds, lenient=True)}


def evaluate_qa(cfg: MACConfig, params, lm_params, records: Sequence[dict], *, lm_tokenizer: str,
                amort_tokenizer: str, doc_len: int, q_len: int, window: int = 0, topk: int = 0,
                baselines: bool = True, max_new: int = MAX_NEW,
                extra: Optional[qa_baselines.Baselines] = None,
                val_records: Sequence[dict] = (), dedupe: bool = False) -> dict:
    """Online adaptation on a real stream (facts.load_qa_split records): every distinct document
    is amortized once into the bank (one g forward each, in stream order, no gradients), then
    every question is answered greedily from the whole bank (mac; with window/topk W, k > 0 the
    hierarchical / top-k aggregation) and, with `baselines`, by the frozen LM without memory
    (no_memory) and from the bank without the question's own document (gold_removed).

    `extra` (eval/qa_baselines.py) adds: uniform_ft (the LM fine-tuned on the stream, one Adam
    step per document — every record's, or each distinct one once with `dedupe` — at the best
    learning rate of `extra.ft_lrs` by official F1 on `val_records`, each rate fine-tuning from
    the run's LM on the validation stream; uniform_ft_sweep holds those F1s); with
    `extra.retrieval` bm25 (the frozen LM, the BM25 top-1 document of the stream before the
    question) and mac_bm25 (the same prompts, answered from the bank), and bm25_recall_at_1 (how
    often the top-1 is the question's own document). All rows decode the same way: greedy, at
    the prefix's position offset, every call padded to one prompt width."""
    from train.data import mac_qa
    if not records:
        raise ValueError("records=[] is not allowed: nothing to evaluate")
    extra = extra or qa_baselines.Baselines()
    if extra.ft_lrs and not val_records:
        raise ValueError("val_records=() is not allowed with baselines.ft_lrs: the uniform "
                         "baseline's learning rate is chosen on the validation split")
    lm, amort = mac_qa.tokenizer(lm_tokenizer), mac_qa.tokenizer(amort_tokenizer)
    params, lm_params = jax.device_put((params, lm_params))   # once, not at every batch
    docs = list(dict.fromkeys(r["document"] for r in records))
    gold = np.array([docs.index(r["document"]) for r in records])
    dtok = mac_qa.encode_texts(amort, docs, doc_len)
    qtok = mac_qa.encode_texts(amort, [r["question"] for r in records], q_len)
    prompts = [mac_qa.encode_prompt(lm, r["question"]) for r in records]
    val_prompts = [mac_qa.encode_prompt(lm, r["question"]) for r in val_records]
    if extra.retrieval:
        top1 = qa_baselines.retrieve(docs, [r["question"] for r in records])
        rprompts = qa_baselines.retrieval_prompts(lm, docs, top1, [r["question"] for r in records],
                                                  extra.retrieval_doc_length,
                                                  room=prompt_room(cfg, max_new))
    width = max(len(p) for p in prompts + val_prompts + (rprompts if extra.retrieval else []))
    t0 = time.perf_counter()
    bank = stream_documents(cfg, params, dtok, init_bank(cfg, len(docs)))
    jax.block_until_ready(bank.values)
    adapt_s = time.perf_counter() - t0
    mem, valid = bank.values, np.asarray(bank.valid)
    run = functools.partial(answer_tokens, cfg, params, lm_params, lm, qtok, prompts,
                            max_new=max_new, width=width)
    preds = {"mac": run(memory=mem, valid=valid, window=window, topk=topk)}
    res: dict[str, Any] = {}
    if baselines:
        preds["no_memory"] = run()
        if len(docs) > 1:
            preds["gold_removed"] = run(memory=mem, valid=gold_removed_valid(valid, gold))
    if extra.ft_lrs:
        ft_len = min(extra.ft_doc_length, cfg.lm.max_positions or extra.ft_doc_length)

        def finetuned(recs, lr):   # a document longer than the LM's positions is cut there
            toks, w = qa_baselines.encode_documents(
                lm, qa_baselines.ft_documents(recs, dedupe=dedupe), ft_len)
            return qa_baselines.uniform_finetune(cfg.lm, lm_params, toks, w, lr=lr,
                                                 clip_norm=extra.ft_clip_norm)

        vq = mac_qa.encode_texts(amort, [r["question"] for r in val_records], q_len)
        sweep = {}
        for lr in extra.ft_lrs:
            p = answer_tokens(cfg, params, finetuned(val_records, lr), lm, vq, val_prompts,
                              max_new=max_new, width=width)
            sweep[lr] = metrics.official_scores(p, [r["answer"] for r in val_records])["f1"]
        best = max(sweep, key=sweep.get)          # ties: the first (the largest official lr)
        t0 = time.perf_counter()
        ft_params = finetuned(records, best)
        ft_s = time.perf_counter() - t0
        preds["uniform_ft"] = answer_tokens(cfg, params, ft_params, lm, qtok, prompts,
                                            max_new=max_new, width=width)
        res["uniform_ft_sweep"] = {str(k): v for k, v in sweep.items()}
    if extra.retrieval:
        rrun = functools.partial(answer_tokens, cfg, params, lm_params, lm, qtok, rprompts,
                                 max_new=max_new, width=width)
        preds["bm25"] = rrun()
        preds["mac_bm25"] = rrun(memory=mem, valid=valid, window=window, topk=topk)
        res["bm25_recall_at_1"] = float(np.mean(top1 == gold))
    res.update({m: qa_scores(p, records) for m, p in preds.items()})
    if extra.ft_lrs:
        res["uniform_ft"]["lr"] = best
        res["uniform_ft"]["seconds_per_document"] = ft_s / len(
            qa_baselines.ft_documents(records, dedupe=dedupe))
    res.update(documents=len(docs), questions=len(records),
               adapt_seconds_per_document=adapt_s / len(docs),
               examples=[{"question": r["question"], "target": r["answer"], "mac": p}
                         for r, p in zip(records[:3], preds["mac"][:3])])
    return res


def evaluate_run_on_stream(workdir, *, dataset: str, data_dir: str, split: str = "test",
                           seed: int = 0, limit: Optional[int] = None, window: int = 0,
                           topk: int = 0, baselines: bool = True, uniform: bool = False,
                           retrieval: bool = False,
                           ft_lrs: Optional[Sequence[float]] = None) -> dict:
    """`evaluate_qa` of the MAC run in `workdir` (train/configs/mac_qa.py) on the official
    `split` ("train" | "val" | "test") of `dataset` in data_dir, with the run's tokenizers and
    lengths; `uniform` adds the uniform fine-tuning row (its lr swept on the "val" split, the
    same `limit` of rows), `retrieval` the bm25 and mac_bm25 rows, with the settings of the
    run's config.eval.baselines (`ft_lrs` replaces its sweep)."""
    config, params, model = trainer.restore_for_eval(workdir)
    if not isinstance(model, mac_obj.MetaModel) or config.data.name != "mac_qa":
        raise ValueError(f"workdir={str(workdir)!r} holds no MAC run on a real QA stream "
                         "(train one with mnemax-train --config mac_qa:tiny --workdir DIR)")
    params = jax.device_get(params)
    full = bool(config.data.full_passage)
    recs = facts.load_qa_split(dataset, data_dir, split, seed=seed, limit=limit,
                               full_passage=full)
    b = qa_baselines.from_config(config, ft_lrs=tuple(ft_lrs) if ft_lrs else None)
    # a run configured before eval.baselines existed sweeps the official rates
    b = dataclasses.replace(b, ft_lrs=(b.ft_lrs or qa_baselines.OFFICIAL_FT_LRS) if uniform
                            else (), retrieval=retrieval)
    val = (facts.load_qa_split(dataset, data_dir, "val", seed=seed, limit=limit,
                               full_passage=full) if b.ft_lrs else ())
    d = config.data
    res = evaluate_qa(model.cfg, params["mac"], params["lm"], recs,
                      lm_tokenizer=d.lm_tokenizer, amort_tokenizer=d.amort_tokenizer,
                      doc_len=d.doc_length, q_len=d.question_length, window=window, topk=topk,
                      baselines=baselines, extra=b, val_records=val,
                      dedupe=qa_baselines.dedupes(dataset))
    return {"dataset": dataset, "split": split, **res}


# ---------------------------------------------------------------------------------------------
# Runs on disk
# ---------------------------------------------------------------------------------------------
def load_run(workdir) -> tuple[MACConfig, Any, Any]:
    """(MACConfig, MAC params, base-LM params) of the newest checkpoint of a MAC run that the
    trainer wrote to `workdir` (`mnemax-train --config mac:...`, or a figure's run folder)."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").exists():
        raise ValueError(f"workdir={str(workdir)!r} holds no MAC run: no config.json there "
                         "(train one with mnemax-train --config mac:tiny --workdir DIR)")
    _, params, model = trainer.restore_for_eval(workdir)
    if not isinstance(model, mac_obj.MetaModel):
        raise ValueError(f"workdir={str(workdir)!r} holds a {type(model).__name__} run, not a "
                         "MAC run (model.family='mac')")
    params = jax.device_get(params)
    return model.cfg, params["mac"], params["lm"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="MAC streaming QA evaluation (one JSON line)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--dataset", choices=facts.QA_FORMATS, default=None,
                   help="a real stream (a mac_qa run): streamingqa | archivalqa | squad")
    p.add_argument("--data_dir", default="",
                   help="the official train/val/test.csv folder (squad: the TFDS data_dir)")
    p.add_argument("--split", choices=facts.QA_SPLITS, default="test")
    p.add_argument("--limit", type=int, default=0, help="rows of the split read (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--documents", type=int, default=16)
    p.add_argument("--banks", type=int, default=1,
                   help="independent test streams of --documents documents each")
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--lenient", action="store_true")
    p.add_argument("--no_baselines", action="store_true")
    p.add_argument("--uniform", action="store_true",
                   help="a real stream: add uniform fine-tuning (lr swept on the val split)")
    p.add_argument("--ft_lrs", default="",
                   help="comma-separated lrs of that sweep (default: the run's config)")
    p.add_argument("--retrieval", action="store_true",
                   help="a real stream: add BM25 top-1 retrieval, alone and with MAC")
    a = p.parse_args(argv)
    if (a.uniform or a.retrieval or a.ft_lrs) and not a.dataset:
        raise ValueError("--uniform, --ft_lrs and --retrieval are not allowed without --dataset "
                         "(the synthetic stream has its own uniform_ft row)")
    if a.dataset:
        try:
            lrs = tuple(float(x) for x in a.ft_lrs.split(",")) if a.ft_lrs else None
        except ValueError:
            raise ValueError(f"--ft_lrs={a.ft_lrs!r} is not allowed; use comma-separated "
                             "learning rates, e.g. 1e-4,2.5e-5") from None
        res = evaluate_run_on_stream(a.workdir, dataset=a.dataset, data_dir=a.data_dir,
                                     split=a.split, seed=a.seed, limit=a.limit or None,
                                     window=a.window, topk=a.topk,
                                     baselines=not a.no_baselines, uniform=a.uniform,
                                     retrieval=a.retrieval, ft_lrs=lrs)
        print(json.dumps(res, sort_keys=True))
        return 0
    cfg, params, lm_params = load_run(a.workdir)
    res = evaluate(cfg, params, lm_params, documents=a.documents, seed=a.seed,
                   window=a.window or None, topk=a.topk or None, baselines=not a.no_baselines,
                   lenient=a.lenient, banks=a.banks)
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))


# ---------------------------------------------------------------------------------------------
# Figures: `python -m eval.figures --only mac_online_adaptation|mac_retention --size S`
# ---------------------------------------------------------------------------------------------
FIGURE_VARIANTS = {"quick": "quick", "cpu": "tiny", "paper": "paper"}  # size → config variant
RETENTION_MULTIPLES = (1, 2, 3, 4)  # mac_retention's bank sizes, in units of eval.documents


def figure_settings(size: str) -> dict:
    """Model and training sizes per figure size (quick: `make demo`, cpu: `make figures`)."""
    if size not in FIGURE_VARIANTS:
        raise ValueError(f"size={size!r} is not allowed; use one of {sorted(FIGURE_VARIANTS)}")
    return mac_configs.get_config(FIGURE_VARIANTS[size])


def figure_config(size: str, seed: int):
    """The trainer config of the figure's MAC run: `figure_settings(size)` with the figure's seed
    (both stages' initialisation, shuffling and the fact stream's content)."""
    c = figure_settings(size)
    c.seed = seed
    return c


def validate_size(size: str) -> None:
    """Checks what mac_online_adaptation and mac_retention at `size` need before any training:
    the trainer configs of both stages, the model, the objective's settings, entity counts of
    the fact-stream splits, and that the longest document, question and QA row fit their
    lengths. Raises a ValueError naming the field, its value and what is allowed."""
    c = figure_settings(size)
    trainer.validate_config(c)                # both stages (it checks config.base_lm too)
    for cfg in (c, c.base_lm):
        trainer.build_model(cfg.model)        # MACConfig and TransformerConfig check themselves
        pipeline.make_source(cfg.data, split="train", seq_len=cfg.seq_len)
    for name in ("eval.documents", "eval.banks"):
        v = c
        for part in name.split("."):
            v = v[part]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} is not allowed at size={size!r}; use an integer >= 1")
    mac_obj.check_settings(c.batch_size, **c.objective_config.to_dict())
    d = c.eval.documents
    needs = {"batch_size": ("train", c.batch_size),
             "eval.documents·eval.banks": ("test", d * c.eval.banks),
             "eval.documents·max(RETENTION_MULTIPLES)": ("test", d * max(RETENTION_MULTIPLES)),
             "eval.documents (the validation stream)": ("validation", d)}
    for name, (split, n) in needs.items():
        have = len(facts.entity_names(split)) if split != "train" else c.data.documents
        if n > have:
            raise ValueError(f"{name}={n} is not allowed at size={size!r}: the {split} split has "
                             f"{have} documents (one entity each)")
    names = max((n for s in facts.SPLITS for n in facts.entity_names(s)), key=len)
    longest = [max(rel[2], key=len) for rel in facts.RELATIONS]
    doc = " ".join(rel[1].format(e=names, a=a) for rel, a in zip(facts.RELATIONS, longest))
    question = max((rel[0].format(e=names) for rel in facts.RELATIONS), key=len)
    qa = max(len(rel[0].format(e=names)) + len(a) + 2 for rel, a in zip(facts.RELATIONS, longest))
    for name, need in (("doc_length", len(doc)), ("question_length", len(question) + 1),
                       ("qa_length", qa)):
        if c.data[name] < need:
            raise ValueError(f"data.{name}={c.data[name]} is not allowed at size={size!r}: the "
                             f"fact stream needs >= {need} tokens")


def run_dir(size: str, seed: int, out: pathlib.Path) -> pathlib.Path:
    """OUT/runs/mac-SIZE-seedSEED-HASH, the folder of the figure's MAC run (both stages): HASH
    (train/config_identity.py: recipe_hash) covers the config, so a changed recipe trains into
    a new folder and a folder is only reused by its own recipe."""
    h = config_identity.recipe_hash([figure_config(size, seed)])
    return pathlib.Path(out) / "runs" / f"mac-{size}-seed{seed}-{h}"


def train_or_load(size: str, seed: int, out: pathlib.Path):
    """(MACConfig, MAC params, base-LM params) of the MAC run a figure needs: trained by the
    shared trainer in `run_dir` (stage 1 into its base_lm/, then stage 2; a killed run resumes
    from its checkpoints) or, once finished, restored from there."""
    workdir = run_dir(size, seed, out)
    trainer.train(figure_config(size, seed), workdir, devices=jax.devices()[:1])
    return load_run(workdir)


METHODS = ("no_memory", "gold_removed", "uniform_ft", "mac_flat", "mac_hierarchical", "mac_topk")


def _register_figures():
    def recipe(size: str) -> dict:
        """Both MAC figures' recipe at `size`: the MAC config they train and evaluate."""
        return figure_settings(size).to_dict()

    @register("mac_online_adaptation", settings=recipe)
    def mac_online_adaptation(*, size: str, seed: int, out: pathlib.Path, **_) -> dict:
        validate_size(size)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        c = figure_settings(size)
        cfg, params, lm_params = train_or_load(size, seed, out)
        banks = c.eval.get("banks", 1)
        res = evaluate(cfg, params, lm_params, documents=c.eval.documents, seed=seed + 1000,
                       banks=banks, doc_len=c.data.doc_length, q_len=c.data.question_length)
        em = {m: res[m]["em"] for m in METHODS}
        f1 = {m: res[m]["f1"] for m in METHODS}
        write_csv(out / "mac_online_adaptation.csv", ["method", "em", "f1"],
                  [(m, em[m], f1[m]) for m in METHODS])
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = np.arange(len(METHODS))
        ax.bar(x - 0.2, [em[m] for m in METHODS], 0.4, label="EM")
        ax.bar(x + 0.2, [f1[m] for m in METHODS], 0.4, label="F1")
        ax.set_xticks(x, METHODS, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(f"MAC online adaptation, banks of {c.eval.documents} held-out documents "
                     f"(x{banks}, {size})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "mac_online_adaptation.png", dpi=120)
        plt.close(fig)
        return {"em": em, "f1": f1, "documents": c.eval.documents, "banks": banks,
                "questions": res["questions"],
                "uniform_ft_lr": res["uniform_ft"]["lr"],
                "adapt_seconds_per_document": res["adapt_seconds_per_document"]}

    @register("mac_retention", settings=recipe)
    def mac_retention(*, size: str, seed: int, out: pathlib.Path, **_) -> dict:
        validate_size(size)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        c = figure_settings(size)
        cfg, params, lm_params = train_or_load(size, seed, out)
        first = c.eval.documents
        sizes = tuple(first * m for m in RETENTION_MULTIPLES)
        r = retention(cfg, params, lm_params, first=first, bank_sizes=sizes, seed=seed + 2000,
                      doc_len=c.data.doc_length, q_len=c.data.question_length)
        write_csv(out / "mac_retention.csv", ["bank_size", "f1", "relative_f1"],
                  [(s, r["f1"][s], r["relative_f1"][s]) for s in sizes])
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot(sizes, [r["relative_f1"][s] for s in sizes], "o-")
        ax.set_xlabel("documents in the bank")
        ax.set_ylabel(f"F1 on the first {first} documents (relative)")
        ax.set_ylim(0, 1.1)
        ax.set_title(f"MAC retention ({size})")
        fig.tight_layout()
        fig.savefig(out / "mac_retention.png", dpi=120)
        plt.close(fig)
        return {"relative_f1": {str(s): r["relative_f1"][s] for s in sizes},
                "f1": {str(s): r["f1"][s] for s in sizes}}


_register_figures()
