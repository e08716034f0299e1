"""The phone-book lookup (Birdie, Blouir et al. 2024, Fig. 1; after Jelassi et al. 2024).

    What are the phone numbers for A, B, and C? Find them in the phonebook below.
    Phonebook:
    Name Surname : XXX-XXX-XXXX
    ...
    What are the phone numbers for A, B, and C?
→ target "n_A, n_B, n_C" (query order), scored by digit accuracy: the fraction of the target's
digits reproduced at their position among the generated digits.

    python -m eval.phonebook --workdir RUN --seed S --entries N --queries Q [--examples E]

prints one JSON line {"digit_accuracy", "exact_match", "entries", "queries", "examples", ...}.
The examples are drawn by `train.data.phonebook.make_example` (deterministic per seed). Prompts
are encoded and answers decoded by a tokenizer (`evaluate(..., tokenizer=)`; the CLI takes the
run's data.tokenizer; default bytes). Birdie's start-generating token is a byte-vocabulary id, so
with another tokenizer no start token follows the prompt unless one is given.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval import cli
from models.ssm import BiSSMLM
from train import trainer
from train.data import birdie_data
from train.data import tokenizer as tok
from train.data.phonebook import make_example
from train.objectives.birdie import START_GENERATING


def digit_accuracy(prediction: str, target: str) -> float:
    """Fraction of the target's digits matched, position by position, by the prediction's digits
    (missing digits count as wrong; extra ones are ignored)."""
    t = [c for c in target if c.isdigit()]
    if not t:
        raise ValueError(f"target={target!r} has no digits")
    p = [c for c in prediction if c.isdigit()]
    return sum(a == b for a, b in zip(p, t)) / len(t)


# ---------------------------------------------------------------------------------------------
# Generation and evaluation
# ---------------------------------------------------------------------------------------------
# (params, tokens [B,T], segment_ids [B,T], prefix [B,T]) → logits [B,T,V]
ModelFn = Callable[..., jax.Array]


def left_pad(prompts: Sequence[np.ndarray], length: Optional[int] = None, *,
             pad_id: int = tok.PAD) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B,P], segment_ids [B,P]): prompts right-aligned, pad_id in segment 0 before them.
    P = length (≥ the longest prompt) or the longest prompt."""
    P = max(len(p) for p in prompts)
    if length is not None:
        if length < P:
            raise ValueError(f"length={length} is shorter than the longest prompt ({P})")
        P = length
    toks = np.full((len(prompts), P), pad_id, np.int32)
    seg = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        toks[i, P - len(p):] = p
        seg[i, P - len(p):] = 1
    return toks, seg


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _greedy_full(model_fn, params, buf, seg, prefix, start: int, num_new: int):
    """Generated tokens [B, num_new]: the argmax at start−1+i is written to start+i."""
    B, L = buf.shape

    def body(i, carry):
        buf, out = carry
        logits = model_fn(params, buf, seg, prefix)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, start - 1 + i, 1, False), -1)
        nxt = nxt.astype(buf.dtype)
        buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, jnp.minimum(start + i, L - 1), 1)
        return buf, out.at[:, i].set(nxt)

    _, out = jax.lax.fori_loop(0, num_new, body, (buf, jnp.zeros((B, num_new), buf.dtype)))
    return out


def greedy_generate(model_fn: ModelFn, params, prompts: Sequence[np.ndarray], num_new: int,
                    *, start_token: Optional[int], pad_to: Optional[int] = None,
                    pad_id: int = tok.PAD) -> np.ndarray:
    """Greedy continuation by full forward passes (works for any model): tokens [B, num_new]
    generated after prompt ++ [start_token] (None: after the prompt, whose last token then
    plays its part); the prompt is the prefix, left padding (pad_id) its own segment (pad_to:
    the prompt length to pad to, so batches share one compilation). Each step reruns the model
    on the whole buffer (O(T) per token; evaluation only)."""
    start = [] if start_token is None else [start_token]
    toks, seg = left_pad([np.concatenate([p, start]).astype(np.int32) for p in prompts],
                         None if pad_to is None else pad_to + len(start), pad_id=pad_id)
    B, L = toks.shape
    prefix = (seg == 1) & (np.arange(L)[None] < L - 1)
    extra = num_new - 1  # room for the generated tokens that are fed back
    toks = np.concatenate([toks, np.full((B, extra), pad_id, np.int32)], axis=1)
    seg = np.concatenate([seg, np.ones((B, extra), np.int32)], axis=1)
    prefix = np.concatenate([prefix, np.zeros((B, extra), bool)], axis=1)
    return np.asarray(_greedy_full(model_fn, params, jnp.asarray(toks), jnp.asarray(seg),
                                   jnp.asarray(prefix), L, num_new))


