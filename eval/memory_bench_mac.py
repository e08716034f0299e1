"""MAC in the memory benchmark (eval/memory_bench.py): reading a probe through a bank of
amortized documents, and its costs.

Each test example is posed as train/data/memory_bench_mac.py says (its facts → documents, its
question(s) → the LM): g amortizes every document into T slots of the bank (one bank per
example), h aggregates the bank for each question, and the frozen LM reads the question and
answer after the prefix; scored like the other models (argmax at the answer tokens under teacher
forcing; an example is an exact match when all of its questions' answer tokens are right).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.mac import MAC, modulated_logits
from train.configs import memory_bench as mbc
from train.data import memory_bench as mb_data
from train.data import memory_bench_mac as mac_data
from train.data import tokenizer as tok
from train.objectives import mac as mac_obj

EVAL_BATCH = 16   # examples (banks) per call


def mac_config(size: str):
    return mac_obj.mac_config(mbc.mac_model_config(size).to_dict())


@functools.lru_cache(maxsize=4)
def _fns(size: str):
    cfg = mac_config(size)
    mac = MAC(cfg)

    @jax.jit
    def amortize(params, docs_ExS):
        return mac.apply({"params": params}, docs_ExS, method=MAC.amortize)

    @jax.jit
    def answer(params, lm_params, phi_ExTxD, valid_RxE, questions_RxQ, qa_RxL):
        z0 = mac.apply({"params": params}, questions_RxQ, method=MAC.encode_question)
        z = mac.apply({"params": params}, z0, phi_ExTxD, valid_RxE, method=MAC.aggregate_z0)
        prefix_kv = mac.apply({"params": params}, z, method=MAC.prefix)
        return modulated_logits(cfg, lm_params, qa_RxL, prefix_kv)
    return cfg, amortize, answer


AXES = {"mqar": "eval_pairs", "passkey": "eval_lengths", "phonebook": "eval_entries",
        "streamqa": "eval_documents"}


@functools.lru_cache(maxsize=4)
def sweep_shapes(size: str) -> dict:
    """One padded shape for every probe's whole sweep (one compilation): N documents per bank,
    questions per bank, Q question and L qa tokens."""
    s = mbc.SIZES[size]
    S = s["mac_doc_length"]
    sweep = [(p, d) for p, field in AXES.items() for d in s[field]]
    lengths = [mac_data.question_lengths(p, d) for p, d in sweep]
    return {"N": max(mac_data.max_documents(p, d, S) for p, d in sweep),
            "per_bank": max(d if p == "mqar" else 1 for p, d in sweep),
            "Q": max(q for q, _ in lengths), "L": max(x for _, x in lengths)}


def probe_accuracy(params, probe: str, difficulty: int, num: int, seed: int,
                   size: str) -> dict:
    """{"accuracy", "exact_match", "no_binding"} of MAC (params {"lm", "mac"}) on the first
    `num` test examples of (probe, difficulty), as eval/memory_bench.py probe_accuracy."""
    cfg, amortize, answer = _fns(size)
    S = mbc.SIZES[size]["mac_doc_length"]
    shp = sweep_shapes(size)
    N, R = shp["N"], EVAL_BATCH * shp["per_bank"]
    hits = total = exact = 0.0
    examples = []
    for start in range(0, num, EVAL_BATCH):
        exs = [mb_data.probe_example(probe, "test", difficulty, i, seed)
               for i in range(start, min(start + EVAL_BATCH, num))]
        docs = np.full((EVAL_BATCH, N, S), tok.PAD, np.int32)
        bank = np.zeros(R, np.int32)
        questions = np.full((R, shp["Q"]), tok.PAD, np.int32)
        qa = np.zeros((R, shp["L"]), np.int32)
        weights = np.zeros((R, shp["L"]), bool)
        r = 0
        for e, ex in enumerate(exs):
            d, rows = mac_data.mac_parts(probe, ex, S)
            docs[e, :d.shape[0]] = d
            for row in rows:
                bank[r] = e
                questions[r, :row["question"].size] = row["question"]
                qa[r, :row["qa"].size] = row["qa"]
                weights[r, :row["qa"].size] = row["weights"] > 0
                r += 1
        flat = docs.reshape(EVAL_BATCH * N, S)
        valid = ((np.arange(EVAL_BATCH * N)[None] // N == bank[:, None])
                 & (flat[:, 0] != tok.PAD)[None] & (np.arange(R) < r)[:, None])
        phi = amortize(params["mac"], flat)
        logits = np.asarray(answer(params["mac"], params["lm"], phi, valid, questions, qa))
        pred = logits[:, :-1].argmax(-1)
        w = weights[:, 1:]
        right = (pred == qa[:, 1:]) | ~w
        hits += float((right & w).sum())
        total += float(w.sum())
        row_ok = right.all(-1)
        exact += float(sum(row_ok[:r][bank[:r] == e].all() for e in range(len(exs))))
        examples.extend(exs)
    return {"accuracy": hits / total, "exact_match": exact / len(examples),
            "no_binding": mb_data.no_binding(probe, examples)}


def _nbytes(tree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def measure_costs(params, size: str, context: int, seconds) -> dict:
    """MAC's costs after reading the passkey prompt of `context` bytes (test example 0, batch
    1): state_bytes = the bank (its documents' modulations [N, T, D]), bytes_per_context_token =
    state_bytes / context; seconds_per_token = one jitted one-token decoding step of the frozen
    LM whose KV cache holds the P prefix rows and the question (the prefix rows are P cache
    entries per layer; h and the prefix network run once per question, before decoding).
    `seconds(fn)` times a call (eval/memory_bench.py _median_seconds)."""
    from models import transformer
    cfg, amortize, answer = _fns(size)
    S = mbc.SIZES[size]["mac_doc_length"]
    ex = mb_data.probe_example("passkey", "test", context, 0, 0)
    docs, rows = mac_data.mac_parts("passkey", ex, S)
    # The evaluation's padded call (one compilation), its first docs.shape[0] rows the bank.
    padded = np.full((EVAL_BATCH * sweep_shapes(size)["N"], S), tok.PAD, np.int32)
    padded[:docs.shape[0]] = docs
    phi = amortize(params["mac"], padded)[:docs.shape[0]]
    state_bytes = _nbytes(phi)
    q = rows[0]["question"][None]
    lm = transformer.Transformer(cfg.lm)
    cache = transformer.init_cache(cfg.lm, 1, cfg.prefix_len + q.shape[1] + 1)._replace(
        length=jnp.asarray(cfg.prefix_len + q.shape[1], jnp.int32))
    step = jax.jit(lambda p, t, c: lm.apply({"params": p}, t[:, None], kv_cache=c))
    t = jnp.zeros((1,), jnp.int32)
    return {"context": context, "state_bytes": state_bytes,
            "bytes_per_context_token": state_bytes / context,
            "documents": int(docs.shape[0]),
            "seconds_per_token": seconds(lambda: step(params["lm"], t, cache))}
