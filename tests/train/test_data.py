"""Tests of train/data: tokenizer, MQAR and corpus TFDS builders, grain pipelines, catalog path."""

import concurrent.futures
import json
import sys

import chex
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from train.data import catalog, mqar, pipeline, text_corpus, tokenizer

SEQ_LEN = 32
TINY_SPEC = mqar.MqarSpec(
    seq_len=SEQ_LEN, num_pairs=4, num_queries=3, num_train=40, num_test=12, seed=7
)


def _mqar_config(source="memory", data_dir=""):
    c = pipeline.default_data_config("mqar")
    c.source = source
    c.data_dir = str(data_dir)
    c.num_pairs, c.num_queries = TINY_SPEC.num_pairs, TINY_SPEC.num_queries
    c.num_train, c.num_test, c.data_seed = TINY_SPEC.num_train, TINY_SPEC.num_test, TINY_SPEC.seed
    return c


def _text_config(source="memory", data_dir="", pack=True):
    c = pipeline.default_data_config("text")
    c.source = source
    c.data_dir = str(data_dir)
    c.pack = pack
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        chex.assert_trees_all_equal(x, y)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def mqar_builder(data_dir):
    return mqar.build(TINY_SPEC, str(data_dir))


@pytest.fixture(scope="module")
def corpus_builder(data_dir):
    return text_corpus.build(validation_percent=10, data_dir=str(data_dir))


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_round_trip_and_specials():
    text = "Grüße, 世界! assert x == 1\n\ttab"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8")) and ids.max() < 256
    assert tokenizer.decode(ids) == text

    wrapped = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert wrapped[0] == tokenizer.BOS and wrapped[-1] == tokenizer.EOS
    assert tokenizer.decode(wrapped) == text  # specials skipped by default
    assert tokenizer.decode(wrapped, specials="render") == f"<BOS>{text}<EOS>"

    assert (tokenizer.PAD, tokenizer.BOS, tokenizer.EOS, tokenizer.SEP, tokenizer.LANDMARK) == (
        256,
        257,
        258,
        259,
        260,
    )
    assert tokenizer.VOCAB_SIZE == 320
    assert tokenizer.special("SENTINEL_0") == 261 == tokenizer.sentinel(0)
    assert tokenizer.special("RESERVED_10") == 319
    ids_all = sorted(tokenizer.SPECIALS.values())
    assert ids_all == list(range(256, 320))  # every special id distinct, no gap
    for name, i in tokenizer.SPECIALS.items():
        assert tokenizer.special_name(i) == name
    with pytest.raises(ValueError, match="NOPE"):
        tokenizer.special("NOPE")
    with pytest.raises(ValueError, match="vocabulary"):
        tokenizer.decode([65, 320])

    batch = tokenizer.encode_batch(["ab", "cde", ""], add_eos=True)
    assert batch.shape == (3, 4) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch[0], [97, 98, tokenizer.EOS, tokenizer.PAD])
    assert tokenizer.decode_batch(batch) == ["ab", "cde", ""]
    assert tokenizer.encode_batch(["abcdef"], length=3).tolist() == [[97, 98, 99]]


# ---------------------------------------------------------------------------------------------
# MQAR.


def _check_mqar_answers(ex, spec):
    inputs, targets, weights = ex["inputs"], ex["targets"], ex["weights"]
    P = spec.num_pairs
    keys, values = inputs[0 : 2 * P : 2], inputs[1 : 2 * P : 2]
    assert len(set(keys.tolist())) == P
    assert np.all((keys >= spec.key_range[0]) & (keys < spec.key_range[1]))
    assert np.all((values >= spec.value_range[0]) & (values < spec.value_range[1]))
    np.testing.assert_array_equal(inputs[1:], targets[:-1])  # next-token targets
    answer_pos = np.flatnonzero(weights)
    assert len(answer_pos) == spec.num_queries and set(np.unique(weights)) == {0.0, 1.0}
    assert np.all(answer_pos >= 2 * P)
    pair_of = dict(zip(keys.tolist(), values.tolist()))
    queried = [int(inputs[t]) for t in answer_pos]
    assert len(set(queried)) == spec.num_queries
    for t in answer_pos:
        assert targets[t] == pair_of[int(inputs[t])]
    # The rest of the query region: each answer's value right after it, fill tokens elsewhere.
    answers, after = set(answer_pos.tolist()), set((answer_pos + 1).tolist())
    for t in range(2 * P, spec.seq_len):
        if t in after:
            assert inputs[t] == pair_of[int(inputs[t - 1])]
        elif t not in answers:
            assert inputs[t] == spec.fill_token


