"""MAC streaming evaluation: the bank as documents stream in, greedy answering, runs on disk."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import streaming_qa as sqa
from models.mac import MAC, MACConfig, modulated_logits
from models.transformer import TransformerConfig
from train.data import facts
from train.data import tokenizer as tok
from train.objectives import mac as obj

LM = TransformerConfig(vocab_size=320, width=32, num_layers=1, num_heads=4)
CFG = MACConfig(lm=LM, num_tokens=2, prefix_len=1, enc_width=16, enc_layers=1, dec_layers=1,
                enc_heads=2, agg_blocks=2, agg_heads=2, mlp_ratio=2, prefix_hidden=8)
DOC_LEN, Q_LEN = 112, 32


@pytest.fixture(scope="module")
def setup():
    params = obj.init_mac(CFG, jax.random.key(0))
    lm_params = obj.init_lm(LM, jax.random.key(1))
    docs = facts.fact_stream("test", 6, seed=0)
    dtok = facts.encode_documents([d["document"] for d in docs], DOC_LEN)
    return dict(params=params, lm_params=lm_params, docs=docs, dtok=dtok)


def test_bank_grows_append_only(setup):
    s = setup
    bank = sqa.init_bank(CFG, 8)
    bank3 = sqa.stream_documents(CFG, s["params"], s["dtok"][:3], bank)
    bank6 = sqa.stream_documents(CFG, s["params"], s["dtok"][3:], bank3)
    assert int(bank3.count) == 3 and int(bank6.count) == 6
    # Earlier entries are bitwise unchanged as the bank grows.
    np.testing.assert_array_equal(np.asarray(bank6.values[:3]), np.asarray(bank3.values[:3]))
    np.testing.assert_array_equal(np.asarray(bank6.keys[:3]), np.asarray(bank3.keys[:3]))
    assert np.asarray(bank6.valid).tolist() == [True] * 6 + [False] * 2
    # Each entry is one amortization forward of its document alone.
    phi = MAC(CFG).apply({"params": s["params"]}, jnp.asarray(s["dtok"]), method=MAC.amortize)
    chex.assert_trees_all_close(bank6.values[:6], phi, atol=1e-5)


def test_greedy_answer_matches_reference_loop(setup):
    s = setup
    qs = [d["qas"][0]["question"] for d in s["docs"][:2]]
    bank = sqa.stream_documents(CFG, s["params"], s["dtok"][:4], sqa.init_bank(CFG, 4))
    got = sqa.answer(CFG, s["params"], s["lm_params"], qs, memory=bank.values, valid=bank.valid,
                     max_new=3, q_len=Q_LEN)
    mac = MAC(CFG)
    for q, g in zip(qs, got):
        z = mac.apply({"params": s["params"]}, jnp.asarray(facts.encode_questions([q], Q_LEN)),
                      bank.values, method=MAC.aggregate)
        kv = mac.apply({"params": s["params"]}, z, method=MAC.prefix)
        ids = list(np.concatenate([tok.encode(q), [tok.SEP]]))
        out = []
        for _ in range(3):
            logits = modulated_logits(CFG, s["lm_params"], jnp.asarray([ids]), kv)
            nxt = int(jnp.argmax(logits[0, -1]))
            if nxt >= tok.NUM_BYTES:
                break
            ids.append(nxt)
            out.append(nxt)
        assert g == tok.decode(out)


def test_no_memory_and_gold_removed_paths(setup):
    s = setup
    qs = [d["qas"][1]["question"] for d in s["docs"][:3]]
    bank = sqa.stream_documents(CFG, s["params"], s["dtok"][:3], sqa.init_bank(CFG, 3))
    plain = sqa.answer(CFG, s["params"], s["lm_params"], qs, max_new=4, q_len=Q_LEN)
    assert len(plain) == 3 and all(isinstance(p, str) for p in plain)
    no_gold = ~np.eye(3, dtype=bool)
    out = sqa.answer(CFG, s["params"], s["lm_params"], qs, memory=bank.values, valid=no_gold,
                     max_new=4, q_len=Q_LEN)
    assert len(out) == 3


def test_uniform_finetune_one_step_per_document(setup):
    s = setup
    p1 = sqa.uniform_finetune(CFG, s["lm_params"], s["dtok"][:2], lr=1e-3)
    p1b = sqa.uniform_finetune(CFG, s["lm_params"], s["dtok"][:2], lr=1e-3)
    chex.assert_trees_all_equal(p1, p1b)
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p1, s["lm_params"])
    assert max(jax.tree_util.tree_leaves(diff)) > 0


def test_run_roundtrip_and_evaluate(setup, tmp_path):
    s = setup
    sqa.save_run(tmp_path, CFG, s["params"], s["lm_params"])
    cfg, params, lm_params = sqa.load_run(tmp_path)
    assert cfg == CFG
    chex.assert_trees_all_equal(params, s["params"])
    res = sqa.evaluate(cfg, params, lm_params, documents=4, seed=0, baselines=False)
    for key in ("mac_flat", "mac_hierarchical", "mac_topk"):
        assert 0.0 <= res[key]["em"] <= res[key]["f1"] + 1e-9 <= 1.0 + 1e-9
    assert res["questions"] == 4 * len(facts.RELATIONS)
    with pytest.raises(FileNotFoundError):
        sqa.load_run(tmp_path / "missing")


def test_evaluate_over_several_banks(setup):
    s = setup
    res = sqa.evaluate(CFG, s["params"], s["lm_params"], documents=2, seed=3, baselines=False,
                       banks=2, q_len=Q_LEN)
    assert (res["banks"], res["questions"]) == (2, 2 * 2 * len(facts.RELATIONS))
    # Each bank holds only its own stream's two documents; EM/F1 are over all the questions.
    docs, recs, dtok = sqa._stream("test", 4, 3, 112)
    preds, answers = [], []
    for b in range(2):
        bank = sqa.stream_documents(CFG, s["params"], dtok[2 * b:2 * b + 2],
                                    sqa.init_bank(CFG, 2))
        rs = [r for r in recs if 2 * b <= r["doc_id"] < 2 * b + 2]
        preds += sqa.answer(CFG, s["params"], s["lm_params"], [r["question"] for r in rs],
                            memory=bank.values, valid=bank.valid, window=0, topk=0,
                            q_len=Q_LEN)
        answers += [r["answer"] for r in rs]
    assert res["mac_flat"] == sqa.score(preds, answers)
    with pytest.raises(ValueError, match="banks"):
        sqa.evaluate(CFG, s["params"], s["lm_params"], documents=2, banks=0)
