"""The memory benchmark: equal parameters, the probes' generators (streaming QA among them), the
probes posed to MAC, sliding-window attention, the cost measurement and one end-to-end run at a
micro size."""
import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import figures
from eval import memory_bench as mb
from models import transformer
from train import config_identity
from train.configs import memory_bench as mbc
from train.data import facts, pipeline
from train.data import memory_bench as mb_data
from train.data import memory_bench_mac as mb_mac_data
from train.objectives import birdie_controller
from train.objectives import birdie_paper_controller as paper_controller

MICRO = dict(seq_len=112, width=16, num_layers=1, num_heads=2, batch_size=8, num_steps=3,
             lr=3e-3, init_std=0.125, mem_freq=15, train_pairs=(1, 4),
             train_lengths=(mb_data.PASSKEY_MIN, 106), train_entries=(1, 2),
             train_documents=(1, 2), eval_pairs=(4,), eval_lengths=(128,), eval_entries=(2,),
             eval_documents=(3,), eval_examples=4, mac_doc_length=48, mac_slots=2,
             mac_prefix=1, mac_enc_width=16, mac_enc_layers=1, mac_agg_blocks=1,
             mac_mlp_ratio=1)


@pytest.mark.parametrize("size", sorted(mbc.SIZES))
def test_parameter_counts_are_within_ten_percent(size):
    counts = {m: mb.count_params(m, size) for m in mbc.EVAL_MODELS}   # shapes only
    print(size, counts)
    lo, hi = min(counts.values()), max(counts.values())
    assert hi <= 1.10 * lo, counts
    # MAC's LM is the dense model; its trained networks are counted on their own.
    assert counts["mac"] == counts["dense"] == counts["transformer_birdie"]
    # Every model sees the same rows: one batch, steps and T (MAC's LM is the dense run).
    configs = [mbc.bench_config(m, size, 0) for m in mbc.MODELS]
    assert len({(c.batch_size, c.num_steps, c.seq_len) for c in configs}) == 1
    assert configs[-1].base_lm.to_dict() == mbc.bench_config("dense", size, 0).to_dict()


def test_test_split_is_held_out_and_floors_are_exact():
    for probe, d in (("mqar", 4), ("passkey", 120), ("phonebook", 3)):
        assert mb_data.heldout_overlap(probe, d, 32, seed=0) == 0
        a = mb_data.probe_example(probe, "test", d, 0, 0)
        assert not np.array_equal(a["tokens"], mb_data.probe_example(probe, "train", d, 0, 0)[
            "tokens"])
        assert a["tokens"].size <= mb_data.probe_length(probe, d)
    exs = [mb_data.probe_example("mqar", "test", 4, i, 0) for i in range(8)]
    assert mb_data.no_binding("mqar", exs) == pytest.approx(1 / 4)     # 4 distinct values
    one = [mb_data.probe_example("phonebook", "test", 1, i, 0) for i in range(4)]
    assert mb_data.no_binding("phonebook", one) == 1.0                 # one number to copy
    many = [mb_data.probe_example("phonebook", "test", 16, i, 0) for i in range(8)]
    assert 1 / 16 < mb_data.no_binding("phonebook", many) < 0.2        # + chance digit matches
    assert mb_data.no_binding("passkey", exs[:2]) == pytest.approx((1 / 9 + 0.4) / 5)
    # The answer marks the tokens a model predicts: MQAR's values, the key's / number's digits.
    ph = many[0]
    assert bytes(ph["tokens"][ph["answer"]].astype(np.uint8)).decode().isdigit()
    with pytest.raises(ValueError, match=r"pairs=65 is not allowed; allowed: 1..64"):
        mb_data.mqar_probe(np.random.default_rng(0), 65)