def test_mqar_example_answers_are_the_paired_values():
    for i in range(20):
        _check_mqar_answers(TINY_SPEC.example("train", i), TINY_SPEC)
    ex = mqar.mqar_example(
        np.random.default_rng(0),
        seq_len=16,
        num_pairs=4,
        num_queries=4,
        key_range=(10, 20),
        value_range=(30, 40),
        fill_token=1,
    )
    chex.assert_shape([ex["inputs"], ex["targets"], ex["weights"]], (16,))
    assert ex["inputs"].dtype == np.int32 and ex["weights"].dtype == np.float32
    assert ex["weights"].sum() == 4


def test_mqar_validation_errors():
    with pytest.raises(ValueError, match="disjoint"):
        mqar.MqarSpec(key_range=(1, 100), value_range=(50, 150))
    with pytest.raises(ValueError, match="num_queries"):
        mqar.MqarSpec(num_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match="seq_len"):
        mqar.MqarSpec(seq_len=16, num_pairs=8, num_queries=8)
    with pytest.raises(ValueError, match="fill_token"):
        mqar.MqarSpec(fill_token=5)


def test_mqar_builder_writes_array_record_and_reads_back(mqar_builder, data_dir):
    files = list(data_dir.rglob("mqar-train.array_record*"))
    assert files, "no array_record shard written"
    src = mqar_builder.as_data_source(split="train")
    assert len(src) == TINY_SPEC.num_train
    for i in (0, 13, TINY_SPEC.num_train - 1):
        record = src[i]
        chex.assert_trees_all_equal(
            {k: np.asarray(v) for k, v in record.items()}, TINY_SPEC.example("train", i)
        )
        _check_mqar_answers(record, TINY_SPEC)
    # The same build through the public TFDS reader.
    by_name = tfds.data_source(
        f"mqar/{TINY_SPEC.config_name}", split="test", data_dir=str(data_dir), download=False
    )
    assert len(by_name) == TINY_SPEC.num_test
    chex.assert_trees_all_equal(dict(by_name[3]), TINY_SPEC.example("test", 3))
    assert "tensorflow" not in sys.modules


def test_mqar_deterministic_per_seed():
    a = [TINY_SPEC.example("train", i) for i in range(5)]
    again = [mqar.MqarSpec(**TINY_SPEC.__dict__).example("train", i) for i in range(5)]
    _assert_batches_equal(a, again)
    other = mqar.MqarSpec(**{**TINY_SPEC.__dict__, "seed": 8})
    assert not np.array_equal(a[0]["inputs"], other.example("train", 0)["inputs"])
    # train and test are different streams.
    assert not np.array_equal(a[0]["inputs"], TINY_SPEC.example("test", 0)["inputs"])


# ---------------------------------------------------------------------------------------------
# Text corpus.


def test_corpus_builder_holds_real_prose(corpus_builder):
    train = corpus_builder.as_data_source(split="train")
    valid = corpus_builder.as_data_source(split="validation")
    assert len(train) > 50 and len(valid) >= 3
    train_ids = {train[i]["id"] for i in range(len(train))}
    valid_ids = {valid[i]["id"] for i in range(len(valid))}
    assert not train_ids & valid_ids
    for doc_id in valid_ids:
        assert text_corpus.split_of(doc_id.decode(), 10) == "validation"
    texts = [train[i]["text"] for i in range(len(train))] + [
        valid[i]["text"] for i in range(len(valid))
    ]
    joined = b"\n".join(texts)
    assert len(joined) > 300_000
    # Real English sentences from the Language Reference and stdlib docstrings.
    assert b"Assert statements are a convenient way to insert debugging assertions" in joined
    assert b"JSON" in joined and b" the " in joined
    # In-memory documents are the same records in the same order.
    mem = text_corpus.documents("validation", 10)
    assert [r["id"] for r in mem] == [valid[i]["id"] for i in range(len(valid))]


