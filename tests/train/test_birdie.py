"""train/objectives/birdie.py and birdie_controller.py: objective invariants, packing, reward,
the controller."""
import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.data import tokenizer as tok
from train.objectives import birdie as b
from train.objectives import birdie_controller as bc

KEYS = range(6)
SG = b.START_GENERATING


def _unique_text(n=200, seed=0):
    """n ≤ 256 distinct byte tokens, so a window of them is located by its first token."""
    return np.random.default_rng(seed).permutation(256)[:n].astype(np.int32)


def _is_window(part, text):
    if part.size == 0:
        return True
    where = np.flatnonzero(text == part[0])
    return where.size == 1 and np.array_equal(text[where[0]: where[0] + part.size], part)


def _check_layout(ex: b.Example, paradigm=None):
    L = ex.inputs.size
    assert ex.labels.shape == ex.prefix.shape == (L,)
    p = int(ex.prefix.sum())
    assert ex.prefix[:p].all() and not ex.prefix[p:].any(), "prefix must be the leading run"
    assert (ex.labels[:p] == b.IGNORE).all() and (ex.labels[p:] != b.IGNORE).all()
    assert ex.inputs[p] == SG
    # labels equal the next input inside the label region
    np.testing.assert_array_equal(ex.labels[p:-1], ex.inputs[p + 1:])
    if paradigm is not None:
        assert ex.inputs[0] == paradigm


# ------------------------------------------------------------------------------------------
# Reward
# ------------------------------------------------------------------------------------------
def test_reward_matches_the_paper_checks():
    assert b.reward(4.5, 4.2) == pytest.approx(0.95180, abs=5e-6)
    assert b.reward(0.6, 0.5207) == pytest.approx(0.95350, abs=5e-6)
    assert b.reward(2, 2) == 0.0
    assert b.reward(2.0, 3.0) == -1.0 and b.reward(3.0, 1.0) == 1.0   # clipped
    olds, news = np.array([4.5, 0.6, 2.0, 1.0]), np.array([4.2, 0.5207, 2.0, 1.01])
    np.testing.assert_allclose(b.reward_jnp(olds, news), [b.reward(o, n) for o, n in
                                                          zip(olds, news)], atol=1e-5)
    with pytest.raises(ValueError, match="old_loss"):
        b.reward(0.0, 1.0)


# ------------------------------------------------------------------------------------------
# Objectives
# ------------------------------------------------------------------------------------------
def test_token_table_fits_the_tokenizer():
    ids = list(b.BIRDIE_TOKENS.values())
    assert len(set(ids)) == len(ids)
    for name, i in b.BIRDIE_TOKENS.items():
        assert tok.NUM_BYTES <= i < tok.VOCAB_SIZE, name
        assert i not in (tok.PAD, tok.BOS, tok.LANDMARK) and i not in b.SENTINELS, name


