"""The official zero-shot passkey test of landmark attention's LLaMA experiment (Mohtashami &
Jaggi 2023, Sec. 4.2, Fig. 3b), as epfml/landmark-attention `llama/run_test.py` runs it.

    python -m eval.passkey --protocol official --workdir RUN [--base HF_DIR] [--seed S]

The prompt (`official_prompt(n_garbage, rng)` → (text, pass_key)), in the order the official
`generate_prompt(n_garbage)` draws from Python's `random`:

1. `n_garbage_prefix = randint(0, n_garbage)` (the filler before the key, in characters),
   `n_garbage_suffix = n_garbage - n_garbage_prefix`;
2. `pass_key = randint(1, 50000)`;

and the text is "\\n".join of the five lines (the first is one line: TASK_DESCRIPTION)

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them.
        I will quiz you about the important information there.
    GARBAGE_INF[:n_garbage_prefix]
    The pass key is {pass_key}. Remember it. {pass_key} is the pass key.
    GARBAGE_INF[:n_garbage_suffix]
    What is the pass key? The pass key is

where GARBAGE_INF is " ".join of 2000 copies of "The grass is green. The sky is blue. The sun is
yellow. Here we go. There and back again." (both filler pieces are prefixes of it). The official
script draws from the unseeded global `random`; here one `random.Random(seed)` is drawn in the
official loop's order (for each length in LENGTHS, TRIALS prompts), so a seed fixes every prompt.

Scoring (official `test_model`): the model generates NEW_TOKENS = 10 tokens greedily (the
`pipeline("text-generation")` default for LLaMA: no sampling), the first integer of the decoded
continuation (`re.search(r'\\d+', ...)`) is the answer, right iff it equals pass_key; 50 trials per
filler length n_garbage in LENGTHS = (0, 100, ..., 38000) characters. The prompt is encoded with
the tokenizer's BOS first (the LLaMA tokenizer's `add_bos_token`). Both models read the same
prompts: the base model with full attention (the pretrained checkpoint, models/pretrained.py;
official "base", LLaMA 7B), the landmark model with the block memory (official "mem":
`set_mem_cache_args(max_seq_len=255, mem_freq=50, top_k=5, max_cache_size=None)`: windows of 255
augmented = 250 raw tokens, top-k 5, unbounded cache), `models.landmark_memory.memory_generate`
with positions='llama'.

What differs from the official generation: a generated token that completes a block is followed
by its landmark in the cache, but the next token is read from the regular token's logits (mnemax
trains with landmark targets masked; the official LLaMA fine-tune included landmarks in its loss
and reads the landmark's logits there); the base model's continuation is recomputed with full
attention over the right-padded prompt instead of a KV cache (same greedy tokens).
"""
from __future__ import annotations

import functools
import random
import re
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import landmark, landmark_memory
from train.data import tokenizer as tok

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                    "and memorize them. I will quiz you about the important information there.")
GARBAGE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again.")
GARBAGE_INF = " ".join([GARBAGE] * 2000)
FINAL_QUESTION = "What is the pass key? The pass key is"
LENGTHS = (0, 100, 500, 1000, 5000, 8000, 10000, 12000, 14000, 18000, 20000, 25000, 38000)
TRIALS = 50          # num_tests
NEW_TOKENS = 10      # max_new_tokens
TOP_K = 5            # set_mem_cache_args(top_k=5)
CHUNK_LEN = 250      # raw tokens per window: max_seq_len=255 augmented tokens = 5 blocks of 50 + 1
MEM_FREQ = 50        # set_mem_cache_args(mem_freq=50)


def official_prompt(n_garbage: int, rng: random.Random) -> tuple[str, int]:
    """(prompt text, pass_key): the official `generate_prompt(n_garbage)` drawn from `rng`
    (module docstring: the prefix length, then the key)."""
    if (not isinstance(n_garbage, int) or isinstance(n_garbage, bool)
            or not 0 <= n_garbage <= len(GARBAGE_INF)):
        raise ValueError(f"n_garbage={n_garbage!r} must be an integer in [0, {len(GARBAGE_INF)}]")
    n_prefix = rng.randint(0, n_garbage)
    n_suffix = n_garbage - n_prefix
    pass_key = rng.randint(1, 50000)
    information_line = f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key."
    lines = [TASK_DESCRIPTION, GARBAGE_INF[:n_prefix], information_line, GARBAGE_INF[:n_suffix],
             FINAL_QUESTION]
    return "\n".join(lines), pass_key


def official_prompts(lengths: Sequence[int], trials: int, seed: int
                     ) -> dict[int, list[tuple[str, int]]]:
    """{n_garbage: [(text, pass_key)] × trials}, drawn from one `random.Random(seed)` in the
    official loop's order (lengths outer, trials inner)."""
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials={trials!r} must be a positive integer")
    rng = random.Random(seed)
    return {int(n): [official_prompt(int(n), rng) for _ in range(trials)] for n in lengths}


