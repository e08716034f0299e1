"""Every size of every figure is validated before training: `validate_size` in each module."""
import dataclasses
import importlib

import pytest

from eval import figures

SIZES = figures.SIZES


def _figure_modules() -> list[str]:
    """The project's modules that register figures (read from the registry, so a new one is
    included; figures that other tests register, e.g. tests/eval/test_figures.py's dummy, are
    not the project's)."""
    return sorted({fn.__module__ for fn in figures.load_all().values()
                   if fn.__module__ in figures.FIGURE_MODULES})


def test_every_figure_module_has_validate_size():
    mods = _figure_modules()
    assert {"eval.lm_mqar", "eval.passkey", "eval.landmark_perplexity", "eval.birdie_recall",
            "eval.class_incremental", "eval.streaming_qa"} <= set(mods)
    for m in mods:
        assert callable(getattr(importlib.import_module(m), "validate_size", None)), m


@pytest.mark.parametrize("size", SIZES)
def test_every_size_of_every_figure_validates(size):
    for m in _figure_modules():
        importlib.import_module(m).validate_size(size)


@pytest.mark.parametrize("name", sorted(n for n, fn in figures.load_all().items()
                                         if fn.__module__ in figures.FIGURE_MODULES))
def test_figures_reject_an_unknown_size_before_any_work(name, tmp_path):
    # validate_size runs first: an unknown size is a ValueError, not a KeyError mid-run.
    with pytest.raises(ValueError, match="size='huge' is not allowed"):
        figures.load_all()[name](size="huge", seed=0, out=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_lm_mqar_rejects_more_pairs_than_seq_len_holds(monkeypatch):
    from eval import lm_mqar
    from train.configs import lm as lm_configs
    # Keys and values from ranges wide enough for 40 pairs: only the sequence is too short.
    monkeypatch.setitem(lm_configs.MQAR_SIZES, "quick",
                        dict(lm_configs.MQAR_SIZES["quick"], num_pairs=40, seq_len=64,
                             key_range=(1, 128), value_range=(128, 256)))
    with pytest.raises(ValueError, match="seq_len=64 is too short for num_pairs=40"):
        lm_mqar.validate_size("quick")


def test_passkey_rejects_eval_lengths_below_a_prompt(monkeypatch):
    from eval import passkey
    from train.configs import landmark as landmark_configs
    sizes = landmark_configs.PASSKEY_SIZES
    monkeypatch.setitem(sizes, "quick", dict(sizes["quick"], lengths=(8, 256)))
    with pytest.raises(ValueError, match=r"lengths=\(8, 256\) is not allowed"):
        passkey.validate_size("quick")
    # A size that trains its own run (quick evaluates the shipped cpu run).
    monkeypatch.setitem(sizes, "cpu", dict(sizes["cpu"], phases=((150, None), (100, 128))))
    with pytest.raises(ValueError, match="phases=.* increasing"):
        passkey.validate_size("cpu")


def test_landmark_perplexity_rejects_more_windows_than_the_prose_holds(monkeypatch):
    from eval import landmark_perplexity as lp
    from train.configs import landmark as landmark_configs
    sizes = landmark_configs.PERPLEXITY_SIZES
    monkeypatch.setitem(sizes, "quick", dict(sizes["quick"], windows=10**6))
    with pytest.raises(ValueError, match="tokens of validation prose needed"):
        lp.validate_size("quick")


def test_birdie_recall_rejects_pairs_beyond_the_key_range(monkeypatch):
    from eval import birdie_recall as br
    from train.configs import birdie as birdie_config
    monkeypatch.setitem(birdie_config.RECALL_SIZES, "quick",
                        dict(birdie_config.RECALL_SIZES["quick"], pairs=(2, 4, 9)))
    with pytest.raises(ValueError,
                       match=r"RECALL_SIZES\['quick'\].pairs=\(2, 4, 9\).*num_pairs=9"):
        br.validate_size("quick")


def test_phonebook_rejects_examples_longer_than_rows(monkeypatch):
    from eval import birdie_recall as br
    from train.configs import birdie as birdie_config
    from train.data import phonebook as pb
    s = birdie_config.PHONEBOOK_SIZES["cpu"]
    longest = pb.max_example_length(21, max(s["queries"]))     # the largest book, train or eval
    monkeypatch.setitem(birdie_config.PHONEBOOK_SIZES, "cpu", dict(s, row_length=longest - 1))
    with pytest.raises(ValueError, match=f"row_length={longest - 1} is not allowed.*{longest}"):
        br.validate_size("cpu")
    monkeypatch.setitem(birdie_config.PHONEBOOK_SIZES, "cpu", dict(s, row_length=longest))
    br.validate_size("cpu")
    monkeypatch.setitem(birdie_config.PHONEBOOK_SIZES, "cpu", dict(s, queries=(1, 8)))
    with pytest.raises(ValueError, match=r"queries=\(1, 8\) is not allowed; use 1..entries=5"):
        br.validate_size("cpu")


def test_phonebook_paper_protocol():
    # the paper's: the pre-trained 1.4B model, then 1,000 steps of 64 × 16k tokens at lr 5e-5 on
    # books of 200–800 entries; evaluated on 1,024 books of 750–800 entries, 1–32 numbers asked
    from train.configs import birdie as birdie_config
    s = birdie_config.PHONEBOOK_SIZES["paper"]
    assert (s["entries"], s["queries"], s["eval_examples"]) == ((750, 800),
                                                               (1, 2, 4, 8, 16, 32), 1024)
    with pytest.raises(ValueError, match="tokenizer is None"):
        birdie_config.phonebook_phases("paper", "gated_birdie", 0)
    pre, tune = birdie_config.phonebook_phases("paper", "gated_birdie", 0, tokenizer="TOK",
                                               tfds_name="pile")
    paper = birdie_config.get_config("paper:gated_birdie")
    assert (pre.model, pre.num_steps, pre.batch_size, pre.seq_len, pre.data.corpus,
            pre.data.task_weight) == (paper.model, 50_000, 256, 2048, "tfds", 0.0)
    assert (tune.num_steps, tune.batch_size, tune.seq_len, tune.optim.lr, tune.data.task_weight,
            tune.data.phonebook_entries, tune.data.phonebook_queries, tune.data.tokenizer) == (
        1000, 64, 16384, 5e-5, 1.0, (200, 800), (1, 32), "TOK")
    assert "hooks" in pre and "hooks" not in tune


def test_class_incremental_rejects_a_bad_codebook(monkeypatch):
    from eval import class_incremental as ci
    dcfg, *rest = ci.TOY_SIZES["quick"]
    monkeypatch.setitem(ci.TOY_SIZES, "quick", (dataclasses.replace(dcfg, num_keys=0), *rest))
    with pytest.raises(ValueError, match=r"TOY_SIZES\['quick'\].num_keys=0 is not allowed"):
        ci.validate_size("quick")
    monkeypatch.setitem(ci.TOY_SIZES, "quick", (dcfg, 0, *rest[1:]))
    with pytest.raises(ValueError, match="epochs_per_task=0 is not allowed"):
        ci.validate_size("quick")


def test_streaming_qa_rejects_a_short_document_length(monkeypatch):
    from eval import streaming_qa as sqa
    from train.configs import mac as mac_configs
    real = mac_configs.get_config

    def short_docs(arg):
        c = real(arg)
        c.data.doc_length = 64
        return c
    monkeypatch.setattr(mac_configs, "get_config", short_docs)
    with pytest.raises(ValueError, match="data.doc_length=64 is not allowed.*needs >= "):
        sqa.validate_size("quick")

    def big_windows(arg):
        c = real(arg)
        c.objective_config.hierarchical_windows = (4, c.batch_size)
        return c
    monkeypatch.setattr(mac_configs, "get_config", big_windows)
    with pytest.raises(ValueError, match="hierarchical_windows=.* is not allowed"):
        sqa.validate_size("quick")