def test_streamqa_answers_an_earlier_document_and_holds_out_entities():
    exs = [mb_data.probe_example("streamqa", "test", 6, i, 0) for i in range(16)]
    test_names, train_names = set(facts.entity_names("test")), set(facts.entity_names("train"))
    for ex in exs:
        text = bytes(ex["tokens"].astype(np.uint8)).decode()
        prompt, answer = text[:ex["prefix_len"]], text[ex["prefix_len"]:]
        question = prompt.split("\n")[-1]
        docs = mb_data.streamqa_facts(prompt)
        assert len(docs) == 6 and {e for _, e, _ in docs} <= test_names
        # The asked entity's document, before the question, holds the answer.
        (attr,) = [a for _, e, a in docs if f" {e} " in f" {question[:-1]} "]
        assert answer == " " + attr
        assert bytes(ex["tokens"][ex["answer"]].astype(np.uint8)).decode() == attr[0]
    train = mb_data.probe_example("streamqa", "train", 6, 0, 0)
    assert {e for _, e, _ in mb_data.streamqa_facts(bytes(train["tokens"][:train[
        "prefix_len"]].astype(np.uint8)).decode())} <= train_names
    assert not test_names & train_names
    # The floor: a random attribute of the asked relation among the example's own documents.
    prompt = ("Bodaku lives in Lisbon.\nKabu lives in Oslo.\nMoro works as a chef.\n"
              "Where does Kabu live?")
    ex = mb_data._pack(mb_data.tok.encode(prompt), mb_data.tok.encode(" Oslo"),
                       np.arange(5) == 1)
    assert mb_data.no_binding("streamqa", [ex]) == pytest.approx(1 / 2)
    one = [mb_data.probe_example("streamqa", "test", 1, i, 0) for i in range(4)]
    assert mb_data.no_binding("streamqa", one) == 1.0
    assert 1 / 20 < mb_data.no_binding("streamqa", exs) < 0.6
    with pytest.raises(ValueError, match="documents=0 is not allowed"):
        mb_data.streamqa_probe(np.random.default_rng(0), 0)


def test_mac_parts_put_the_facts_in_the_bank():
    S = 48
    for probe, ds in (("mqar", (2, 8)), ("phonebook", (2, 5)), ("streamqa", (1, 4)),
                      ("passkey", (128, 512))):
        for d in ds:
            ex = mb_data.probe_example(probe, "test", d, 0, 0)
            docs, rows = mb_mac_data.mac_parts(probe, ex, S)
            # The bank grows with the facts: one document per pair / entry / document, or per
            # S bytes of the passkey prompt; every scored answer token is scored once.
            assert docs.shape == (mb_mac_data.max_documents(probe, d, S), S)
            assert sum(r["weights"].sum() for r in rows) == ex["answer"].sum()
            assert len(rows) == (d if probe == "mqar" else 1)
            for r in rows:       # the LM reads the question, then the answer
                assert np.array_equal(r["qa"][:r["question"].size], r["question"])
    src = mb_mac_data.MacSource(mb_data.MixtureSpec(
        seq_len=112, mqar_pairs=(1, 4), passkey_lengths=(99, 106), phonebook_entries=(1, 2),
        streamqa_documents=(1, 2)), "train", S)
    row = src[3]
    assert row["docs"].shape == (4, S) and row["qa"].shape == row["qa_weights"].shape
    assert row["qa_weights"].sum() >= 1


def test_mixture_rows_mark_answers_and_prompts():
    spec = mb_data.MixtureSpec(seq_len=112, mqar_pairs=(1, 4), passkey_lengths=(99, 106),
                               phonebook_entries=(1, 2), streamqa_documents=(1, 2))
    src = mb_data.MixtureSource(spec, "train")
    rows = [src[i] for i in range(12)]
    for r in rows:
        assert r["inputs"].shape == r["weights"].shape == r["prefix"].shape == (112,)
        assert 1 <= r["weights"].sum() <= 10
        # Answers come after the prompt (the bidirectional prefix never holds one).
        assert not (r["prefix"][np.nonzero(r["weights"])[0] + 1].any())
    # Birdie's rows (BIRDIE_MODELS) are drawn over the same probes' text, streaming QA included.
    birdie_rows = mb_data.MixtureSource(dataclasses.replace(spec, birdie_fraction=1.0), "train")
    assert all(r["segment_ids"].max() >= 1 for r in (birdie_rows[i] for i in range(4)))
    with pytest.raises(ValueError, match="phonebook_entries=.*fits seq_len=112"):
        mb_data.MixtureSpec(seq_len=112, passkey_lengths=(99, 106), phonebook_entries=(1, 8),
                            streamqa_documents=(1, 2))