def test_make_example_layout():
    ex = b.make_example([7, 1, 2], [5, 6, 9])
    np.testing.assert_array_equal(ex.inputs, [7, 1, 2, SG, 5, 6])
    np.testing.assert_array_equal(ex.labels, [-1, -1, -1, 5, 6, 9])
    np.testing.assert_array_equal(ex.prefix, [1, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="target"):
        b.make_example([1], [])


# (settings, objective, max_length): the paper's selective copying (spans up to 32, delimiters up
# to 8, 4 spans) needs 212 tokens in the worst case, so its budget is larger
ALL = ([("compact", o, 180) for o in b.birdie_objectives(settings=b.COMPACT_SETTINGS)
        + b.ul2_objectives(settings=b.COMPACT_SETTINGS) + b.ntp_objectives()]
       + [("paper", o, 230) for o in b.birdie_objectives() + b.ul2_objectives()])


PARADIGMS = {b.BIRDIE_TOKENS[n] for n in ("NTP", "PREFIX_LM", "INFILLING", "AUTOENCODING",
                                          "AUTOENCODING_DESHUFFLING", "DESHUFFLING", "COPYING",
                                          "SELECTIVE_COPYING", "UL2_R", "UL2_X", "UL2_S")}


def _is_paradigm(t):
    return int(t) in PARADIGMS


@pytest.mark.parametrize("setting, obj, max_length", ALL,
                         ids=[f"{s}-{o.name}" for s, o, _ in ALL])
def test_every_objective_is_pure_fits_and_is_laid_out(setting, obj, max_length):
    text = _unique_text(240)
    for k in KEYS:
        ex = obj(text, jax.random.key(k), max_length=max_length)
        again = obj(text, jax.random.key(k), max_length=max_length)
        for x, y in zip(ex, again):
            np.testing.assert_array_equal(x, y)
        assert ex.inputs.size <= max_length
        _check_layout(ex)
        p = int(ex.prefix.sum())
        if obj.name == "plain_ntp":
            assert p == 0 and ex.inputs[0] == SG
        elif setting == "compact":
            assert _is_paradigm(ex.inputs[0])
        elif p == 1:   # next-token prediction: the paradigm token is the whole prompt
            assert _is_paradigm(ex.inputs[0])
        else:   # the paradigm token first or last (just before [SG]), not both
            assert _is_paradigm(ex.inputs[0]) != _is_paradigm(ex.inputs[p - 1])
    outs = {obj(text, k, max_length=max_length).inputs.tobytes() for k in KEYS}
    assert len(outs) > 1, "different keys must give different examples"


def _splice(prompt, target):
    """Replaces each sentinel of the prompt by the target's span after that sentinel."""
    spans, cur = [], None
    for t in target:
        if t in b.SENTINELS:
            cur = []
            spans.append((t, cur))
        else:
            cur.append(t)
    out, i = [], 0
    for t in prompt:
        if t in b.SENTINELS:
            assert spans[i][0] == t
            out.extend(spans[i][1])
            i += 1
        else:
            out.append(t)
    assert i == len(spans)
    return np.asarray(out, np.int32)


@pytest.mark.parametrize("rate, span", [(0.05, 3), (0.15, 8), (0.5, 3), (0.5, 32)])
def test_infilling_targets_splice_back_into_the_original(rate, span):
    text = _unique_text(256)
    for k in KEYS:
        ex = b.infilling(text, k, corruption_rate=rate, mean_span=span)
        _check_layout(ex, b.BIRDIE_TOKENS["INFILLING"])
        prompt, target = b.split_example(ex)
        np.testing.assert_array_equal(_splice(prompt[1:], target), text)
        n_noise = sum(t not in b.SENTINELS for t in target)
        assert n_noise == int(round(256 * rate))
        # fitted to a budget and cut to a length bin: a window of the original
        ex = b.infilling(text, k, corruption_rate=rate, mean_span=span, max_length=100,
                         length_bins=(64, 128))
        assert ex.inputs.size <= 100
        prompt, target = b.split_example(ex)
        spliced = _splice(prompt[1:], target)
        assert spliced.size <= 128 and _is_window(spliced, text)


@pytest.mark.parametrize("deshuffle", [False, True])
def test_autoencoding_target_equals_the_original(deshuffle):
    text = _unique_text(200)
    reordered = 0
    for k in KEYS:
        ex = b.autoencoding(text, k, corruption_rate=0.5, mean_span=8, deshuffle=deshuffle,
                            max_length=300)
        _check_layout(ex)
        prompt, target = b.split_example(ex)
        assert _is_window(target, text) and target.size >= 100
        clean = np.array([t for t in prompt[1:] if t not in b.SENTINELS])
        assert set(clean.tolist()) < set(target.tolist())
        # the clean tokens in order are the original (unshuffled) or a reordering of its chunks
        in_order = np.array([t for t in target if t in set(clean.tolist())])
        assert sorted(clean.tolist()) == sorted(in_order.tolist())
        reordered += not np.array_equal(clean, in_order)
        sentinels = [t for t in prompt if t in b.SENTINELS]
        assert sentinels == [b.sentinel(i) for i in range(len(sentinels))]
    assert reordered == 0 if not deshuffle else reordered >= len(KEYS) - 1


def test_deshuffling_input_is_a_permutation_of_the_target():
    text = _unique_text(120)
    moved = 0
    for k in KEYS:
        ex = b.deshuffling(text, k, mean_chunk=8)
        _check_layout(ex, b.BIRDIE_TOKENS["DESHUFFLING"])
        prompt, target = b.split_example(ex)
        np.testing.assert_array_equal(target, text)
        assert sorted(prompt[1:].tolist()) == sorted(target.tolist())
        moved += not np.array_equal(prompt[1:], target)
    assert moved == len(KEYS)


def test_copying_and_prefix_lm():
    text = _unique_text(100)
    for k in KEYS:
        prompt, target = b.split_example(b.copying(text, k))
        np.testing.assert_array_equal(prompt[1:], target)
        ex = b.prefix_lm(text, k)
        prompt, target = b.split_example(ex)
        np.testing.assert_array_equal(np.concatenate([prompt[1:], target]), text)
        assert 50 <= prompt.size - 1 <= 96 and target.size >= 4
    with pytest.raises(ValueError, match="prefix_lm"):
        b.prefix_lm(text[:7], 0)


def test_selective_copying_spans_sit_between_their_delimiters():
    text = _unique_text(256)
    counts = set()
    S, E, C = (b.BIRDIE_TOKENS[n] for n in ("SC_START", "SC_END", "SC_CONTEXT"))
    for k in range(20):
        ex = b.selective_copying(text, k, max_length=230)
        _check_layout(ex, b.BIRDIE_TOKENS["SELECTIVE_COPYING"])
        prompt, target = b.split_example(ex)
        assert target[-1] == b.BIRDIE_TOKENS["SC_DONE"]
        spans = np.split(target[:-1], np.flatnonzero(target[:-1] == b.BIRDIE_TOKENS["SC_SEP"]))
        spans = [s[1:] if s.size and s[0] == b.BIRDIE_TOKENS["SC_SEP"] else s for s in spans]
        c = int(np.flatnonzero(prompt == C)[0])
        context, query = prompt[c + 1:], prompt[1:c]
        assert _is_window(context, text)
        starts = np.flatnonzero(query == S)
        assert 1 <= len(starts) == len(spans) <= 4
        counts.add(len(spans))
        for i, st in enumerate(starts):
            end = st + 1 + int(np.flatnonzero(query[st + 1:] == E)[0])
            nxt = starts[i + 1] if i + 1 < len(starts) else query.size
            pre, post = query[st + 1:end], query[end + 1:nxt]
            assert pre.size >= 2 and post.size >= 2 and spans[i].size >= 2
            assert _is_window(np.concatenate([pre, spans[i], post]), context)
    assert len(counts) >= 3, counts


def test_objective_errors_name_the_field():
    with pytest.raises(ValueError, match="corruption_rate"):
        b.infilling(_unique_text(50), 0, corruption_rate=1.5)
    with pytest.raises(ValueError, match="max_length"):
        b.copying(_unique_text(50), 0, max_length=2)
    with pytest.raises(ValueError, match="fn="):
        b.Objective("x", "nope", "x")
    with pytest.raises(ValueError, match="tokens"):
        b.copying(np.zeros((2, 3), np.int32), 0)


def test_mixtures_and_sampling():
    objs = b.birdie_objectives(settings=b.COMPACT_SETTINGS)
    sizes = b.group_sizes(objs)
    assert len(objs) == 18 and len({o.name for o in objs}) == 18
    assert sizes[[o.name for o in objs].index("infilling_r15_s8")] == 9
    u = b.uniform_mixture(objs)
    assert u.sum() == pytest.approx(1.0)
    groups = {o.group for o in objs}
    assert len(groups) == 7
    for g in groups:  # each class gets 1/7
        assert sum(p for p, o in zip(u, objs) if o.group == g) == pytest.approx(1 / 7)
    one_hot = np.eye(len(objs))[4]
    text = _unique_text(100)
    for k in KEYS:
        i, ex = b.sample_example(objs, one_hot, text, jax.random.key(k), max_length=150)
        assert i == 4 and ex.inputs.size <= 150
    with pytest.raises(ValueError, match="mixture"):
        b.sample_example(objs, np.ones(3), text, 0)


# ------------------------------------------------------------------------------------------
# The objectives' settings (issue 21): the paper's, and the compact ones of the CPU figures
# ------------------------------------------------------------------------------------------
# sha256[:16] of every example `_settings_hash` draws, computed with the code before the
# settings existed (commit d38f131): the compact settings must reproduce them bit for bit.
COMPACT_REFERENCE = {
    "next_token_prediction": "a02afdaf04a2e378", "prefix_lm": "d0650638fb9d6133",
    "infilling_r5_s3": "a6ba4413d2df119b", "infilling_r5_s8": "84584f3bcb3fb14b",
    "infilling_r5_s32": "4e2368329ffdc87b", "infilling_r15_s3": "e8312d08c77919e3",
    "infilling_r15_s8": "63997fe516f89cfc", "infilling_r15_s32": "1a9e7964f7af2679",
    "infilling_r50_s3": "49969c61ee8a93c0", "infilling_r50_s8": "f976d403375bd568",
    "infilling_r50_s32": "69babf2ec6994772", "autoencoding_r15_s3": "6153bbf24e4cad13",
    "autoencoding_r50_s8": "e8a15499bd39188e",
    "autoencoding_deshuffling_r15_s3": "48ef74f8baf4bd16",
    "autoencoding_deshuffling_r50_s8": "082c9bb51131ace5", "deshuffling": "95236a5a42cc4990",
    "copying": "92e49ec413b2e741", "selective_copying": "dc4c04e17e460059",
    "ul2_r_r15_s3": "9d8e55da3cfc8ee1", "ul2_r_r15_s8": "d42a7b5c200c7a2a",
    "ul2_x_r50_s3": "a6087e89296f9c3f", "ul2_x_r50_s8": "0e025128cb97bab4",
    "ul2_x_r50_s64": "c76aca2c77f32037", "ul2_x_r15_s64": "29c4611d1f0ddb38",
    "ul2_s": "c6a5cf00b0b68b96",
}


def _settings_hash(obj) -> str:
    """sha256[:16] of obj's examples on two texts (240 distinct tokens; 1,100 random bytes), six
    int keys, with and without a budget of 200 tokens."""
    r = np.random.default_rng(1234)
    texts = [r.permutation(256)[:240].astype(np.int32), r.integers(0, 256, 1100).astype(np.int32)]
    h = hashlib.sha256()
    for t in texts:
        for k in range(6):
            for max_length in (None, 200):
                for a in obj(t, k, max_length=max_length):
                    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def test_compact_settings_reproduce_the_examples_from_before_the_settings():
    objs = (b.birdie_objectives(settings=b.COMPACT_SETTINGS)
            + b.ul2_objectives(settings=b.COMPACT_SETTINGS))
    assert {o.name: _settings_hash(o) for o in objs} == COMPACT_REFERENCE
    # the paper's settings give other examples (a check that the hash sees the settings)
    drawn = dataclasses.replace(b.PAPER_SETTINGS, controlled=())
    paper = {o.name: o for o in b.birdie_objectives(settings=drawn) + b.ul2_objectives()}
    for name in ("ul2_s", "copying", "prefix_lm"):
        assert _settings_hash(paper[name]) != COMPACT_REFERENCE[name], name


def test_the_paper_objective_set():
    objs = b.birdie_objectives(settings=dataclasses.replace(b.PAPER_SETTINGS, controlled=()))
    names = [o.name for o in objs]
    assert len(objs) == 19 and len(set(names)) == 19
    assert names[15:17] == ["deshuffling_p50", "deshuffling_p100"]
    assert [dict(objs[i].kwargs)["fraction"] for i in (15, 16)] == [0.5, 1.0]
    assert b.group_sizes(objs)[15] == 2 and len({o.group for o in objs}) == 7
    u = b.uniform_mixture(objs)
    assert u[15] == pytest.approx(1 / 14) and u[names.index("copying")] == pytest.approx(1 / 7)
    assert {o.placement for o in objs + b.ul2_objectives()} == {"either"}
    compact = b.birdie_objectives(settings=b.COMPACT_SETTINGS)
    assert {o.placement for o in compact} == {"prepend"} and len(compact) == 18


def test_controlled_settings_are_configurations_of_their_own():
    """The paper's action space: each controlled setting's values are configurations (the same
    class), and each configuration's examples keep to its value."""
    objs = b.birdie_objectives(length_bins=(32, 64, 128))       # the paper's settings: all
    by_name = {o.name: o for o in objs}
    assert len(by_name) == len(objs) == 2 + 9 * 3 + 4 + 2 + 3 + 2 * 3 * 3
    assert len({o.group for o in objs}) == 7
    assert b.uniform_mixture(objs)[[o.group == "copying" for o in objs]].sum() == \
        pytest.approx(1 / 7)
    text = _unique_text(300)
    P = dataclasses.replace                                      # parse with the paradigm first
    for n in (32, 64, 128):
        for k in KEYS:
            # infilling and copying cut the text to the bin; selective copying its context
            pi, ti = b.split_example(P(by_name[f"infilling_r15_s3_b{n}"], placement="prepend")(
                text, k))
            kept = [t for t in np.concatenate([pi[1:], ti]) if t not in b.SENTINELS]
            assert len(kept) == n
            assert b.split_example(by_name[f"copying_b{n}"](text, k))[1].size == n
            for q, first in (("before", True), ("after", False)):
                o = P(by_name[f"selective_copying_q{q}_s8-15_c{n}"], placement="prepend")
                prompt, target = b.split_example(o(text, k))
                query, context, query_first = _sc_layout(prompt)
                assert query_first is first and context.size == n and _is_window(context, text)
                spans = np.split(target[:-1], np.flatnonzero(target[:-1] == b.BIRDIE_TOKENS[
                    "SC_SEP"]))
                assert all(8 <= s.size - (s[0] == b.BIRDIE_TOKENS["SC_SEP"]) <= 15
                           for s in spans)
    # a setting with one value is the configuration as drawn per example (no new name)
    one = b.birdie_objectives(length_bins=(64,), settings=dataclasses.replace(
        b.PAPER_SETTINGS, selective_copying_query="before", selective_copying_spans=(4, 6)))
    drawn = b.birdie_objectives(length_bins=(64,), settings=dataclasses.replace(
        b.PAPER_SETTINGS, selective_copying_query="before", selective_copying_spans=(4, 6),
        controlled=()))
    assert one == drawn and b.span_ranges(4, 32) == ((4, 7), (8, 15), (16, 32))
    with pytest.raises(ValueError, match=r"^objective_settings.controlled=\('length',\) is not "
                                         r"allowed; allowed: a tuple of distinct names from"):
        b.ObjectiveSettings(controlled=("length",))


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_deshuffling_shuffles_a_fraction_of_the_tokens(fraction):
    text = _unique_text(256)
    in_place = []
    for k in KEYS:
        ex = b.deshuffling(text, k, fraction=fraction, mean_chunk=1)
        _check_layout(ex, b.BIRDIE_TOKENS["DESHUFFLING"])
        prompt, target = b.split_example(ex)
        np.testing.assert_array_equal(target, text)          # the target is the original
        assert sorted(prompt[1:].tolist()) == sorted(text.tolist())
        in_place.append(int((prompt[1:] == text).sum()))
    if fraction == 0.5:
        # 128 positions chosen and permuted among themselves: the other 128 stay, and a random
        # permutation of 128 fixes about one of its own
        assert all(128 <= n <= 136 for n in in_place), in_place
    else:   # every position is permuted: about one token stays where it was
        assert all(n <= 8 for n in in_place), in_place


def test_deshuffling_of_chunks_keeps_them_whole():
    text = _unique_text(120)
    for fraction in (0.5, 1.0):
        for k in KEYS:
            prompt, target = b.split_example(b.deshuffling(text, k, fraction=fraction,
                                                           mean_chunk=8))
            np.testing.assert_array_equal(target, text)
            shuffled = prompt[1:]
            # cut where the shuffled text stops following the original: ~n/8 chunks or fewer
            breaks = sum(int(np.flatnonzero(text == a)[0]) + 1 != int(np.flatnonzero(text == c)[0])
                         for a, c in zip(shuffled[:-1], shuffled[1:]))
            assert 1 <= breaks <= 120 // 8 + 1
    with pytest.raises(ValueError, match=r"fraction=0.0 is not allowed; allowed: \(0, 1\]"):
        b.deshuffling(text, 0, fraction=0.0)


def _sc_layout(prompt):
    """(query, context, query_first) of a selective-copying prompt [SC] ... (paradigm first)."""
    S, C = b.BIRDIE_TOKENS["SC_START"], b.BIRDIE_TOKENS["SC_CONTEXT"]
    if prompt[1] == C:     # [SC] [CONTEXT] text query
        q = 2 + int(np.flatnonzero(prompt[2:] == S)[0])
        return prompt[q:], prompt[2:q], False
    c = int(np.flatnonzero(prompt == C)[0])
    return prompt[1:c], prompt[c + 1:], True


def test_selective_copying_query_before_or_after_the_context():
    text = _unique_text(256)
    C = b.BIRDIE_TOKENS["SC_CONTEXT"]
    first = set()
    for k in range(16):
        before = b.selective_copying(text, k, query_position="before", max_length=230)
        after = b.selective_copying(text, k, query_position="after", max_length=230)
        either = b.selective_copying(text, k, query_position="either", max_length=230)
        for ex in (before, after, either):
            _check_layout(ex, b.BIRDIE_TOKENS["SELECTIVE_COPYING"])
        pb, tb = b.split_example(before)
        pa, ta = b.split_example(after)
        np.testing.assert_array_equal(ta, tb)                  # the target is the same
        query, context, query_first = _sc_layout(pb)
        assert query_first and _is_window(context, text)
        # after: the same query and context, the context first
        np.testing.assert_array_equal(pa, np.concatenate([[pb[0], C], context, query]))
        assert _sc_layout(pa)[2] is False
        # either: one of the two, the same for the same key
        pe = b.split_example(either)[0]
        assert np.array_equal(pe, pb) or np.array_equal(pe, pa)
        np.testing.assert_array_equal(
            pe, b.split_example(b.selective_copying(text, k, query_position="either",
                                                    max_length=230))[0])
        first.add(_sc_layout(pe)[2])
    assert first == {True, False}
    with pytest.raises(ValueError, match="query_position='middle' is not allowed; allowed"):
        b.selective_copying(text, 0, query_position="middle")


def test_selective_copying_paper_spans_and_delimiters():
    text = _unique_text(256)
    E, SEP = b.BIRDIE_TOKENS["SC_END"], b.BIRDIE_TOKENS["SC_SEP"]
    S = b.BIRDIE_TOKENS["SC_START"]
    drawn = dataclasses.replace(b.PAPER_SETTINGS, controlled=())
    obj = {o.name: o for o in b.birdie_objectives(settings=drawn)}["selective_copying"]
    obj = dataclasses.replace(obj, placement="prepend")   # the paradigm first, to parse it
    span_sizes, delim_sizes = [], []
    for k in range(24):
        prompt, target = b.split_example(obj(text, k, max_length=256))
        query, context, _ = _sc_layout(prompt)
        spans = np.split(target[:-1], np.flatnonzero(target[:-1] == SEP))
        span_sizes += [s.size - (s.size and s[0] == SEP) for s in spans]
        starts = np.flatnonzero(query == S)
        for i, st in enumerate(starts):
            end = st + 1 + int(np.flatnonzero(query[st + 1:] == E)[0])
            nxt = starts[i + 1] if i + 1 < len(starts) else query.size
            delim_sizes += [end - st - 1, nxt - end - 1]
    assert min(span_sizes) >= 4 and max(span_sizes) <= 32 and max(span_sizes) > 16
    assert min(delim_sizes) >= 1 and max(delim_sizes) <= 8 and min(delim_sizes) < 2
    assert max(delim_sizes) > 6


@pytest.mark.parametrize("key_of", [int, jax.random.key], ids=["int", "jax"])
def test_paradigm_placement(key_of):
    text = _unique_text(200)
    base = b.Objective("copying", "copying", "copying")
    append = dataclasses.replace(base, placement="append")
    either = dataclasses.replace(base, placement="either")
    P = b.BIRDIE_TOKENS["COPYING"]
    last = 0
    for k in range(64):
        key = key_of(k)
        first, end = base(text, key, max_length=120), append(text, key, max_length=120)
        p = int(first.prefix.sum())
        assert first.inputs[0] == P and end.inputs[p - 1] == P and end.inputs[p] == SG
        # the rest of the prompt moves up one place; target, labels and prefix are unchanged
        np.testing.assert_array_equal(end.inputs[:p - 1], first.inputs[1:p])
        np.testing.assert_array_equal(end.inputs[p:], first.inputs[p:])
        np.testing.assert_array_equal(end.labels, first.labels)
        np.testing.assert_array_equal(end.prefix, first.prefix)
        ex = either(text, key, max_length=120)
        for x, y in zip(ex, either(text, key, max_length=120)):   # the same for the same key
            np.testing.assert_array_equal(x, y)
        is_last = bool(ex.inputs[p - 1] == P)
        np.testing.assert_array_equal(ex.inputs, (end if is_last else first).inputs)
        last += is_last
    assert 20 <= last <= 44, last   # about half of 64 keys
    with pytest.raises(ValueError, match="placement='end' is not allowed; allowed"):
        b.Objective("copying", "copying", "copying", placement="end")


def test_ul2_s_splits_at_75_percent():
    text = _unique_text(200)
    s_paper = b.ul2_objectives()[-1]
    s_compact = b.ul2_objectives(settings=b.COMPACT_SETTINGS)[-1]
    sizes = set()
    for k in KEYS:
        ex = s_paper(text, k)
        prompt, target = b.split_example(ex)
        body = prompt[1:] if prompt[0] == b.BIRDIE_TOKENS["UL2_S"] else prompt[:-1]
        assert b.BIRDIE_TOKENS["UL2_S"] in (prompt[0], prompt[-1])
        assert body.size == 150 and target.size == 50
        np.testing.assert_array_equal(np.concatenate([body, target]), text)
        sizes.add(b.split_example(s_compact(text, k))[0].size - 1)
    assert len(sizes) == len(KEYS)   # the compact split is drawn uniformly


@pytest.mark.parametrize("field, value, allowed", [
    ("deshuffle_fractions", (0.5, 1.5), "distinct fractions in (0, 1]"),
    ("deshuffle_fractions", (), "distinct fractions in (0, 1]"),
    ("deshuffle_fractions", (0.5, 0.5), "distinct fractions in (0, 1]"),
    ("deshuffle_mean_chunk", 0.5, ">= 1"),
    ("selective_copying_query", "middle", "('before', 'after', 'either')"),
    ("deshuffle_fractions", 0.5, "distinct fractions in (0, 1]"),
    ("deshuffle_mean_chunk", "eight", ">= 1"),
    ("selective_copying_spans", (8, 4), "a pair of integers 1 <= min <= max"),
    ("selective_copying_delimiters", (0, 8), "a pair of integers 1 <= min <= max"),
    ("selective_copying_spans", 4, "a pair of integers 1 <= min <= max"),
    ("selective_copying_spans", ("a", "b"), "a pair of integers 1 <= min <= max"),
    ("paradigm_placement", "end", "('prepend', 'append', 'either')"),
    ("ul2_s_prefix", (0.8, 0.7), "a pair of fractions 0 <= low <= high <= 1"),
])
def test_bad_settings_are_one_line_errors(field, value, allowed):
    with pytest.raises(ValueError) as e:
        b.ObjectiveSettings(**{field: value})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"objective_settings.{field}={value!r} is not "
                                              "allowed; allowed: ")
    assert allowed in msg
    with pytest.raises(ValueError, match=r"objective_settings fields \['shuffle'\] are unknown"):
        b.ObjectiveSettings.from_mapping({"shuffle": 0.5})
    assert b.ObjectiveSettings.from_mapping({"paradigm_placement": "append"}) == \
        dataclasses.replace(b.PAPER_SETTINGS, paradigm_placement="append")


