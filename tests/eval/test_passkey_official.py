"""The official zero-shot passkey test (eval/passkey_official.py, `python -m eval.passkey
--protocol official`) on a pretrained LLaMA fine-tuned with landmarks
(train/configs/landmark.py:hf=..., the trainer's init_from_hf into a LandmarkLM), and memory
generation with the official LLaMA positions (models/landmark_memory.py: memory_generate).

Fixtures: tests/data/hf/llama_gqa (vocabulary 256, GQA, llama3 rope scaling, untied head) with the
LLaMA-2-style SentencePiece tokenizer tests/data/hf/tok_sp_llama (500 ids; + LANDMARK = 501, so
the embedding and head grow).
"""
import json
import pathlib
import random

import jax
import numpy as np
import pytest

from eval import landmark_perplexity, passkey, passkey_official
from models import landmark_memory, pretrained
from train import trainer
from train.configs import landmark as landmark_configs

HF = pathlib.Path(__file__).resolve().parents[1] / "data" / "hf"
VARIANT = f"hf={HF / 'llama_gqa'},tokenizer={HF / 'tok_sp_llama'}"


# ---------------------------------------------------------------------------------------------
# The official prompt
# ---------------------------------------------------------------------------------------------
def test_official_prompt_reproduces_the_official_text():
    # random.Random(0): randint(0, 100) = 49 (prefix), randint(1, 50000) = 49674 (the key),
    # the draws of llama/run_test.py's generate_prompt in its order.
    text, key = passkey.official_prompt(100, random.Random(0))
    assert key == 49674
    assert text == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.\n"
        "The grass is green. The sky is blue. The sun is y\n"
        "The pass key is 49674. Remember it. 49674 is the pass key.\n"
        "The grass is green. The sky is blue. The sun is yel\n"
        "What is the pass key? The pass key is")
    text, key = passkey.official_prompt(0, random.Random(1))
    assert key == 37304 and text.split("\n")[1:4:2] == ["", ""]
    text, key = passkey.official_prompt(500, random.Random(7))
    lines = text.split("\n")
    assert key == 9887 and len(lines[1]) + len(lines[3]) == 500 and len(lines[1]) == 165
    assert lines[3].startswith("The grass is green. The sky is blue.")
    # One Random per run, drawn lengths-outer / trials-inner as the official loop.
    rng = random.Random(3)
    expected = [passkey.official_prompt(n, rng) for n in (0, 100) for _ in range(2)]
    got = passkey_official.official_prompts((0, 100), 2, 3)
    assert got[0] + got[100] == expected
    assert passkey_official.LENGTHS[-1] == 38000 and passkey_official.TRIALS == 50
    with pytest.raises(ValueError, match=r"n_garbage=-1 must be an integer in \[0, "):
        passkey.official_prompt(-1, random.Random(0))


def test_first_integer_is_the_official_answer():
    assert passkey_official.first_integer(" 49674. Remember it") == 49674
    assert passkey_official.first_integer("abc 12 34") == 12
    assert passkey_official.first_integer("no digits") is None


# ---------------------------------------------------------------------------------------------
# LLaMA + landmarks: the config, the loaded body, memory generation
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_landmark():
    """(config, LandmarkLM, its params loaded from llama_gqa through the trainer's path)."""
    c = landmark_configs.get_config(VARIANT)
    model = trainer.build_model(c.model)
    params = pretrained.params_for(trainer.body_config(model), c.init_from_hf)
    return c, model, jax.device_get(params)


def test_hf_variant_is_the_checkpoint_with_landmarks(hf_landmark):
    c, model, params = hf_landmark
    lc = model.config
    body = lc.model
    assert (body.num_kv_heads, body.mlp, body.norm, body.rope_interleaved, body.rope_base,
            body.tie_embeddings, body.attention) == (2, "swiglu", "rmsnorm", False, 500000.0,
                                                     False, "landmark")
    assert body.rope_scaling.kind == "llama3"
    assert (lc.mem_freq, lc.landmark_id, body.vocab_size) == (50, 500, 501)
    assert c.data.tokenizer.endswith("tok_sp_llama+LANDMARK")
    emb = params["embed"]["embedding"]
    np.testing.assert_allclose(emb[256:], np.broadcast_to(emb[:256].mean(0), (245, 64)),
                               atol=1e-8)     # the mean in another summation order
    # Without a landmark in the window the grouped softmax is the causal softmax: the loaded
    # LandmarkLM computes transformers' logits (the first 256 of its 501 outputs); tolerance as
    # tests/models/test_pretrained.py's float32 parity.
    ref = np.load(HF / "llama_gqa" / "reference.npz")
    logits = jax.jit(model.apply)({"params": params}, ref["input_ids"])
    np.testing.assert_allclose(np.asarray(logits)[..., :256], ref["logits"], atol=1e-5, rtol=0)
    paper = landmark_configs.get_config(VARIANT + ",size=paper")
    trainer.validate_config(paper)
    assert (paper.num_steps, paper.batch_size, paper.seq_len, paper.optim.lr,
            paper.optim.weight_decay, paper.optim.grad_accum, paper.model.dtype) == (
        15000, 128, 512, 2e-5, 0.1, 8, "bfloat16")
    with pytest.raises(ValueError, match="size=tiny|paper"):
        landmark_configs.get_config(VARIANT + ",size=huge")


