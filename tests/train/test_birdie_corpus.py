"""train/data/birdie_data.py: Birdie's pre-training text without the task, and its rows under a
pretrained tokenizer (ids mapped around Birdie's specials)."""
import numpy as np
import pytest

from train.configs import birdie as birdie_config
from train.data import birdie_data as bd
from train.data import pipeline
from train.data import tokenizer as tok

BPE = "tests/data/hf/tok_bpe"


def _rows(spec, n=4, split="validation"):
    src = bd.BirdieSource(spec, split)
    return [src[i] for i in range(n)]


@pytest.mark.parametrize("corpus", ["text", "local_text"])
def test_pretraining_text_holds_no_phone_book(corpus, tmp_path, repo_root):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"d{i}.txt").write_text(f"Document {i}. " + "Plain prose, no lookup. " * 20)
    spec = bd.BirdieDataSpec(seq_len=256, corpus=corpus, num_validation=8, validation_percent=50,
                             text_dir=str(docs) if corpus == "local_text" else "",
                             data_dir=str(tmp_path / "tfds"))
    K = len(bd.objective_set("birdie"))
    for r in _rows(spec):
        text = tok.decode(r["inputs"][r["segment_ids"] > 0])
        assert "Phonebook" not in text and " : " not in text
        assert (r["objective_ids"] < K).all()            # the task (id K) is never drawn
        if corpus == "local_text":
            assert "Plain prose" in text
    # the configs: tiny pre-trains on the prose, the paper on a TFDS corpus, neither on the task
    for size in ("tiny", "paper"):
        c = birdie_config.get_config(f"{size}:gated_birdie").data
        assert c.corpus == ("text" if size == "tiny" else "tfds") and c.task_weight == 0.0
    with pytest.raises(ValueError, match="corpus='tfds' needs tfds_name"):
        bd.BirdieSource(bd.BirdieDataSpec(corpus="tfds", objectives="ntp"), "train")[0]


def test_rows_under_a_pretrained_tokenizer_keep_birdies_specials():
    t = tok.load_tokenizer(BPE)
    ids = np.arange(t.vocab_size, dtype=np.int32)
    mapped = bd.to_birdie_ids(ids)
    assert not np.isin(mapped, np.arange(tok.NUM_BYTES, tok.VOCAB_SIZE)).any()
    np.testing.assert_array_equal(bd.from_birdie_ids(mapped), ids)
    assert bd.vocab_size(BPE) == t.vocab_size + 64 == mapped.max() + 1
    c = birdie_config.get_config("tiny:gated_ntp").data
    c.tokenizer = BPE
    assert pipeline.vocab_size(c) == t.vocab_size + 64
    spec = bd.BirdieDataSpec(seq_len=256, objectives="ntp", tokenizer=BPE, task_weight=0.5,
                             phonebook_entries=(2, 2), num_validation=4)
    for r in _rows(spec):
        x = r["inputs"][r["segment_ids"] > 0]
        text_ids = x[(x < tok.NUM_BYTES) | (x >= tok.VOCAB_SIZE)]
        assert text_ids.size and x.max() < bd.vocab_size(BPE)
        # the text decodes with the tokenizer once mapped back; specials are Birdie's own
        assert t.decode(bd.from_birdie_ids(text_ids)).strip()
        assert np.isin(x[(x >= tok.NUM_BYTES) & (x < tok.VOCAB_SIZE)],
                       [tok.EOS, tok.PAD, *bd.birdie.BIRDIE_TOKENS.values()]).all()