def book_sizes(seed: int, entries, examples: int) -> list[int]:
    """Entries of each of `examples` books: `entries` itself (an int), or drawn uniformly from
    the inclusive range (lo, hi), deterministic in (seed, lo, hi)."""
    if isinstance(entries, (int, np.integer)):
        return [int(entries)] * examples
    lo, hi = (int(v) for v in entries)
    if not 1 <= lo <= hi:
        raise ValueError(f"entries={tuple(entries)} is not allowed; use an int or (lo, hi) with "
                         "1 <= lo <= hi")
    return [int(v) for v in np.random.default_rng([seed, lo, hi]).integers(lo, hi + 1, examples)]


def evaluate(model_fn: ModelFn, params, *, seed: int = 0, entries=16, queries: int = 4,
             examples: int = 16, batch_size: int = 8, prompt_prefix: Sequence[int] = (),
             start_token: Optional[int] = None,
             generate_fn: Optional[Callable[[Sequence[np.ndarray], int], np.ndarray]] = None,
             tokenizer: Optional[tok.Tokenizer] = None) -> dict:
    """Digit accuracy of greedy answers on `examples` phone books of `entries` names (an int, or
    an inclusive range (lo, hi) each book's size is drawn from: `book_sizes`).

    model_fn(params, tokens, segment_ids, prefix) → logits (see `model_fn_for`); prompt_prefix:
    tokens put before each encoded prompt (e.g. a paradigm token); start_token: the token after
    the prompt (default: Birdie's start-generating token with the byte tokenizer, none with
    another); generate_fn(prompts, num_new) → tokens [B, num_new] replaces the default greedy
    decoder (e.g. SSM recurrent decoding); tokenizer: encodes prompts, decodes answers (default
    bytes).
    """
    tokenizer = tokenizer or tok.ByteTokenizer()
    if start_token is None and (tokenizer.spec == "byte" or tokenizer.spec.startswith("birdie:")):
        start_token = START_GENERATING      # bytes, or a tokenizer in Birdie's id space
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.special("EOS")
    exs = [make_example(seed, n, queries, i)
           for i, n in enumerate(book_sizes(seed, entries, examples))]
    num_new = len(tokenizer.encode(exs[0].target)) + 1
    all_prompts = [np.concatenate([np.asarray(prompt_prefix, np.int32),
                                   tokenizer.encode(e.prompt)]) for e in exs]
    pad_to = max(len(p) for p in all_prompts)
    accs, exact = [], []
    for s in range(0, examples, batch_size):
        chunk = exs[s: s + batch_size]
        prompts = all_prompts[s: s + batch_size]
        if generate_fn is None:
            # A short last batch is filled with copies so every batch has one shape.
            filled = prompts + [prompts[-1]] * (batch_size - len(prompts))
            gen = greedy_generate(model_fn, params, filled, num_new, start_token=start_token,
                                  pad_to=pad_to, pad_id=pad_id)[: len(prompts)]
        else:
            gen = np.asarray(generate_fn(prompts, num_new))
        for e, g in zip(chunk, gen):
            # A model's vocabulary may be wider than its tokenizer's (T5: 32128 rows, 32100 ids).
            text = tokenizer.decode(g[g < tokenizer.vocab_size])
            accs.append(digit_accuracy(text, e.target))
            exact.append(text[: len(e.target)] == e.target)
    return {"digit_accuracy": float(np.mean(accs)), "exact_match": float(np.mean(exact)),
            "entries": entries if isinstance(entries, (int, np.integer)) else list(entries),
            "queries": queries, "examples": examples, "seed": seed}


def model_fn_for(model) -> ModelFn:
    """model_fn(params, tokens, segment_ids, prefix) for a Flax LM: BiSSMLM reads the prefix,
    other LMs (Transformer) get segment_ids only."""
    if isinstance(model, BiSSMLM):
        return lambda p, t, s, pre: model.apply({"params": p}, t, segment_ids=s, prefix=pre)
    return lambda p, t, s, pre: model.apply({"params": p}, t, segment_ids=s)


def _run_tokenizer(data_config):
    """The tokenizer a run's prompts are encoded with: Birdie's rows map a tokenizer's ids
    around its specials (train/data/birdie_data.py), the text datasets use it as it is."""
    spec = data_config.get("tokenizer", "byte")
    if data_config.get("name") == "birdie":
        return birdie_data.eval_tokenizer(spec)
    return tok.load_tokenizer(spec)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="run directory with checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--entries", type=int, default=16)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=8)
    args = ap.parse_args(argv)
    config, params, model = trainer.restore_for_eval(args.workdir)
    prefix_tokens = tuple(getattr(config, "phonebook_prompt_prefix", ()) or ())
    out = evaluate(model_fn_for(model), params, seed=args.seed, entries=args.entries,
                   queries=args.queries, examples=args.examples, batch_size=args.batch_size,
                   prompt_prefix=prefix_tokens,
                   tokenizer=_run_tokenizer(config.data))
    out["workdir"] = str(args.workdir)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