# ---------------------------------------------------------------------------------------------
# Pipelines.


@pytest.mark.parametrize("pack", [True, False])
def test_text_pipeline_shapes_and_shifted_targets(corpus_builder, data_dir, pack):
    del corpus_builder  # built once by the fixture; make_dataset reuses it
    c = _text_config("tfds", data_dir, pack=pack)
    it = pipeline.make_dataset(c, split="train", seed=3, global_batch_size=4, seq_len=SEQ_LEN)
    for batch in _take(it, 3):
        assert set(batch) == {"inputs", "targets", "weights"}
        chex.assert_shape([batch["inputs"], batch["targets"], batch["weights"]], (4, SEQ_LEN))
        assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
        assert batch["weights"].dtype == np.float32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        np.testing.assert_array_equal(batch["weights"], batch["targets"] != tokenizer.PAD)
        assert batch["inputs"].max() < tokenizer.VOCAB_SIZE
    if pack:  # full windows of real text
        assert batch["weights"].all()
        assert " " in tokenizer.decode(batch["inputs"][0])
    else:  # each row starts a document; short ones are padded
        c.shuffle = False
        docs = [
            tokenizer.encode(r["text"], add_eos=True)
            for r in text_corpus.documents("validation", 10)
        ]
        T = min(len(d) for d in docs) + 3  # the shortest document gets padded, the others cut
        rows = next(
            pipeline.make_dataset(
                c, split="validation", seed=0, num_epochs=1, global_batch_size=len(docs), seq_len=T
            )
        )
        for doc, inputs, targets, weights in zip(
            docs, *(rows[k] for k in ("inputs", "targets", "weights"))
        ):
            n = min(len(doc), T + 1)  # tokens of this document in the window
            np.testing.assert_array_equal(inputs[: n - 1], doc[: n - 1])
            np.testing.assert_array_equal(targets[: n - 1], doc[1:n])
            assert weights.sum() == n - 1 and np.all(targets[n - 1 :] == tokenizer.PAD)
        assert (rows["weights"] == 0).any()  # some padding was exercised


def test_packing_keeps_every_token_once():
    c = _text_config()
    windows = list(
        pipeline.make_dataset(
            c, split="validation", seed=2, global_batch_size=1, seq_len=SEQ_LEN, num_epochs=1
        )
    )
    # Window i is inputs plus the last target (T + 1 tokens); windows do not overlap.
    stream = np.concatenate([np.append(w["inputs"][0], w["targets"][0, -1]) for w in windows])
    for w in windows[:-1]:
        assert w["weights"].all()  # only the end of the finite stream is padded
    last = windows[-1]
    np.testing.assert_array_equal(last["weights"][0], last["targets"][0] != tokenizer.PAD)
    assert stream[-1] == tokenizer.PAD or last["weights"].all()
    stream = stream[stream != tokenizer.PAD]
    assert stream[-1] == tokenizer.EOS
    docs = text_corpus.documents("validation", 10)
    n_tokens = sum(len(d["text"]) + 1 for d in docs)
    assert len(stream) == n_tokens
    # Split at EOS: the documents, each exactly once, in a shuffled order.
    ends = np.flatnonzero(stream == tokenizer.EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    pieces = [stream[a:b].astype(np.uint8).tobytes() for a, b in zip(starts, ends)]
    assert sorted(pieces) == sorted(d["text"] for d in docs)
    assert pieces != [d["text"] for d in docs]


def test_mqar_pipeline_tfds_and_memory_agree(mqar_builder, data_dir):
    del mqar_builder
    kw = {"split": "train", "seed": 5, "global_batch_size": 4, "seq_len": SEQ_LEN}
    from_tfds = _take(pipeline.make_dataset(_mqar_config("tfds", data_dir), **kw), 4)
    from_mem = _take(pipeline.make_dataset(_mqar_config("memory"), **kw), 4)
    _assert_batches_equal(from_tfds, from_mem)
    for batch in from_mem:
        for row in range(4):
            _check_mqar_answers({k: v[row] for k, v in batch.items()}, TINY_SPEC)


def test_pipeline_deterministic_and_epoch_covers_split():
    kw = {"split": "test", "global_batch_size": 4, "seq_len": SEQ_LEN}
    c = _mqar_config()
    a = list(pipeline.make_dataset(c, seed=1, num_epochs=1, **kw))
    b = list(pipeline.make_dataset(c, seed=1, num_epochs=1, **kw))
    _assert_batches_equal(a, b)
    assert len(a) == TINY_SPEC.num_test // 4  # one epoch, 12 examples
    rows = {r.tobytes() for batch in a for r in batch["inputs"]}
    expected = {TINY_SPEC.example("test", i)["inputs"].tobytes() for i in range(TINY_SPEC.num_test)}
    assert rows == expected
    other = list(pipeline.make_dataset(c, seed=2, num_epochs=1, **kw))
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, other))
    # Epochs are reshuffled.
    two = list(pipeline.make_dataset(c, seed=1, num_epochs=2, **kw))
    assert len(two) == 2 * len(a)
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(two[:3], two[3:]))


