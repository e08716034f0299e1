"""MAC stage-2 objective (backpropagation dropout, answer-only loss) and the fact stream."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.mac import MAC, MACConfig, modulated_logits, slot_keys
from models.transformer import TransformerConfig
from train.data import facts, mac_data
from train.data import tokenizer as tok
from train.objectives import mac as obj

LM = TransformerConfig(vocab_size=320, width=32, num_layers=1, num_heads=4)
CFG = MACConfig(lm=LM, num_tokens=2, prefix_len=1, enc_width=16, enc_layers=1, dec_layers=1,
                enc_heads=2, agg_blocks=2, agg_heads=2, mlp_ratio=2, prefix_hidden=8)
LENGTHS = mac_data.Lengths(doc=112, question=32, qa=40, lm=160)
K = 4


@pytest.fixture(scope="module")
def setup():
    docs = facts.fact_stream("train", 8, seed=3)
    enc = mac_data.encode_docs(docs, LENGTHS)
    idx, rel = np.arange(K), np.arange(K) % len(facts.RELATIONS)   # one question per document
    batch = {"docs": enc["docs"][idx], "questions": enc["questions"][idx, rel],
             "qa": enc["qa"][idx, rel], "qa_weights": enc["qa_weights"][idx, rel],
             "doc_answers": enc["doc_answers"][idx], "answers": enc["doc_answers"][idx, rel]}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    lm_params = obj.init_lm(LM, jax.random.key(0))
    params = obj.init_mac(CFG, jax.random.key(1))
    return dict(enc=enc, batch=batch, lm_params=lm_params, params=params)


# ---------------------------------------------------------------------------------------------
# Fact stream
# ---------------------------------------------------------------------------------------------
def test_entity_splits_are_disjoint():
    sets = {s: set(facts.entity_names(s)) for s in facts.SPLITS}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert min(len(v) for v in sets.values()) > 1000


def test_fact_stream_deterministic_and_answerable():
    a = facts.fact_stream("test", 20, seed=5)
    assert a == facts.fact_stream("test", 20, seed=5)
    assert a != facts.fact_stream("test", 20, seed=6)
    test_names = set(facts.entity_names("test"))
    assert len({d["entity"] for d in a}) == 20
    for d in a:
        assert d["entity"] in test_names
        for qa in d["qas"]:
            assert d["entity"] in qa["question"]
            assert qa["answer"] in d["document"]
            assert qa["answer"] not in qa["question"]
    with pytest.raises(ValueError, match="split"):
        facts.entity_names("dev")
    with pytest.raises(ValueError, match="num_documents"):
        facts.fact_stream("test", 0, seed=0)


def test_encode_qa_weights_only_answer():
    tokens, w = facts.encode_qa(["Where?"], ["Oslo"], 16)
    row = tokens[0]
    assert tok.decode(row[:6]) == "Where?" and row[6] == tok.SEP
    assert tok.decode(row[w[0] > 0]) == "Oslo" and row[w[0] > 0][-1] == tok.EOS
    assert w[0].sum() == 5 and (row[12:] == tok.PAD).all()
    with pytest.raises(ValueError, match="length"):
        facts.encode_qa(["Where?"], ["Oslo"], 8)


def test_load_qa_file_jsonl(tmp_path):
    """The official columns from JSONL too (the CSV files: tests/train/test_mac_qa.py)."""
    jl = tmp_path / "test.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"question": " Who won? ", "answers": "Ana Lopez\\Ana", "text": "Ana won the race."},
        {"question": "Where?", "answers": "Oslo", "text": "Ana won the race."},
        {"question": "When?", "answers": "1999", "text": "It was 1999."}]) + "\n")
    rows = facts.load_qa_file(jl, format="streamingqa")
    assert [r["doc_id"] for r in rows] == [0, 0, 1]
    assert rows[0]["question"] == "Who won?" and rows[0]["answer"] == "Ana"
    assert rows[0]["answers"] == ["Ana Lopez", "Ana"]
    assert facts.load_qa_file(jl, format="streamingqa", limit=1) == rows[:1]


# ---------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------
def test_batch_layout(setup):
    b = setup["batch"]
    chex.assert_shape(b["docs"], (K, LENGTHS.doc))
    chex.assert_shape(b["questions"], (K, LENGTHS.question))
    chex.assert_shape([b["qa"], b["qa_weights"]], (K, LENGTHS.qa))
    for i in range(K):
        q = tok.decode(b["questions"][i])
        assert tok.decode(b["qa"][i]).startswith(q)
        answer = tok.decode(np.asarray(b["qa"][i])[np.asarray(b["qa_weights"][i]) > 0])
        assert answer and answer in tok.decode(b["docs"][i])  # its own document answers it


@pytest.mark.parametrize("rho", [0.5, 0.25])
def test_backprop_dropout_gradients(setup, rho):
    """Gradients reach only the first ⌊ρK⌋ documents' modulations; the rest stay in the bank."""
    s = setup
    phi = jax.random.normal(jax.random.key(2), (K, CFG.num_tokens, LM.width))
    loss = jax.jit(lambda f: obj.loss_from_modulations(CFG, s["params"], s["lm_params"], f,
                                                        s["batch"], rho)[0])
    g = jax.jit(jax.grad(loss))(phi)
    k = obj.num_scored(rho, K)
    assert k == int(rho * K)
    assert np.all(np.asarray(g[k:]) == 0.0)
    assert np.all(np.abs(np.asarray(g[:k])).reshape(k, -1).max(-1) > 0)
    # The stop-gradient documents still matter to the loss's value (they are in the bank).
    other = phi.at[k:].set(jax.random.normal(jax.random.key(9), phi[k:].shape))
    l0, l1 = loss(phi), loss(other)
    assert abs(float(l0) - float(l1)) > 1e-6


