"""Tests of train/data/tokenizer.py's Tokenizer interface (byte, tokenizer.json, SentencePiece),
models/vocab.py's resize_embeddings, and the text pipeline and evaluators with a tokenizer.

The pretrained-tokenizer tests read committed reference fixtures (tests/data/hf/, see its README):
`tok_bpe/` (a byte-level BPE tokenizer.json with transformers' config files) and `tok_sp/` (a
SentencePiece spiece.model with T5Tokenizer's files), each with a reference.json of transformers'
own ids and decodes. They skip only where that folder is absent.
"""
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from eval import landmark_perplexity, passkey, phonebook
from models.vocab import resize_embeddings
from train import config_identity, trainer
from train.configs import lm
from train.data import pipeline, text_corpus
from train.data import tokenizer as tk

KINDS = {"bpe": tk.HFTokenizer, "sp": tk.SentencePieceTokenizer}


def _folder(reference_dir: pathlib.Path, kind: str) -> pathlib.Path:
    folder = reference_dir / "hf" / f"tok_{kind}"
    if not folder.is_dir():
        pytest.skip(f"reference tokenizer fixture {folder} is absent (tests/data/hf/tok_{kind}: "
                    "committed with the pretrained-model references)")
    return folder


def _first(d: dict, *keys, default=None):
    """The first of `keys` present in d (or in its nested "special_ids"/"specials")."""
    for src in (d, d.get("special_ids") or {}, d.get("specials") or {}):
        for k in keys:
            if isinstance(src, dict) and k in src:
                return src[k]
    return default


def _reference(folder: pathlib.Path) -> tuple[dict, list[dict]]:
    """(reference.json, its cases [{text, ids, ids_special, decoded}]): one case per text, as a
    list of dicts or as parallel lists beside "texts"."""
    ref = json.loads((folder / "reference.json").read_text())
    if isinstance(ref, list):
        return {}, ref
    for key in ("cases", "examples", "texts"):
        v = ref.get(key)
        if v and isinstance(v[0], dict):
            return ref, v
    return ref, [{"text": t, **{k: ref[k][i] for k in ("ids", "ids_special", "decoded")
                                if k in ref}} for i, t in enumerate(ref["texts"])]


def _sp_model(folder: pathlib.Path) -> pathlib.Path:
    return next(folder / n for n in ("spiece.model", "tokenizer.model") if (folder / n).is_file())


@pytest.fixture(scope="module", params=sorted(KINDS))
def pretrained(request, reference_dir):
    """(kind, tokenizer, reference, cases): "bpe" loaded from its folder, "sp" from its .model
    file (a folder holding tokenizer.json as well would load that, as AutoTokenizer does); both
    read the folder's transformers config."""
    folder = _folder(reference_dir, request.param)
    ref, cases = _reference(folder)
    spec = str(folder) if request.param == "bpe" else str(_sp_model(folder))
    return request.param, tk.load_tokenizer(spec), ref, cases


# SentencePieceTokenizer encodes text as sentencepiece does: a special token's string inside the
# text (T5Tokenizer cuts out "</s>", "<unk>", "<pad>", "<extra_id_N>" and maps them to their ids)
# stays text. The pipelines insert specials by id, so a document that quotes "</s>" is not cut.
_SP_SPECIAL_STRINGS = ("</s>", "<unk>", "<pad>", "<extra_id_")


def _expected_ids(kind: str, case: dict, key: str = "ids") -> list:
    if kind == "sp" and any(s in case["text"] for s in _SP_SPECIAL_STRINGS):
        return case["package_ids"] + case[key][len(case["ids"]):]
    return case[key]


def test_ids_equal_the_reference_ids(pretrained):
    kind, tok, _, cases = pretrained
    assert isinstance(tok, KINDS[kind]) and cases
    differ = 0
    for case in cases:
        ids = tok.encode(case["text"])
        assert ids.dtype == np.int32
        assert ids.tolist() == _expected_ids(kind, case), case["text"]
        differ += ids.tolist() != case["ids"]
        # transformers' encode(text): the post-processor's BOS / EOS (GPT-2 none, T5 EOS).
        full = tok.encode(case["text"], add_bos=tok.default_add_bos, add_eos=tok.default_add_eos)
        assert full.tolist() == _expected_ids(kind, case, "ids_special"), case["text"]
    assert differ <= (kind == "sp")    # the one text of special-token strings