def test_birdie_rows_follow_the_mixture_and_validation_is_balanced():
    spec = mb_data.MixtureSpec(seq_len=112, mqar_pairs=(1, 4), passkey_lengths=(99, 106),
                               phonebook_entries=(1, 2), streamqa_documents=(1, 2),
                               birdie_fraction=0.5)
    K = len(mb_data.birdie_objectives(160))
    spec = dataclasses.replace(spec, seq_len=160)
    ids = lambda r: set(np.unique(r["objective_ids"][r["objective_ids"] >= 0]))  # noqa: E731
    uniform = mb_data.MixtureSource(spec, "train")
    onehot = mb_data.MixtureSource(dataclasses.replace(
        spec, mixture=tuple(float(i == 7) for i in range(K))), "train")
    # A one-hot mixture packs only that configuration into the Birdie rows; the probe rows (the
    # same rows, the same examples) stay as they were.
    probe_rows = 0
    for i in range(8):
        a, b = uniform[i], onehot[i]
        if ids(a) == {K}:
            probe_rows += 1
            assert all(np.array_equal(a[k], b[k]) for k in a)
        else:
            assert ids(b) == {7} and K not in ids(a)
    assert 0 < probe_rows < 8
    # The controller's balanced rows: every row Birdie's, row i of configuration i % K only, on
    # a validation stream that is neither the train nor the test stream.
    val = mb_data.MixtureSource(dataclasses.replace(spec, objective_per_row=True), "validation")
    assert len(val) == spec.num_validation
    for i in (0, 5, K + 2):
        assert ids(val[i]) == {i % K}
    test = mb_data.MixtureSource(dataclasses.replace(spec, objective_per_row=True), "test")
    assert not np.array_equal(val[0]["inputs"], test[0]["inputs"])
    with pytest.raises(ValueError, match=rf"mixture=\(1.0,\) is not allowed; allowed: \(\) or {K}"):
        dataclasses.replace(spec, mixture=(1.0,))
    with pytest.raises(ValueError, match="birdie_fraction=0.0 is not allowed"):
        dataclasses.replace(spec, birdie_fraction=0.0, objective_per_row=True)


# Recipe hashes of the models without Birdie at 34a6bb0 (before the Birdie models' controller):
# their runs, finished or in progress, are the figure's under any later change.
RECIPE_HASHES = {
    ("dense", "quick"): "c2d2b700658e", ("landmark", "quick"): "4e0f5dadc85a",
    ("ssm_causal", "quick"): "42c2b31fd02b", ("hawk", "quick"): "bc771276448c",
    ("mac", "quick"): "45c5dc14c0d2", ("dense", "cpu"): "d043a591d011",
    ("landmark", "cpu"): "c8b6574eb87b", ("ssm_causal", "cpu"): "c320e2104c12",
    ("hawk", "cpu"): "f4131e977462", ("mac", "cpu"): "68024942cb4d",
}