# ------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------
def test_pack_rows_segments_and_weights():
    text = _unique_text(100)
    exs = [b.copying(text[:n], 0) for n in (10, 20, 5, 25, 12)]  # lengths 21, 41, 11, 51, 25
    out = b.pack(exs, 64, objective_ids=[0, 1, 2, 3, 4])
    assert out["inputs"].shape == (3, 64)
    np.testing.assert_array_equal(out["segment_ids"][0, :62],
                                  np.repeat([1, 2], [21, 41]))
    assert (out["segment_ids"][0, 62:] == 0).all() and (out["inputs"][0, 62:] == tok.PAD).all()
    row_of = [0, 0, 1, 1, 2]
    for j, ex in enumerate(exs):
        r = row_of[j]
        sel = out["objective_ids"][r] == j
        np.testing.assert_array_equal(out["inputs"][r, sel], ex.inputs)
        np.testing.assert_array_equal(out["prefix"][r, sel], ex.prefix)
        lab = ex.labels != b.IGNORE
        np.testing.assert_array_equal(out["weights"][r, sel], lab)
        np.testing.assert_array_equal(out["targets"][r, sel][lab], ex.labels[lab])
    assert out["weights"].sum() == sum((e.labels != b.IGNORE).sum() for e in exs)
    with pytest.raises(ValueError, match="row_length"):
        b.pack(exs, 40)
    assert b.pack(exs, 64, num_rows=5)["inputs"].shape == (5, 64)


