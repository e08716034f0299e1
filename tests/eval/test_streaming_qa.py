"""MAC streaming evaluation: the bank as documents stream in, greedy answering, runs on disk."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import streaming_qa as sqa
from models import layers
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
    # Jitted (a compilation per prompt length instead of op-by-op dispatch per length)
    prefix = jax.jit(lambda p, q, m: mac.apply(
        {"params": p}, mac.apply({"params": p}, q, m, method=MAC.aggregate), method=MAC.prefix))
    logits_of = jax.jit(lambda lm, ids, kv: modulated_logits(CFG, lm, ids, kv))
    for q, g in zip(qs, got):
        kv = prefix(s["params"], jnp.asarray(facts.encode_questions([q], Q_LEN)), bank.values)
        ids = list(np.concatenate([tok.encode(q), [tok.SEP]]))
        out = []
        for _ in range(3):
            logits = logits_of(s["lm_params"], jnp.asarray([ids]), kv)
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
    p1 = obj.uniform_finetune(CFG, s["lm_params"], s["dtok"][:2], lr=1e-3)
    p1b = obj.uniform_finetune(CFG, s["lm_params"], s["dtok"][:2], lr=1e-3)
    chex.assert_trees_all_equal(p1, p1b)
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p1, s["lm_params"])
    assert max(jax.tree_util.tree_leaves(diff)) > 0


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


# ---------------------------------------------------------------------------------------------
# An oracle MAC: weights and bank set by hand so that the answer is read from the bank
# ---------------------------------------------------------------------------------------------
# The LM (one layer, two heads of 32) ignores its tokens: head 1 attends, by RoPE position only,
# to the prefix slot keyed for the position being decoded and writes that slot's value, a code
# u_b of the byte to emit, which the LM head reads back. h copies the prefix from the bank slot
# whose key (dims 0..31) is the asking question's own code z0; the prefix FFN passes dims 32..63
# of h's output through. The bank entry of document i holds its question's keys and the
# answer's prefix (RoPE keys for the decoding positions, byte codes as values), so the answer
# is produced only if the bank is read, and read at the right document's entry.
O_HD, O_P = 32, 11          # head width; prefix positions: longest answer (9) + EOS + 1
O_LM = TransformerConfig(vocab_size=tok.VOCAB_SIZE, width=2 * O_HD, num_layers=1, num_heads=2,
                         tie_embeddings=False, rope_interleaved=True)
O_CFG = MACConfig(lm=O_LM, num_tokens=2 * O_P, prefix_len=O_P, enc_width=16, enc_layers=1,
                  dec_layers=1, enc_heads=2, agg_blocks=1, agg_heads=1, mlp_ratio=2,
                  prefix_hidden=8)
SHARP = 50.0                # nats between the intended attention score and every other one


def _layer_norm(x):
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)


def _rope_key(position):
    e = np.zeros((1, 1, 1, O_HD), np.float32)
    e[..., 0] = 1.0
    return np.asarray(layers.apply_rope(jnp.asarray(e), jnp.asarray([position]),
                                        interleaved=True))[0, 0, 0, :2]


def oracle(questions, answers, key):
    """(MAC params, LM params, bank [N, T, D]): entry i answers questions[i] with answers[i]."""
    D, T, N = O_LM.width, O_CFG.num_tokens, len(questions)
    k_mac, k_lm, k_u = jax.random.split(key, 3)
    params = jax.tree_util.tree_map(np.array, obj.init_mac(O_CFG, k_mac))
    params["question_encoder"]["proj"]["kernel"][:, O_HD:] = 0     # z0 lives in dims 0..31
    z0 = np.asarray(MAC(O_CFG).apply({"params": params}, jnp.asarray(
        facts.encode_questions(questions, Q_LEN)), method=MAC.encode_question), np.float64)
    keys = z0[..., :O_HD] - z0[..., :O_HD].mean(-1, keepdims=True)
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    u = np.array(jax.random.normal(k_u, (tok.VOCAB_SIZE, O_HD - 4)), np.float64)
    u /= np.linalg.norm(u, axis=-1, keepdims=True)                   # byte codes, dims 2..29
    plen = (facts.encode_prompts(questions, Q_LEN) != tok.PAD).sum(-1)
    payload = np.zeros((N, T, O_HD))
    for b in range(N):
        ids = list(tok.encode(answers[b])) + [tok.EOS] * (O_P - len(tok.encode(answers[b])))
        for s in range(O_P):   # step s reads its logits at LM position P + plen - 1 + s
            payload[b, s, :2] = _rope_key(O_P + plen[b] - 1 + s)
            payload[b, O_P + s, 2:O_HD - 2] = u[ids[s]]
    # Dims 30, 31 make every bank slot zero-mean with one norm, so h's LayerNorm scales all
    # slots alike and the key match is decided by the keys alone.
    rest = payload[..., :O_HD - 2]
    S, sq = rest.sum(-1), 1.0 + (rest ** 2).sum(-1)
    R2 = (sq + S ** 2 / 2).max() + 1.0
    disc = np.sqrt(2 * (R2 - sq) - S ** 2)
    payload[..., O_HD - 2], payload[..., O_HD - 1] = (-S + disc) / 2, (-S - disc) / 2
    bank = np.concatenate([keys, payload], -1)
    sigma = np.sqrt(R2 / D)
    # h's score of question slot (b, t) on bank slot (i, s), per unit of query scale.
    q = _layer_norm(np.concatenate([z0[..., :O_HD], 0 * z0[..., :O_HD]], -1))[..., :O_HD]
    sc = np.einsum("btk,isk->btis", q, keys).reshape(N, T, N * T) / sigma / np.sqrt(D)
    own = np.arange(N)[:, None] * T + np.arange(T)[None]
    mine = np.take_along_axis(sc, own[..., None], -1)[..., 0]
    np.put_along_axis(sc, own[..., None], -np.inf, -1)
    gap = (mine - sc.max(-1)).min()
    assert gap > 0, gap                     # every question slot's own key scores highest
    a = params["agg_0_attn"]
    for n in ("query", "key", "value", "out"):
        a[n]["kernel"][:] = 0
    a["query"]["kernel"][np.arange(O_HD), 0, np.arange(O_HD)] = SHARP / gap
    a["key"]["kernel"][np.arange(O_HD), 0, np.arange(O_HD)] = 1.0
    a["value"]["kernel"][np.arange(O_HD, D), 0, np.arange(O_HD, D)] = sigma
    a["out"]["kernel"][0, np.arange(D), np.arange(D)] = 1.0
    params["agg_0_ffn"]["fc_out"]["kernel"][:] = 0
    pf = params["prefix_ffn"]
    pf["w2"][:], pf["b2"][:], pf["gain"][:] = 0, 0, 0
    pf["gain"][:, O_HD:] = 1.0
    lp = jax.tree_util.tree_map(np.array, obj.init_lm(O_LM, k_lm))
    lp["embed"]["embedding"][:] = 0
    lp["embed"]["embedding"][:, 0] = 1.0                            # ln_1 makes it sqrt(D)
    at = lp["block_0"]["attn"]
    for n in ("query", "key", "value", "out"):
        at[n][:] = 0
    # Prefix slots are one position apart: the nearest rival scores cos(d) of the best.
    rival = np.cos(np.arange(1, O_P)).max()
    at["query"][0, 1, 0] = SHARP * np.sqrt(O_HD) / (1 - rival) / np.sqrt(D)
    at["out"][1, np.arange(2, O_HD - 2), O_HD + np.arange(2, O_HD - 2)] = 1.0
    lp["block_0"]["mlp"]["fc_out"]["kernel"][:] = 0
    lp["lm_head"]["kernel"][:] = 0
    lp["lm_head"]["kernel"][O_HD + 2:D - 2] = u.T
    as_jnp = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jnp.asarray(x, jnp.float32), t)
    return as_jnp(params), as_jnp(lp), jnp.asarray(bank, jnp.float32)


@pytest.fixture(scope="module")
def oracle_case():
    docs = facts.fact_stream("test", 6, seed=0)
    # One question per document, every relation asked; 6 questions in batches of 4 also run
    # answer()'s padded last batch.
    qs = [d["qas"][i % 3]["question"] for i, d in enumerate(docs)]
    ans = [d["qas"][i % 3]["answer"] for i, d in enumerate(docs)]
    params, lp, bank = oracle(qs, ans, jax.random.key(0))
    run = lambda **kw: sqa.answer(O_CFG, params, lp, qs, q_len=Q_LEN, batch=4, **kw)  # noqa
    return dict(qs=qs, ans=ans, bank=bank, run=run)


def test_oracle_bank_scores_em_one_and_an_empty_bank_does_not(oracle_case):
    o = oracle_case
    assert len(set(o["ans"])) > 1                   # a constant prediction cannot score 1.0
    full = o["run"](memory=o["bank"])
    assert sqa.score(full, o["ans"])["em"] == 1.0
    # The same predictions scored against another document's answers are wrong: EM is per pair.
    other = o["ans"][1:] + o["ans"][:1]
    assert sqa.score(full, other)["em"] < 1.0
    n = len(o["qs"])
    assert sqa.score(o["run"](memory=o["bank"], valid=np.zeros(n, bool)), o["ans"])["em"] == 0.0
    assert sqa.score(o["run"](memory=None), o["ans"])["em"] == 0.0
    # Each question reads its own document's entry: alone it suffices, another one alone does not.
    own = np.eye(n, dtype=bool)
    assert o["run"](memory=o["bank"], valid=own) == o["ans"]
    wrong = o["run"](memory=o["bank"], valid=np.roll(own, 1, axis=1))
    assert all(p != a for p, a in zip(wrong, o["ans"]))


def test_gold_removed_changes_every_prediction(oracle_case):
    o = oracle_case
    n = len(o["qs"])
    valid = np.ones(n, bool)
    no_gold = sqa.gold_removed_valid(valid, np.arange(n))
    np.testing.assert_array_equal(no_gold, ~np.eye(n, dtype=bool))
    with_gold = o["run"](memory=o["bank"], valid=valid)
    without = o["run"](memory=o["bank"], valid=no_gold)
    assert with_gold == o["ans"]
    assert all(p != a for p, a in zip(without, with_gold))
    # Only the gold entry goes; entries that were already invalid stay invalid.
    part = np.array([True, False] * (n // 2))
    np.testing.assert_array_equal(sqa.gold_removed_valid(part, [0, 0, 1, 2, 3, 4]),
                                  part[None] & (np.arange(n)[None] != np.array(
                                      [0, 0, 1, 2, 3, 4])[:, None]))


def test_relative_retention_arithmetic():
    # F1 on the first documents' questions at bank sizes 16..64 (hand-made): relative to 16.
    f1 = {32: 0.6, 16: 0.8, 64: 0.2, 48: 0.4}
    rel = sqa.relative_retention(f1)
    assert rel == {16: 1.0, 32: 0.6 / 0.8, 48: 0.4 / 0.8, 64: 0.2 / 0.8}
    assert rel[max(rel)] == pytest.approx(1 / 4)
    assert sqa.relative_retention({4: 0.0, 8: 0.5}) == {4: 0.0, 8: 0.0}
    with pytest.raises(ValueError, match="f1"):
        sqa.relative_retention({})


def test_retention_runs_and_rejects_a_bank_smaller_than_first(setup):
    s = setup
    r = sqa.retention(CFG, s["params"], s["lm_params"], first=1, bank_sizes=(2, 1), seed=0,
                      q_len=Q_LEN)
    assert set(r["f1"]) == set(r["relative_f1"]) == {1, 2}
    assert r["relative_f1"] == sqa.relative_retention(r["f1"])
    with pytest.raises(ValueError, match="first=3"):
        sqa.retention(CFG, s["params"], s["lm_params"], first=3, bank_sizes=(2, 4))


def test_evaluate_with_baselines_returns_every_method(setup):
    s = setup
    res = sqa.evaluate(CFG, s["params"], s["lm_params"], documents=2, seed=1, baselines=True,
                       ft_lrs=(1e-3, 1e-2), q_len=Q_LEN)
    for m in sqa.METHODS:
        assert 0.0 <= res[m]["em"] <= res[m]["f1"] + 1e-9 <= 1.0 + 1e-9
        assert res[m]["count"] == 2 * len(facts.RELATIONS)
    assert res["uniform_ft"]["lr"] in (1e-3, 1e-2)
    assert set(res["uniform_ft_sweep"]) == {"0.001", "0.01"}
    assert res["adapt_seconds_per_document"] > 0