def test_birdie_models_get_the_paper_controller_and_the_others_keep_their_recipes():
    for (name, size), h in RECIPE_HASHES.items():
        assert config_identity.recipe_hash([mbc.bench_config(name, size, 0)]) == h, (name, size)
    c = mbc.bench_config("dense", "quick", 0)
    assert "hooks" not in c
    with pytest.raises(ValueError, match="data.birdie_fraction=0.0 .* is not allowed"):
        birdie_controller.action_space(c)
    for name in mbc.BIRDIE_MODELS:
        for size, steps in (("quick", [1, 5, 10, 20, 30, 40, 60]),
                            ("paper", [10, 50, 250, 500, 1000, 1500, 2000, 3000])):
            c = mbc.bench_config(name, size, 0)
            hook = birdie_controller.make_hook(c.hooks.birdie_controller, c)
            assert hook.kind == "paper" and hook.task_action is None
            assert hook.names == tuple(o.name for o in mb_data.birdie_objectives(c.seq_len))
            # Every configuration of the compact set fits but selective copying at T = 128.
            assert len(hook.names) == len(hook.cfg.group_ids) == (17 if size == "quick" else 18)
            # The paper's schedule, scaled to the run's steps below `paper` size.
            due = [t for t in range(1, c.num_steps + 1)
                   if paper_controller.should_update(hook.cfg, t)]
            assert due[:len(steps)] == steps
            assert hook.cfg.warmup_step == (5 if size == "quick" else 250)
            # Its balanced validation rows fit the split the hook reads.
            rows = len(hook.names) * hook.rows_per_objective
            data = pipeline.resolve_data_config(c.data)
            assert -(-rows // c.batch_size) * c.batch_size <= data.num_validation


def test_sliding_window_attention():
    cfg = transformer.TransformerConfig(vocab_size=32, width=16, num_layers=1, num_heads=2)
    tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, 32)
    params = transformer.Transformer(cfg).init(jax.random.key(1), tokens)["params"]
    win = lambda w: transformer.Transformer(cfg.replace(window=w))   # noqa: E731

    @jax.jit
    def outputs(params, tokens):
        apply = lambda w, *a, **k: win(w).apply({"params": params}, *a, **k)  # noqa: E731
        cache = transformer.init_cache(cfg, 1, 12)
        _, cache = apply(3, tokens[:, :11], kv_cache=cache)
        last, _ = apply(3, tokens[:, 11:], kv_cache=cache)
        # A cache of exactly the window's 3 slots is a ring: a chunk longer than the ring, then
        # token by token past its wrap.
        ring = transformer.init_cache(cfg, 1, 3)
        first, ring = apply(3, tokens[:, :8], kv_cache=ring)
        steps = [first]
        for t in range(8, 12):
            step, ring = apply(3, tokens[:, t:t + 1], kv_cache=ring)
            steps.append(step)
        return (apply(0, tokens), apply(12, tokens), apply(3, tokens), last,
                jnp.concatenate(steps, axis=1), ring)

    out, whole, short, last, ringed, ring = outputs(params, tokens)
    # A window as long as the row changes nothing; a shorter one changes what it must.
    chex.assert_trees_all_close(whole, out, atol=1e-6)
    chex.assert_trees_all_close(short[:, :3], out[:, :3], atol=1e-6)
    assert not np.allclose(short[:, 3:], out[:, 3:], atol=1e-4)
    # Decoding with a KV cache applies the same window.
    chex.assert_trees_all_close(last[:, 0], short[:, 11], atol=1e-5)
    chex.assert_trees_all_close(ringed, short, atol=1e-5)
    assert ring.k.shape[2] == 3 and int(ring.length) == 12
    with pytest.raises(ValueError, match="window=-1 is not allowed"):
        cfg.replace(window=-1)