def test_decode_equals_the_reference_and_round_trips(pretrained):
    kind, tok, _, cases = pretrained
    specials = set(tok.specials.values()) | {tok.special("UNK")} if kind == "sp" else set(
        tok.specials.values())
    for case in cases:
        # transformers' decode(ids): specials written as their strings
        assert tok.decode(case["ids"], skip_special=False) == case["decoded"], case["text"]
        if not specials & set(case["ids"]):
            assert tok.decode(case["ids"]) == case["decoded"], case["text"]
        # EOS dropped by default, kept when asked
        ids = tok.encode(case["text"])
        full = tok.encode(case["text"], add_eos=True)
        assert tok.decode(full) == tok.decode(ids)
        assert tok.decode(full, skip_special=False) != tok.decode(ids)
    if kind == "bpe":   # byte-level BPE loses nothing
        text = "naïve café — 日本語 ✓\n\tx = [i ** 2 for i in range(10)]  "
        assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_vocab_size(pretrained):
    kind, tok, ref, _ = pretrained
    for name, keys in (("BOS", ("bos_token_id", "bos_id", "bos")),
                       ("EOS", ("eos_token_id", "eos_id", "eos")),
                       ("PAD", ("pad_token_id", "pad_id", "pad"))):
        want = _first(ref, *keys, default="missing")
        if want != "missing":
            assert tok.specials.get(name) == want, name
    # len(tokenizer) counts added tokens (the rows an embedding needs); vocab_size may not.
    assert tok.vocab_size == _first(ref, "len", "vocab_size")
    if kind == "bpe":      # GPT-2 style: <|endoftext|> is BOS and EOS, no PAD
        assert tok.bos_id == tok.eos_id and tok.pad_id is None
        assert not tok.default_add_bos and not tok.default_add_eos
    else:                  # T5 style: no BOS, EOS appended by default
        assert tok.bos_id is None and tok.eos_id is not None and tok.pad_id is not None
        assert not tok.default_add_bos and tok.default_add_eos
        with pytest.raises(ValueError, match=r"has no BOS token; allowed: .*\+BOS'$"):
            tok.encode("x", add_bos=True)


def test_add_special_tokens_appends_after_the_vocabulary(pretrained):
    _, tok, _, _ = pretrained
    V = tok.vocab_size
    grown = tok.add_special_tokens(["EOS", "LANDMARK", "PAD", "LANDMARK", "SEP"])
    new = [n for n in ("LANDMARK", "PAD", "SEP") if n not in tok.specials]
    assert grown.vocab_size == V + len(new)
    assert [grown.special(n) for n in new] == list(range(V, V + len(new)))
    assert grown.special("LANDMARK") == V                     # the next id
    assert grown.special("EOS") == tok.special("EOS")         # present ones are skipped
    assert tok.vocab_size == V and "LANDMARK" not in tok.specials   # the original is unchanged
    assert grown.spec == f"{tok.spec}+{','.join(new)}"
    again = tk.load_tokenizer(grown.spec)                     # the config string builds it back
    assert again.vocab_size == grown.vocab_size and again.specials == grown.specials
    # Never produced from text; dropped or written as <NAME> by decode.
    text = "a <LANDMARK> b"
    assert grown.encode(text).tolist() == tok.encode(text).tolist()
    ids = np.concatenate([tok.encode("hello"), [V], tok.encode(" world")])
    assert grown.decode(ids) == tok.decode(np.concatenate([tok.encode("hello"),
                                                           tok.encode(" world")]))
    assert "<LANDMARK>" in grown.decode(ids, skip_special=False)
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        tok.decode([V])
    with pytest.raises(ValueError, match=r"name='LANDMARK' is not in tokenizer"):
        tok.special("LANDMARK")
    with pytest.raises(ValueError, match=r"name='CLS' cannot be added; allowed: PAD, BOS"):
        tok.add_special_tokens(["CLS"])


def test_byte_tokenizer_is_the_module_functions():
    tok = tk.load_tokenizer("byte")
    assert isinstance(tok, tk.ByteTokenizer) and tok.spec == "byte" and tok.name == "byte"
    assert tok.vocab_size == tk.VOCAB_SIZE == 320
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tk.BOS, tk.EOS, tk.PAD)
    assert tok.specials == tk.SPECIALS
    for name in ("SEP", "LANDMARK", "SENTINEL_3", "PARADIGM_15", "RESERVED_0"):
        assert tok.special(name) == tk.special(name)
    for text in ("", "héllo wörld ✓", b"\xff\xfe raw bytes"):
        for bos, eos in ((False, False), (True, False), (True, True)):
            np.testing.assert_array_equal(tok.encode(text, add_bos=bos, add_eos=eos),
                                          tk.encode(text, add_bos=bos, add_eos=eos))
    ids = np.concatenate([[tk.BOS], tk.encode("ab"), [tk.LANDMARK], tk.encode("ç"), [tk.PAD]])
    assert tok.decode(ids) == tk.decode(ids) == "abç"
    assert tok.decode(ids, skip_special=False) == tk.decode(ids, specials="render")
    assert tok.add_special_tokens(["PAD", "LANDMARK"]) is tok       # it has every special
    assert tk.load_tokenizer("byte+LANDMARK").vocab_size == 320