@pytest.mark.parametrize("name", ["mqar", "text"])
def test_iterator_state_restore_continues_identically(name):
    c = _mqar_config() if name == "mqar" else _text_config()
    kw = {"split": "train", "seed": 11, "global_batch_size": 2, "seq_len": SEQ_LEN}
    it = pipeline.make_dataset(c, **kw)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = _take(it, 6)
    fresh = pipeline.make_dataset(c, **kw)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 6), expected)


def test_iterator_checkpoint_with_orbax(tmp_path):
    c = _text_config()
    kw = {"split": "train", "seed": 4, "global_batch_size": 2, "seq_len": SEQ_LEN}
    it = pipeline.make_dataset(c, **kw)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = _take(it, 4)
    fresh = pipeline.make_dataset(c, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        restored = manager.restore(
            3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
        )
    assert restored.data is fresh
    _assert_batches_equal(_take(fresh, 4), expected)


def test_row_sharding_rebuilds_the_single_process_batches():
    c = _mqar_config()
    assert c.shard_mode == "rows"
    kw = {"split": "train", "seed": 9, "global_batch_size": 4, "seq_len": SEQ_LEN}
    single = pipeline.make_dataset(c, process_index=0, process_count=1, **kw)
    parts = [pipeline.make_dataset(c, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for _ in range(3):
        whole = next(single)
        halves = [next(it) for it in parts]
        for key in whole:
            np.testing.assert_array_equal(
                np.concatenate([h[key] for h in halves]), whole[key])


def test_process_shards_are_disjoint():
    c = _mqar_config()
    c.shard_mode = "records"
    kw = {"split": "train", "seed": 9, "global_batch_size": 4, "seq_len": SEQ_LEN, "num_epochs": 1}
    shards = [
        list(pipeline.make_dataset(c, process_index=p, process_count=2, **kw)) for p in (0, 1)
    ]
    rows = []
    for batches in shards:
        assert all(b["inputs"].shape == (2, SEQ_LEN) for b in batches)  # 4 // 2 rows each
        rows.append({r.tobytes() for b in batches for r in b["inputs"]})
    assert len(rows[0]) == len(rows[1]) == TINY_SPEC.num_train // 2
    assert not rows[0] & rows[1]
    # Text: each process reads its own documents.
    t = _text_config(pack=False)
    t.shuffle = False
    t.shard_mode = "records"
    firsts = [
        next(
            pipeline.make_dataset(
                t,
                split="train",
                seed=0,
                global_batch_size=2,
                seq_len=SEQ_LEN,
                process_index=p,
                process_count=2,
            )
        )["inputs"]
        for p in (0, 1)
    ]
    docs = text_corpus.documents("train", 10)
    assert tokenizer.decode(firsts[0][0]) == docs[0]["text"][:SEQ_LEN].decode(errors="replace")
    assert tokenizer.decode(firsts[1][0]) == docs[1]["text"][:SEQ_LEN].decode(errors="replace")


def test_bad_configs_raise():
    c = _mqar_config()
    kw = {"split": "train", "seed": 0, "seq_len": SEQ_LEN}
    with pytest.raises(ValueError, match="global_batch_size=3"):
        pipeline.make_dataset(c, global_batch_size=3, process_index=0, process_count=2, **kw)
    with pytest.raises(ValueError, match="name='nope'"):
        pipeline.default_data_config("nope")
    c.name = "nope"
    with pytest.raises(ValueError, match="name='nope'"):
        pipeline.make_dataset(c, global_batch_size=2, **kw)
    c = _mqar_config()
    with pytest.raises(ValueError, match="split='validation'"):
        pipeline.make_dataset(c, global_batch_size=2, **{**kw, "split": "validation"})
    c.source = "web"
    with pytest.raises(ValueError, match="source='web'"):
        pipeline.make_dataset(c, global_batch_size=2, **kw)


def test_catalog_path_with_mock_data():
    c = pipeline.default_data_config("tfds")  # pg19, feature "book_text"
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = catalog.catalog_data_source("pg19", split="train")
        assert len(source) == 6
        it = pipeline.make_dataset(c, split="train", seed=0, global_batch_size=2, seq_len=16)
        batches = _take(it, 3)
        state = it.get_state()
        expected = _take(it, 2)
        fresh = pipeline.make_dataset(c, split="train", seed=0, global_batch_size=2, seq_len=16)
        fresh.set_state(state)
        _assert_batches_equal(_take(fresh, 2), expected)
    texts = [catalog.TextFieldSource(source, "book_text")[i]["text"] for i in range(6)]
    for batch in batches:
        chex.assert_shape(batch["inputs"], (2, 16))
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        for row in batch["inputs"]:
            # Windows are cut from the (shuffled, EOS-joined) mocked books.
            pieces = (
                np.where(row == tokenizer.EOS, 0, row).astype(np.uint8).tobytes().split(b"\x00")
            )
            for piece in pieces:
                assert any(piece in t for t in texts)
    # Mocked books are ~20 bytes, so 16-token windows must cross document boundaries.
    assert any((b["inputs"] == tokenizer.EOS).any() for b in batches)
    with pytest.raises(ValueError, match="text_key='missing'"):
        catalog.TextFieldSource(source, "missing")[0]


def test_to_global_array_places_batch_on_mesh():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = next(
        pipeline.make_dataset(
            _mqar_config(), split="train", seed=0, global_batch_size=8, seq_len=SEQ_LEN
        )
    )
    arrays = pipeline.to_global_array(batch, mesh)
    for key, value in arrays.items():
        assert value.shape == (8, SEQ_LEN) and value.dtype == batch[key].dtype
        assert value.sharding.spec == jax.sharding.PartitionSpec(("data",))
        np.testing.assert_array_equal(np.asarray(value), batch[key])
        assert value.addressable_shards[0].data.shape == (2, SEQ_LEN)


def test_partial_config_is_completed_and_typos_rejected():
    partial = ml_collections.ConfigDict({"name": "mqar", "source": "memory", "num_train": 40})
    full = pipeline.resolve_data_config(partial)
    assert full.num_train == 40 and full.num_pairs == pipeline.default_data_config("mqar").num_pairs
    batch = next(
        pipeline.make_dataset(partial, split="train", seed=0, global_batch_size=2, seq_len=SEQ_LEN)
    )
    chex.assert_shape(batch["inputs"], (2, SEQ_LEN))
    with pytest.raises(ValueError, match="num_pair"):
        pipeline.resolve_data_config({"name": "mqar", "num_pair": 3})
    with pytest.raises(ValueError, match="'pack'"):
        pipeline.resolve_data_config({"name": "mqar", "pack": False})  # a text field


def test_vocab_size():
    assert pipeline.vocab_size(pipeline.default_data_config("text")) == 320
    c = pipeline.default_data_config("mqar")
    assert pipeline.vocab_size(c) == 320
    c.key_range, c.value_range = (1, 4096), (4096, 8192)
    assert pipeline.vocab_size(c) == 8192


def test_worker_processes_give_the_same_batches():
    c = _mqar_config()
    kw = {"split": "train", "seed": 6, "global_batch_size": 2, "seq_len": SEQ_LEN}
    expected = _take(pipeline.make_dataset(c, **kw), 5)
    c.worker_count = 1
    it = pipeline.make_dataset(c, **kw)
    try:
        _assert_batches_equal(_take(it, 5), expected)
    finally:
        it.close()


def test_concurrent_builds_share_one_build(tmp_path, monkeypatch):
    # Default data_dir comes from $MNEMAX_DATA_DIR.
    monkeypatch.setenv(catalog.DATA_DIR_ENV, str(tmp_path))
    assert catalog.default_data_dir() == str(tmp_path)
    spec = mqar.MqarSpec(seq_len=16, num_pairs=2, num_queries=2, num_train=8, num_test=4)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        builders = list(pool.map(lambda _: mqar.build(spec), range(3)))
    for b in builders:
        assert len(b.as_data_source(split="train")) == 8
    assert len(list(tmp_path.rglob("mqar-train.array_record*"))) == 1


def test_local_text_corpus_is_built_from_a_folder_and_feeds_the_text_pipeline(tmp_path):
    """data.text_dir: a folder of .tex / .txt files (the arXiv-math set's form) as the "text"
    dataset: one document per file, split by hash of its path, built once per content digest;
    other files and empty ones left out; the landmark `paper,text_dir=` variant uses it."""
    corpus = tmp_path / "arxiv"
    (corpus / "math").mkdir(parents=True)
    texts = {f"math/p{i:02d}.tex": f"\\section{{Lemma {i}}} Let $x_{i} > 0$. " * 8
             for i in range(12)}
    texts["notes.txt"] = "A plain text note about primes. " * 8
    for name, text in texts.items():
        (corpus / name).write_text(text)
    (corpus / "paper.pdf").write_bytes(b"%PDF-1.5 binary")
    (corpus / "empty.tex").write_text("  \n")
    docs = text_corpus.local_documents(str(corpus))
    assert [i for i, _ in docs] == sorted(texts)
    data_dir = str(tmp_path / "tfds")
    sources = {split: text_corpus.local_data_source(split, str(corpus), validation_percent=25,
                                                    data_dir=data_dir)
               for split in text_corpus.SPLITS}
    ids = {split: [src[i]["id"].decode() for i in range(len(src))]
           for split, src in sources.items()}
    assert sorted(ids["train"] + ids["validation"]) == sorted(texts)
    assert ids["train"] and ids["validation"]
    assert all(text_corpus.split_of(i, 25) == "validation" for i in ids["validation"])
    c = pipeline.default_data_config("text")
    c.text_dir, c.validation_percent, c.data_dir = str(corpus), 25, data_dir
    batch = next(iter(pipeline.make_dataset(c, split="train", seed=0, global_batch_size=2,
                                            seq_len=32)))
    row = tokenizer.decode(batch["inputs"][0])
    assert any(row[:16] in t for t in texts.values()), row
    before = text_corpus.local_digest(str(corpus))
    (corpus / "notes.txt").write_text("Changed.")
    assert text_corpus.local_digest(str(corpus)) != before      # a new build, not a stale one
    with pytest.raises(ValueError, match=r"data.text_dir='.*nowhere' is not a folder"):
        text_corpus.local_documents(str(tmp_path / "nowhere"))
    from train import trainer
    from train.configs import landmark
    cfg = landmark.get_config(f"paper,text_dir={corpus}")
    assert (cfg.data.name, cfg.data.text_dir, cfg.data.windows) == ("text", str(corpus), "random")
    trainer.validate_config(cfg)