def test_trainer_loss_passes_packing_to_the_model():
    seen = {}

    def apply_fn(variables, inputs, *, segment_ids, prefix):
        seen.update(segment_ids=segment_ids, prefix=prefix)
        return jnp.zeros(inputs.shape + (tok.VOCAB_SIZE,))

    text = _unique_text(40)
    batch = {k: jnp.asarray(v) for k, v in b.pack([b.copying(text[:9], 0)], 32).items()}
    total, aux = b.trainer_loss(apply_fn, {}, batch, None)
    assert aux["weight"] == 9
    assert float(total) == pytest.approx(9 * np.log(tok.VOCAB_SIZE), rel=1e-5)
    np.testing.assert_array_equal(seen["prefix"], batch["prefix"])
    logits = jax.nn.one_hot(batch["targets"], tok.VOCAB_SIZE) * 50.0
    mean, cnt = b.per_objective_losses(logits, batch, 3)
    assert cnt.tolist() == [9, 0, 0] and float(mean[0]) < 1e-6


# ------------------------------------------------------------------------------------------
# Controller
# ------------------------------------------------------------------------------------------
def _controller_cfg(**kw):
    base = dict(group_sizes=(1, 1, 1, 1), total_steps=2000, eval_every=100, history=32,
                hidden=32, train_steps=150, num_candidates=512, explore_start=0.3,
                explore_end=0.3)
    base.update(kw)
    return bc.ControllerConfig(**base)