def test_meta_loss_scores_only_first_questions(setup):
    """Changing a dropped document's question/answer leaves the loss and gradients unchanged."""
    s = setup
    rho = 0.5
    f = jax.jit(jax.value_and_grad(lambda p, b: obj.meta_loss(CFG, p, s["lm_params"], b, rho)[0]))
    l0, g0 = f(s["params"], s["batch"])
    b = dict(s["batch"])
    b["qa"] = b["qa"].at[K - 1].set(b["qa"][0])
    b["questions"] = b["questions"].at[K - 1].set(b["questions"][0])
    l1, g1 = f(s["params"], b)
    chex.assert_trees_all_equal((l0, g0), (l1, g1))
    assert float(optax_norm(g0)) > 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(tree)))


def test_loss_only_on_answer_tokens(setup):
    s = setup
    logits = jax.random.normal(jax.random.key(3), (K, LENGTHS.qa, LM.vocab_size))
    qa, w = s["batch"]["qa"], s["batch"]["qa_weights"]
    loss, _ = obj.qa_loss(CFG, s["lm_params"], logits, qa, w)
    # Change the logits at every position that predicts a non-answer token: loss unchanged.
    predicts_answer = jnp.concatenate([w[:, 1:], jnp.zeros((K, 1))], 1) > 0
    noisy = jnp.where(predicts_answer[..., None], logits, logits + 5 * jax.random.normal(
        jax.random.key(4), logits.shape))
    chex.assert_trees_all_close(obj.qa_loss(CFG, s["lm_params"], noisy, qa, w)[0], loss,
                                atol=1e-6)


def test_curriculum_banks():
    v = np.asarray(obj.curriculum_valid(2, 4, 2))
    np.testing.assert_array_equal(v, [[1, 1, 0, 0], [0, 1, 1, 0]])
    assert np.asarray(obj.curriculum_valid(2, 4, 4)).all()


def test_objective_settings_are_checked():
    ok = dict(rho=0.5, readout_weight=1.0, hierarchical_windows=(2, 3), hierarchical_weight=1.0,
              curriculum_start=0, curriculum_steps=0)
    obj.check_settings(K, **ok)
    for field, bad in (("rho", 0.0), ("curriculum_start", -1), ("readout_weight", -1.0),
                       ("hierarchical_weight", -1.0), ("hierarchical_windows", (1,)),
                       ("hierarchical_windows", (K,)), ("hierarchical_windows", ())):
        with pytest.raises(ValueError, match=field):
            obj.check_settings(K, **{**ok, field: bad})


