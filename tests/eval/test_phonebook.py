"""The phone book: the generator (train/data/phonebook.py), digit accuracy and greedy evaluation
(eval/phonebook.py)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import phonebook as pb
from train.data import phonebook as pbdata
from models import ssm
from train.data import tokenizer as tok
from train.objectives.birdie import START_GENERATING


def test_generator_is_deterministic_per_seed():
    a = pbdata.make_example(3, 20, 4, index=2)
    assert a == pbdata.make_example(3, 20, 4, index=2)
    assert a != pbdata.make_example(4, 20, 4, index=2)
    assert a != pbdata.make_example(3, 20, 4, index=3)


@pytest.mark.parametrize("seed", range(5))
def test_names_and_numbers_are_unique_and_the_format_is_the_papers(seed):
    ex = pbdata.make_example(seed, 64, 5)
    names = [n for n, _ in ex.book]
    numbers = [p for _, p in ex.book]
    assert len(set(names)) == len(names) == 64 and len(set(numbers)) == 64
    assert all(re.fullmatch(r"\d{3}-\d{3}-\d{4}", p) for p in numbers)
    assert len(set(ex.queried)) == 5 and set(ex.queried) <= set(names)
    book = dict(ex.book)
    assert ex.target == ", ".join(book[n] for n in ex.queried)
    q = ("What are the phone numbers for " + ", ".join(ex.queried[:-1])
         + f", and {ex.queried[-1]}?")
    assert ex.prompt.startswith(q + " Find them in the phonebook below.\nPhonebook:\n")
    assert ex.prompt.endswith("\n" + q + "\n")
    for n, p in ex.book:
        assert f"\n{n} : {p}\n" in ex.prompt


def test_small_query_lists_and_errors():
    one = pbdata.make_example(0, 5, 1)
    assert "for " + one.queried[0] + "?" in one.prompt
    two = pbdata.make_example(0, 5, 2)
    assert f"for {two.queried[0]} and {two.queried[1]}?" in two.prompt
    with pytest.raises(ValueError, match="queries"):
        pbdata.make_example(0, 3, 4)
    with pytest.raises(ValueError, match="entries"):
        pbdata.make_example(0, pbdata.MAX_ENTRIES + 1, 1)
    # Large books still have unique names.
    big = pbdata.make_example(0, pbdata.MAX_ENTRIES, 3)
    assert len({n for n, _ in big.book}) == pbdata.MAX_ENTRIES


def test_digit_accuracy():
    t = "123-456-7890, 000-111-2222"
    assert pb.digit_accuracy(t, t) == 1.0
    assert pb.digit_accuracy("1234567890", t) == 0.5            # second number missing
    assert pb.digit_accuracy("023-456-7890, 000-111-2229", t) == 18 / 20
    assert pb.digit_accuracy("", t) == 0.0
    assert pb.digit_accuracy(t + ", 999", t) == 1.0                # extra digits ignored
    with pytest.raises(ValueError, match="target"):
        pb.digit_accuracy("1", "abc")


def test_evaluate_scores_a_generator():
    def oracle(prompts, num_new):
        out = []
        for p in prompts:
            text = tok.decode(p)
            names = re.search(r"numbers for (.*)\?\n$", text).group(1)
            names = re.split(r", and |, | and ", names)
            book = dict(re.findall(r"\n([A-Za-z]+ [A-Za-z]+) : (\d{3}-\d{3}-\d{4})", text))
            ans = tok.encode(", ".join(book[n] for n in names))
            out.append(np.pad(ans, (0, num_new - ans.size), constant_values=tok.EOS))
        return np.stack(out)

    res = pb.evaluate(None, None, seed=1, entries=10, queries=3, examples=5, generate_fn=oracle)
    assert res["digit_accuracy"] == 1.0 and res["exact_match"] == 1.0

    def first_half(prompts, num_new):  # right for the first of two numbers, nothing after
        return oracle(prompts, num_new)[:, :12]

    res = pb.evaluate(None, None, seed=1, entries=10, queries=2, examples=4,
                      generate_fn=first_half)
    assert res["digit_accuracy"] == 0.5 and res["exact_match"] == 0.0


def test_greedy_full_pass_matches_recurrent_decoding():
    """The model-agnostic greedy decoder agrees with BiSSMLM's prefill + step decoding."""
    cfg = ssm.SSMConfig(vocab_size=tok.VOCAB_SIZE, width=16, num_layers=2, layer_pattern="bc")
    model = ssm.BiSSMLM(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
                           ["params"])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).astype(np.int32) for n in (20, 26)]
    gen = pb.greedy_generate(pb.model_fn_for(model), params, prompts, 5,
                             start_token=START_GENERATING)
    assert gen.shape == (2, 5)
    toks, seg = pb.left_pad(prompts)
    ref = jax.jit(ssm.greedy_generate, static_argnums=(0, 4))(
        model, params, jnp.asarray(toks), jnp.full((2,), START_GENERATING), 5,
        segment_ids=jnp.asarray(seg))
    np.testing.assert_array_equal(gen, ref)
    res = pb.evaluate(pb.model_fn_for(model), params, seed=0, entries=2, queries=1, examples=3,
                      batch_size=2)
    assert 0.0 <= res["digit_accuracy"] <= 1.0 and res["examples"] == 3


@pytest.mark.parametrize("entries,queries", [(2, 2), (4, 1), (32, 32)])
def test_max_example_length_bounds_every_example(entries, queries):
    # Training lays a lookup out as prompt, [START_GENERATING], numbers, EOS (inputs = that - 1).
    longest = max(len(tok.encode(e.prompt)) + len(tok.encode(e.target)) + 1
                  for e in (pbdata.make_example(s, entries, queries) for s in range(20)))
    assert longest <= pbdata.max_example_length(entries, queries)
    with pytest.raises(ValueError, match="queries"):
        pbdata.max_example_length(2, 3)