def first_integer(text: str) -> Optional[int]:
    """The first run of digits in `text` as an int (official `re.search(r'\\d+', response)`);
    None when there is none (the official script then keeps the text, which never matches)."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def encode_prompt(tokenizer: tok.Tokenizer, text: str) -> np.ndarray:
    """int32 [P]: the prompt with the tokenizer's BOS first (where it has one)."""
    return np.asarray(tokenizer.encode(text, add_bos=tokenizer.bos_id is not None), np.int32)


# ---------------------------------------------------------------------------------------------
# Generators: prompts (a list of int32 [P_i]) → generated ids [N, NEW_TOKENS]
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model",))
def _next_token(model, params, tokens_BxT, at_B):
    """The argmax [B] of the logits at position at_B of each row, full attention (a LandmarkLM
    reads the raw rows with landmarks inserted)."""
    if isinstance(model, landmark.LandmarkLM):
        lc = model.config
        F = lc.mem_freq
        aug = landmark.insert_landmarks(tokens_BxT, F, lc.landmark_id)
        is_lm = jnp.broadcast_to(landmark.landmark_mask(aug.shape[1], F), aug.shape)
        logits = model.apply({"params": params}, aug, is_landmark=is_lm)
        at_B = at_B + at_B // F                            # where raw token t lands
    else:
        logits = model.apply({"params": params}, tokens_BxT)
    picked = jnp.take_along_axis(logits, at_B[:, None, None], axis=1)[:, 0]
    return jnp.argmax(picked, axis=-1).astype(jnp.int32)


def full_generate(model, params, prompts: Sequence[np.ndarray], num_tokens: int = NEW_TOKENS, *,
                  pad_id: int = 0, min_len: int = 64, batch: int = 8) -> np.ndarray:
    """int32 [N, num_tokens]: greedy decoding with full attention (a `Transformer`, or a
    `LandmarkLM` with landmarks inserted). Rows are right-padded to a power of two >= `min_len`
    (one compiled step per padded length) and each new token is read from a full causal pass, so the
    padding after a row's end never reaches it."""
    params = jax.device_get(params)
    out = np.zeros((len(prompts), num_tokens), np.int32)
    for b in range(0, len(prompts), batch):
        rows = prompts[b:b + batch]
        lens = np.array([len(r) for r in rows])
        T = _pow2(int(lens.max()) + num_tokens, min_len)
        tokens = np.full((len(rows), T), pad_id, np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        idx = np.arange(len(rows))
        for t in range(num_tokens):
            nxt = np.asarray(_next_token(model, params, tokens, lens + t - 1))
            tokens[idx, lens + t] = nxt
            out[b + idx, t] = nxt
    return out


def _pow2(n: int, least: int) -> int:
    """The smallest power of two >= max(n, least)."""
    return 1 << (max(n, least) - 1).bit_length()


def memory_generate(model, params, prompts: Sequence[np.ndarray], num_tokens: int = NEW_TOKENS,
                    *, top_k: int = TOP_K, chunk_len: int = CHUNK_LEN,
                    selection: str = "per_token_and_head", positions: str = "llama"
                    ) -> np.ndarray:
    """int32 [N, num_tokens]: greedy decoding with the block memory, one prompt at a time (as
    the official script), `landmark_memory.memory_generate`; the cache holds every block of the
    longest prompt (rounded up to a power of two, so lengths share the two compiled steps)."""
    params = jax.device_get(params)
    lc = model.config
    blocks = (max(len(p) for p in prompts) + num_tokens) // lc.mem_freq
    cache_blocks = _pow2(max(blocks, top_k, 1), 1)
    out = [np.asarray(landmark_memory.memory_generate(
               params, lc, np.asarray(p)[None], num_tokens, chunk_len=chunk_len, top_k=top_k,
               cache_blocks=cache_blocks, selection=selection, positions=positions))[0]
           for p in prompts]
    return np.stack(out).astype(np.int32)


def run(generators: dict[str, Callable], tokenizer: tok.Tokenizer, *,
        lengths: Sequence[int] = LENGTHS, trials: int = TRIALS, seed: int = 0,
        num_tokens: int = NEW_TOKENS) -> dict:
    """The official protocol: {"accuracy": {METHOD: {n_garbage: fraction right}}, "prompt_tokens":
    {n_garbage: mean prompt length in tokens}, "answers": {METHOD: {n_garbage: [int | None]}},
    "pass_keys": {n_garbage: [int]}}; `generators[METHOD](prompts, num_tokens) -> ids [N, n]`."""
    prompts = official_prompts(lengths, trials, seed)
    result = {"accuracy": {}, "answers": {}, "prompt_tokens": {},
              "pass_keys": {n: [k for _, k in p] for n, p in prompts.items()}}
    encoded = {n: [encode_prompt(tokenizer, text) for text, _ in p] for n, p in prompts.items()}
    for n, rows in encoded.items():
        result["prompt_tokens"][n] = float(np.mean([len(r) for r in rows]))
    for name, gen in generators.items():
        for n, rows in encoded.items():
            ids = gen(rows, num_tokens)
            answers = [first_integer(tokenizer.decode(r, skip_special=True)) for r in ids]
            right = [a == k for a, (_, k) in zip(answers, prompts[n])]
            result["accuracy"].setdefault(name, {})[n] = float(np.mean(right))
            result["answers"].setdefault(name, {})[n] = answers
    return result