def test_stage1_lm_rows():
    docs = facts.fact_stream("train", 4, seed=0)
    rows = mac_data.lm_rows(facts.qa_records(docs), 160)
    text = tok.decode(rows["inputs"][0], specials="render")
    assert text.startswith(docs[0]["document"] + "<EOS>" + docs[0]["qas"][0]["question"] + "<SEP>")
    np.testing.assert_array_equal(rows["inputs"][:, 1:], rows["targets"][:, :-1])


def test_stage1_question_only_rows():
    """The frozen LM must also see questions with no document in front of them (MAC's layout:
    prefix, then `question SEP`); without such rows its no-memory answer loss was ~3 nats/token
    instead of the answer prior and stage 2 never got below it."""
    docs = facts.fact_stream("train", 6, seed=0)
    recs = facts.qa_records(docs, questions_per_doc=None)
    rows = mac_data.qa_only_rows(recs, 160)
    seqs = [qa["question"] + "<SEP>" + qa["answer"] + "<EOS>" for d in docs for qa in d["qas"]]
    # Packed in order: the rows (plus each row's last target) spell every sequence exactly once.
    text = "".join(tok.decode(np.concatenate([r, t[-1:]]), specials="render")
                   .replace("<PAD>", "") for r, t in zip(rows["inputs"], rows["targets"]))
    assert text == "".join(seqs)
    for r in rows["inputs"]:          # every packed row starts with a question at position 0
        assert tok.decode(r, specials="render").split("<SEP>")[0] in {qa["question"]
                                                                     for d in docs
                                                                     for qa in d["qas"]}
    np.testing.assert_array_equal(rows["inputs"][:, 1:], rows["targets"][:, :-1])
    b = mac_data.mixed_lm_rows(docs, 160, qa_only_fraction=0.5)
    first = [tok.decode(r[:1]) for r in b["inputs"]]
    n_qa = sum(f == "W" for f in first)           # question rows start with What/Where
    assert n_qa == len(first) // 2                # half of the rows
    with pytest.raises(ValueError, match="qa_only_fraction"):
        mac_data.mixed_lm_rows(docs, 160, qa_only_fraction=1.0)


def test_fact_stream_tfds_build_roundtrip(tmp_path):
    spec = facts.FactSpec(train_documents=6, validation_documents=3, test_documents=4, seed=2)
    src = facts.data_source(spec, "test", data_dir=str(tmp_path))
    assert len(src) == 4
    want = facts.fact_stream("test", 4, seed=2)
    assert [facts.document_of(src[i]) for i in range(4)] == want
    with pytest.raises(ValueError, match="train_documents"):
        facts.FactSpec(train_documents=0)


# ---------------------------------------------------------------------------------------------
# Auxiliary readouts
# ---------------------------------------------------------------------------------------------
def test_doc_answers_are_first_answer_bytes(setup):
    docs = facts.fact_stream("train", 8, seed=3)
    enc = setup["enc"]
    assert enc["doc_answers"].shape == (8, len(facts.RELATIONS))
    for d, row in zip(docs, enc["doc_answers"]):
        assert [tok.decode([t]) for t in row] == [qa["answer"][0] for qa in d["qas"]]
    # the asked question's answer (h's readout target) is its QA row's first weighted token
    np.testing.assert_array_equal(
        setup["batch"]["answers"],
        [tok.encode(tok.decode(np.asarray(r)[np.asarray(w) > 0])[:1])[0]
         for r, w in zip(setup["batch"]["qa"], setup["batch"]["qa_weights"])])