def test_load_tokenizer_dispatch_and_errors(reference_dir, tmp_path):
    bpe, sp = _folder(reference_dir, "bpe"), _folder(reference_dir, "sp")
    assert isinstance(tk.load_tokenizer(str(bpe / "tokenizer.json")), tk.HFTokenizer)
    model = _sp_model(sp)
    assert isinstance(tk.load_tokenizer(str(model)), tk.SentencePieceTokenizer)
    assert isinstance(tk.load_tokenizer(str(sp)), (tk.SentencePieceTokenizer, tk.HFTokenizer))
    alone = tmp_path / "alone.model"                 # a bare .model, no transformers config
    shutil.copy(model, alone)
    bare = tk.load_tokenizer(str(alone))
    assert bare.vocab_size <= tk.load_tokenizer(str(sp)).vocab_size
    assert bare.decode(bare.encode("The sky is blue.")) == "The sky is blue."
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for spec, what in (("nope/nothing", "does not exist"), (str(tmp_path / "empty"),
                                                          "is a folder without one"),
                       (str(tmp_path / "notes.txt"), "is a file of another kind"), ("", "")):
        with pytest.raises(ValueError, match=r"^tokenizer spec=.* is not allowed.*allowed: 'byte'"
                                             ) as e:
            tk.load_tokenizer(spec)
        assert what in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="name='NOPE' cannot be added"):
        tk.load_tokenizer("byte+NOPE")


def test_resize_embeddings_new_rows_are_the_mean():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = resize_embeddings(table, 6)
    assert isinstance(out, np.ndarray) and out.shape == (6, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:4], table)
    np.testing.assert_array_equal(out[4:], np.broadcast_to(table.mean(0), (2, 3)))
    head = resize_embeddings(jnp.asarray(table.T, jnp.bfloat16), 5, axis=1)   # [D, V] head
    assert isinstance(head, jnp.ndarray) and head.shape == (3, 5) and head.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(head[:, 4], np.float32), table.mean(0))
    assert resize_embeddings(table, 4) is table
    with pytest.raises(ValueError, match="new_vocab=3 is not allowed.*>= 4"):
        resize_embeddings(table, 3)


def _text_config(**fields):
    c = pipeline.default_data_config("text")
    c.source, c.shuffle = "memory", False
    c.update(fields)
    return c


@pytest.mark.parametrize("pack", [True, False])
def test_text_pipeline_with_a_pretrained_tokenizer(reference_dir, pack):
    spec = str(_folder(reference_dir, "bpe"))
    tok = tk.load_tokenizer(spec)
    c = _text_config(tokenizer=spec, pack=pack)
    assert pipeline.vocab_size(c) == tok.vocab_size
    T, B = 64, 4
    batch = next(pipeline.make_dataset(c, split="validation", seed=0, global_batch_size=B,
                                       seq_len=T, process_count=1, process_index=0))
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    assert inputs.shape == (B, T) and (inputs < tok.vocab_size).all()
    docs = [tok.encode(r["text"], add_eos=True) for r in text_corpus.documents("validation", 10)]
    if pack:   # unshuffled: the documents' ids, EOS after each, cut into windows of T + 1
        stream = np.concatenate(docs)
        for row in range(B):
            window = stream[row * (T + 1):(row + 1) * (T + 1)]
            np.testing.assert_array_equal(inputs[row], window[:-1])
            np.testing.assert_array_equal(targets[row], window[1:])
        assert weights.all()
    else:      # one document per row, padded with EOS (the tokenizer has no PAD), weight 0
        for row, doc in enumerate(docs[:B]):
            n = min(len(doc), T + 1)
            np.testing.assert_array_equal(inputs[row, :n - 1], doc[:n - 1])
            assert weights[row].sum() == n - 1
            assert (inputs[row, n - 1:][1:] == tok.eos_id).all()