def test_memory_generation_retrieving_every_block_is_full_attention(hf_landmark):
    """With top_k >= the blocks there are, the official LLaMA positions place every retrieved
    block at its own position (relative to the queries): memory decoding then computes full
    landmark attention, so its greedy tokens equal full attention's. Blocks of 50 tokens, chunks
    of 50, a 150-token prompt and 10 new tokens: 0 to 3 blocks cached, 4 retrieved (the
    lm_benchmark positions, which compress the slots, decode other tokens from the third on)."""
    _, model, params = hf_landmark
    # ids the checkpoint knows (its 256; the rows grown for 256..500 are all the mean row)
    prompt = np.random.default_rng(0).integers(3, 256, (1, 150)).astype(np.int32)
    full = passkey_official.full_generate(model, params, list(prompt), 10)
    mem = landmark_memory.memory_generate(params, model.config, prompt, 10, chunk_len=50,
                                          top_k=4, cache_blocks=4, positions="llama")
    np.testing.assert_array_equal(np.asarray(mem), full)
    with pytest.raises(ValueError, match="positions='abs' is not allowed"):
        landmark_memory.memory_generate(params, model.config, prompt, 2, chunk_len=50, top_k=2,
                                        positions="abs")


# ---------------------------------------------------------------------------------------------
# End to end: fine-tune a few steps, then the official protocol from the CLI
# ---------------------------------------------------------------------------------------------
def test_finetune_then_official_protocol_cli(tmp_path, capsys):
    c = landmark_configs.get_config(VARIANT)
    c.num_steps = 2
    summary = trainer.train(c, tmp_path / "run", devices=jax.devices()[:1])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["init_from_hf"] == str(HF / "llama_gqa") and summary["step"] == 2
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert passkey.main(["--protocol", "official", "--workdir", str(tmp_path / "run"),
                         "--base", str(HF / "llama_gqa"), "--lengths", "0,100", "--trials", "2",
                         "--top_k", "4", "--chunk_len", "50"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["protocol"] == "official" and out["tokenizer"].endswith("+LANDMARK")
    assert set(out["accuracy"]) == {"landmark_memory", "base"}
    for accs in out["accuracy"].values():
        assert set(accs) == {"0", "100"} and all(v in (0.0, 0.5, 1.0) for v in accs.values())
    # The task line alone is > 100 tokens of this tokenizer: several 50-token blocks in memory.
    assert 100 < out["prompt_tokens"]["0"] < out["prompt_tokens"]["100"]
    # Table 1 of the same run, the tiny grid: held-out windows of its own prose (tokenized by its
    # tokenizer), full attention and the three selection methods (a cache of 3 blocks, top-1, so
    # the choice matters).
    assert landmark_perplexity.main(["--workdir", str(tmp_path / "run"), "--grid", "tiny",
                                     "--windows", "2"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    names = ["full"] + [f"k1_cache3_chunk50_{m}" for m in landmark_memory.SELECTIONS]
    assert list(ppl) == names and all(set(ppl[n]) == {"200"} for n in names)
    assert all(1 < ppl[n]["200"] < 1e4 for n in names)
    assert ppl[names[1]]["200"] != ppl[names[2]]["200"]   # per token and head vs max over heads


def test_table1_grids_and_bad_input():
    grid = landmark_perplexity.OFFICIAL_GRID
    assert {s.length for s in grid} == {512, 2048, 4096} and {s.top_k for s in grid} == {2, 3, 4}
    assert {s.selection for s in grid} == set(landmark_memory.SELECTIONS)
    assert all(s.top_k <= s.cache and s.chunk in (250, 300, 350) for s in grid)
    with pytest.raises(ValueError, match="grid='huge' is not allowed"):
        landmark_perplexity.table1(None, None, None, grid="huge")