def test_readouts_add_to_the_loss_and_get_gradients(setup):
    s = setup
    rho = 0.5
    ro = obj.init_readouts(CFG, len(facts.RELATIONS))

    @jax.jit   # one compilation of the three losses instead of op-by-op dispatch
    def losses(params, lm_params, batch, ro):
        return (obj.meta_loss(CFG, params, lm_params, batch, rho),
                obj.meta_loss(CFG, params, lm_params, batch, rho, readouts=ro,
                              readout_weight=0.0)[0],
                obj.meta_loss(CFG, params, lm_params, batch, rho, readouts=ro,
                              readout_weight=0.5))
    (base, m0), off, (on, m1) = losses(s["params"], s["lm_params"], s["batch"], ro)
    assert float(off) == float(base)
    # Zero heads predict uniformly: each readout's cross-entropy is log V; the retrieval term
    # is the cross-entropy of question i picking document i among the K by cosine similarity.
    k = obj.num_scored(rho, K)
    mac = MAC(CFG)
    phi = mac.apply({"params": s["params"]}, s["batch"]["docs"], method=MAC.amortize)
    z0 = mac.apply({"params": s["params"]}, s["batch"]["questions"][:k],
                   method=MAC.encode_question)
    sim = slot_keys(z0) @ slot_keys(phi).T / obj.READOUT_TEMPERATURE
    retrieval = -np.mean(np.asarray(jax.nn.log_softmax(sim, -1))[np.arange(k), np.arange(k)])
    np.testing.assert_allclose(float(on) - float(base),
                               0.5 * (2 * np.log(LM.vocab_size) + retrieval), rtol=1e-4)
    np.testing.assert_allclose(float(m1["qa_loss"]), float(base), rtol=1e-6)
    # Jitted: one compilation instead of an op-by-op backward pass (the slowest part cold); the
    # LM params and batch are arguments, not constants folded into the program.
    grad = jax.jit(jax.grad(lambda t, lm, b: obj.meta_loss(CFG, t["mac"], lm, b, rho,
                                                           readouts=t["ro"],
                                                           readout_weight=0.5)[0]))
    g = grad({"mac": s["params"], "ro": ro}, s["lm_params"], s["batch"])
    assert float(optax_norm(g["ro"]["g"])) > 0 and float(optax_norm(g["ro"]["h"])) > 0


def test_hierarchical_term_adds_the_chunked_answer_loss(setup):
    s = setup
    rho, w = 0.5, 2
    k = obj.num_scored(rho, K)
    base, _ = obj.meta_loss(CFG, s["params"], s["lm_params"], s["batch"], rho)
    off, _ = obj.meta_loss(CFG, s["params"], s["lm_params"], s["batch"], rho,
                           hierarchical_window=w, hierarchical_weight=0.0)
    on, m = obj.meta_loss(CFG, s["params"], s["lm_params"], s["batch"], rho,
                          hierarchical_window=w, hierarchical_weight=0.5)
    assert float(off) == float(base)
    # Independently: h aggregates chunks of w documents, then its chunk outputs, and the frozen
    # LM answers with that prefix.
    mac = MAC(CFG)
    phi = mac.apply({"params": s["params"]}, s["batch"]["docs"], method=MAC.amortize)
    z = mac.apply({"params": s["params"]}, s["batch"]["questions"][:k], phi, window=w,
                  method=MAC.aggregate)
    flat = mac.apply({"params": s["params"]}, s["batch"]["questions"][:k], phi, window=0,
                     method=MAC.aggregate)
    assert float(jnp.max(jnp.abs(z - flat))) > 1e-4          # a different path from flat
    kv = mac.apply({"params": s["params"]}, z, method=MAC.prefix)
    logits = modulated_logits(CFG, s["lm_params"], s["batch"]["qa"][:k], kv)
    want, _ = obj.qa_loss(CFG, s["lm_params"], logits, s["batch"]["qa"][:k],
                          s["batch"]["qa_weights"][:k])
    np.testing.assert_allclose(float(m["hierarchical_qa_loss"]), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(on), float(base) + 0.5 * float(want), rtol=1e-5)
    with pytest.raises(ValueError, match="window"):
        obj.meta_loss(CFG, s["params"], s["lm_params"], s["batch"], rho,
                      hierarchical_window=K, hierarchical_weight=1.0)