def test_text_pipeline_eos_between_documents(reference_dir):
    """One epoch, packed: the windows hold every document's ids, each followed by EOS, and the
    end of the stream is padded with PAD (a T5-style tokenizer has one) at weight 0."""
    spec = str(_sp_model(_folder(reference_dir, "sp")))
    tok = tk.load_tokenizer(spec)
    T = 512
    it = pipeline.make_dataset(_text_config(tokenizer=spec), split="validation", seed=0,
                               global_batch_size=1, seq_len=T, process_count=1, process_index=0,
                               num_epochs=1)
    batches = list(it)
    docs = [tok.encode(r["text"], add_eos=True) for r in text_corpus.documents("validation", 10)]
    stream = np.concatenate(docs)
    assert (stream == tok.eos_id).sum() == len(docs)          # EOS only between documents
    assert len(batches) == -(-stream.size // (T + 1))
    padded = np.full(len(batches) * (T + 1), tok.pad_id, np.int32)
    padded[:stream.size] = stream
    for r, b in enumerate(batches):
        window = padded[r * (T + 1):(r + 1) * (T + 1)]
        np.testing.assert_array_equal(b["inputs"][0], window[:-1])
        real = np.arange(r * (T + 1) + 1, (r + 1) * (T + 1)) < stream.size
        np.testing.assert_array_equal(b["weights"][0], real.astype(np.float32))


def test_config_check_and_identity_with_a_tokenizer(reference_dir):
    spec = str(_folder(reference_dir, "bpe"))
    V = tk.load_tokenizer(spec).vocab_size
    config = lm.get_config("tiny")
    config.data = _text_config(tokenizer=spec)
    with pytest.raises(ValueError, match=rf"model.vocab_size=320 is not allowed: data.name="
                                         rf"'text' with data.tokenizer='.*' produces token ids up "
                                         rf"to {V - 1}; use >= {V}"):
        trainer.validate_config(config)
    config.model.vocab_size = V
    trainer.validate_config(config)
    # "byte" is what text runs always used: their identity (and stored runs' hashes) unchanged.
    byte = lm.get_config("tiny")
    byte.data = _text_config()
    old = json.loads(byte.to_json_best_effort())
    del old["data"]["tokenizer"]
    assert config_identity.config_hash(byte) == config_identity.config_hash(old)
    assert config_identity.changed_fields(old, config) == ["data.tokenizer", "model.vocab_size"]
    # A tokenizer without EOS cannot join documents.
    with pytest.raises(ValueError, match=r"data.tokenizer=.* has no BOS token.*\+BOS'$"):
        pipeline.vocab_size(_text_config(tokenizer=str(_sp_model(_folder(reference_dir, "sp"))),
                                         add_bos=True))
    with pytest.raises(ValueError, match=r"^data.tokenizer: tokenizer spec='nope' is not allowed"):
        pipeline.vocab_size(_text_config(tokenizer="nope"))


def test_evaluators_take_a_tokenizer(reference_dir):
    tok = tk.load_tokenizer(str(_folder(reference_dir, "bpe")))
    # Passkey: bytes give make_trials' rows; another tokenizer encodes prompt and answer apart.
    tokens, answer = passkey.encode_trials(200, 3, seed=1)
    np.testing.assert_array_equal(tokens, passkey.make_trials(200, 3, seed=1))
    assert (answer.sum(1) == 6).all() and answer[:, 200:].all()
    tokens, answer = passkey.encode_trials(200, 3, seed=1, tokenizer=tok)
    keys = [tok.decode(row[a]) for row, a in zip(tokens, answer)]
    assert all(k.startswith(" ") and k[1:].isdigit() and len(k) == 6 for k in keys)
    onehot = np.eye(tok.vocab_size, dtype=np.float32)
    logits = np.concatenate([onehot[tokens[:, 1:]], onehot[tokens[:, :1]]], axis=1)
    assert passkey.answers_correct(logits, tokens, answer).all()      # the perfect scorer
    logits[0, np.flatnonzero(answer[0])[-1] - 1] = onehot[0]
    np.testing.assert_array_equal(passkey.answers_correct(logits, tokens, answer),
                                  [False, True, True])
    # Perplexity windows: that tokenizer's ids of the held-out prose, EOS-joined.
    w = landmark_perplexity.prose_windows(32, 4, tokenizer=tok)
    assert w.shape == (4, 33) and (w < tok.vocab_size).all()
    # Phone book: prompts encoded and answers decoded by the tokenizer (a generator that
    # answers right scores 1).
    seen = []

    def oracle(prompts, num_new):
        seen.extend(prompts)
        ex = [phonebook.make_example(0, 4, 2, i) for i in range(len(seen) - len(prompts),
                                                                len(seen))]
        return np.stack([np.resize(tok.encode(e.target), num_new) for e in ex])

    out = phonebook.evaluate(None, None, entries=4, queries=2, examples=3, tokenizer=tok,
                             generate_fn=oracle)
    assert out["digit_accuracy"] == 1.0
    assert tok.decode(seen[0]) == phonebook.make_example(0, 4, 2, 0).prompt