def test_controller_schedule_and_exploration():
    cfg = _controller_cfg(explore_start=0.5, explore_end=0.2, first_eval=50)
    assert [s for s in range(0, 400) if bc.should_update(cfg, s)] == [50, 150, 250, 350]
    assert float(bc.exploration(cfg, 0)) == pytest.approx(0.5)
    assert float(bc.exploration(cfg, 500)) == pytest.approx(0.35)
    assert float(bc.exploration(cfg, 1000)) == pytest.approx(0.2)
    assert float(bc.exploration(cfg, 2000)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="explore_start"):
        _controller_cfg(explore_start=0.1, explore_end=0.2)
    with pytest.raises(ValueError, match="top_k"):
        _controller_cfg(num_candidates=4)


def test_controller_learns_which_objective_pays():
    """Only objective 0's loss falls, faster the more it is sampled: the mixture moves to it."""
    cfg = _controller_cfg()
    state = bc.controller_init(cfg, jax.random.key(0))
    np.testing.assert_allclose(state.mixture, 0.25)
    losses = np.full(4, 3.0, np.float32)
    share = []
    for i in range(10):
        state = bc.controller_update(cfg, state, losses, (i + 1) * 100)
        if i < 2:  # uniform until min_history rewards exist
            np.testing.assert_allclose(state.mixture, 0.25, atol=1e-6)
        m = np.asarray(state.mixture)
        share.append(float(m[0]))
        losses = losses.copy()
        # small relative drops, so the reward (which saturates at ±1) still grades the share
        losses[0] *= 1.0 - 0.05 * m[0]
    assert int(state.count) == 9 and int(state.num_updates) == 10
    assert float(state.mixture.sum()) == pytest.approx(1.0, abs=1e-5)
    # Uniform is 0.25; exploration (ε = 0.3) caps the share near 0.8.
    assert np.mean(share[-5:]) > 0.5, share
    # The state is a pytree of arrays: it round-trips through tree_map (checkpointable).
    leaves = jax.tree_util.tree_leaves(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    same = jax.tree_util.tree_map(lambda x: x, state)
    assert isinstance(same, bc.ControllerState)