def test_window_keeps_a_window_of_cache(monkeypatch):
    monkeypatch.setitem(mbc.SIZES, "quick", MICRO)
    params = transformer.Transformer(mb.eval_model("dense", "quick").cfg).init(
        jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    cost = mb.measure_costs("sliding_window", "quick", params, 128, runs=1)
    # 2 · L · H · Dh float32 per token for the window's T = 112 tokens (+ the int32 length).
    assert cost["state_bytes"] == 2 * 1 * 2 * 8 * 4 * 112 + 4


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setitem(mbc.SIZES, "quick", MICRO)
    mp.setattr(mbc, "MODELS", ("dense", "mac"))
    mp.setattr(mbc, "EVAL_MODELS", ("dense", "mac"))   # the others: more compiles each
    mp.setattr(mb, "PROBE_AXES", {k: mb.PROBE_AXES[k] for k in ("mqar", "streamqa")})
    out = tmp_path_factory.mktemp("memory_bench")
    doc = figures.run_figure("memory_bench", size="quick", seed=5, out=out)
    yield doc, out
    mp.undo()


def test_end_to_end_json_structure_and_ranges(micro_run):
    doc, out = micro_run
    models = {"dense", "mac"}
    assert set(doc["accuracy"]) == {"mqar", "streamqa"}
    for probe, by_model in doc["accuracy"].items():
        assert set(by_model) == models
        assert all(0.0 <= v <= 1.0 for v in by_model.values())
        curve = doc["curves"][probe]
        assert len(curve["difficulty"]) == len(curve["no_binding"]) == 1
        assert curve["dense"]["accuracy"][-1] == by_model["dense"]
    assert doc["no_binding"]["mqar"] == pytest.approx(0.25)
    assert doc["no_binding"]["streamqa"] > 1 / 3 - 1e-9        # 3 documents, 3 relations
    assert set(doc["cost"]) == models
    for m, cost in doc["cost"].items():
        assert cost["context"] == 128 and cost["seconds_per_token"] > 0
        assert cost["train_tokens_per_s"] > 0
    # Bytes per context token: a full KV cache (2 · L · H · Dh floats per token, + its int32
    # length) > MAC's bank.
    kv = 2 * 1 * 2 * 8 * 4
    assert doc["cost"]["dense"]["bytes_per_context_token"] == kv + 4 / 128
    assert doc["params"]["mac"] == doc["params"]["dense"]        # MAC's LM
    # MAC's bank: T = 2 slots of D = 16 float32 per document, ceil(128 / 48) = 3 documents of
    # the 128-byte passkey prompt (less its question line: 90 bytes, 2 documents).
    mac = doc["cost"]["mac"]
    assert mac["documents"] == 2 and mac["state_bytes"] == 2 * 2 * 16 * 4
    assert doc["mac_network_params"] > 0
    assert len(set(doc["tokens_seen"].values())) == 1
    # each run's last logged training loss (read from its metrics, so a reused run has one too)
    for name in models:
        loss = doc["final_loss"][name]
        assert np.isfinite(loss) and loss == mb.final_loss(mb.run_dir(name, "quick", 5, out))
    assert (out / "memory_bench.png").stat().st_size > 0
    assert json.loads((out / "memory_bench.json").read_text())["provenance"]["figure"] == \
        "memory_bench"
    lines = (out / "memory_bench.csv").read_text().splitlines()
    assert lines[0] == "probe,model,difficulty,accuracy,exact_match,no_binding"
    assert len(lines) == 1 + 2 * 2


def test_table_reads_result_files(micro_run, tmp_path):
    doc, _ = micro_run
    (tmp_path / "memory_bench-cpu-seed5.json").write_text(json.dumps(doc))
    text = mb.table(tmp_path, "cpu")
    assert "| dense |" in text and "| mac |" in text and "no binding" in text
    # An older file without MAC or streaming QA: shown as absent.
    old = json.loads(json.dumps(doc))
    del old["cost"]["mac"], old["accuracy"]["streamqa"], old["no_binding"]["streamqa"]
    del old["accuracy"]["mqar"]["mac"]
    old["provenance"]["seed"] = 4
    (tmp_path / "memory_bench-cpu-seed4.json").write_text(json.dumps(old))
    text = mb.table(tmp_path, "cpu")
    assert "| mac | 1,648 | — / " in text.replace(f"{doc['params']['mac']:,}", "1,648")
    with pytest.raises(ValueError, match="holds no memory_bench-paper-seed"):
        mb.table(tmp_path, "paper")
