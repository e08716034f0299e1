"""Build the Hugging Face reference fixtures in tests/data/hf/ (see its README.md).

mnemax re-implements GPT-2, LLaMA and T5 and their tokenizers in JAX; this script writes what those
re-implementations are tested against, using the real `transformers` code on CPU in float32:

- model fixtures `gpt2`, `gpt2_bare`, `llama_gqa`, `llama_tied`, `t5_relu`, `t5_gated`: a tiny
  randomly initialised model saved with `save_pretrained` (config.json, generation_config.json and
  safetensors, sharded for `llama_tied`) plus `reference.npz` with inputs, logits and greedy
  decodes;
- tokenizer fixtures `tok_bpe` (byte-level BPE, GPT-2 style), `tok_sp` (SentencePiece unigram,
  T5 style), `tok_sp_llama` (SentencePiece BPE with byte fallback, LLaMA-2 style): trained here on
  Python's own documentation (`pydoc_data.topics`), saved as the `tokenizers`/`sentencepiece`
  file and again by the `transformers` tokenizer class's `save_pretrained`, plus `reference.json`;
- `OUT/VERSIONS.json`: the versions of everything above.

Nothing is downloaded. `--seed` changes every fixture (weights, inputs and the tokenizers' training
text), so regenerating into another folder gives checkpoints the tests never saw; `--only` picks
fixtures by name. `--big_llama_params N` instead writes one random LLaMA-shaped checkpoint of about
N float32 parameters (sharded safetensors, no reference outputs) for memory tests, building it
tensor by tensor so peak memory stays near one shard.

Torch is never a mnemax dependency, and this script is not part of `make test`. It runs in its own
venv (CPU wheels work):

    python3.12 -m venv /path && /path/bin/pip install torch 'transformers<5' sentencepiece \
        tokenizers safetensors
    /path/bin/python tools/make_hf_fixtures.py --out tests/data/hf [--seed 0] [--only gpt2,tok_sp]
    /path/bin/python tools/make_hf_fixtures.py --out /tmp/big --big_llama_params 1e9

The committed fixtures were made with Python 3.12.1, torch 2.14.1, transformers 4.57.6,
tokenizers 0.22.2, sentencepiece 0.2.3, safetensors 0.8.0, numpy 2.5.5.
"""
import argparse
import io
import json
import pathlib
import platform
import random

import numpy as np
import safetensors.torch
import sentencepiece
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

VOCAB = 256  # every model fixture's vocabulary
GREEDY_NEW = 16  # tokens each greedy decode generates
# Random-init std of GPT-2 and LLaMA weights: the default 0.02 leaves attention almost uniform
# at these widths (scores ~0.03), so position handling would barely show in the logits.
INIT_STD = 0.1

# --other_shapes: config fields that replace the committed fixtures' shapes (checkpoints the
# tests never saw: other widths, head counts, depths, head dims ≠ width / heads, buckets).
OTHER_SHAPES = {
    "gpt2": dict(n_embd=48, n_head=6, n_layer=3, n_inner=80),
    "llama": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                  intermediate_size=160, num_hidden_layers=3),
    "t5": dict(d_model=48, d_kv=16, num_heads=4, d_ff=80, relative_attention_num_buckets=16,
               relative_attention_max_distance=32),
}
SHAPES: dict = {}   # the active overrides (set by main)


# ---------------------------------------------------------------- models


def _greedy(logits_fn, prefix):
    """Greedy-decodes GREEDY_NEW tokens after `prefix` [B, T] by recomputing `logits_fn(ids)`
    ([B, T, V]) on the whole sequence each step. Returns greedy_tokens (the new tokens
    [B, GREEDY_NEW]), greedy_logits (the logits each step chose from, [B, GREEDY_NEW, V]) and
    greedy_min_gap (the smallest gap between the best and second-best of those logits)."""
    ids, steps = prefix, []
    for _ in range(GREEDY_NEW):
        steps.append(logits_fn(ids)[:, -1])
        ids = torch.cat([ids, steps[-1].argmax(-1, keepdim=True)], dim=1)
    logits = torch.stack(steps, dim=1)
    top2 = logits.topk(2).values
    return dict(greedy_tokens=ids[:, prefix.shape[1]:], greedy_logits=logits,
                greedy_min_gap=(top2[..., 0] - top2[..., 1]).min())


def _generate(model, inputs, **kw):
    """`model.generate` greedy, exactly GREEDY_NEW new tokens: no EOS, so nothing stops or is
    suppressed early (generate fills unset arguments from model.generation_config, so the EOS is
    removed there). Returns the full output ids."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                          max_new_tokens=GREEDY_NEW, min_new_tokens=GREEDY_NEW, **kw)


def _decoder_reference(logits_fn):
    """Random inputs and a greedy prompt for a decoder-only model, with their outputs."""
    input_ids = torch.randint(0, VOCAB, (2, 12))
    prompt = torch.randint(0, VOCAB, (1, 5))
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                logits=logits_fn(input_ids), greedy_prompt=prompt, **_greedy(logits_fn, prompt))


def _lm_reference(model):
    """`_decoder_reference` for a *ForCausalLM model, its greedy decode checked against
    `model.generate`."""
    ref = _decoder_reference(lambda ids: model(ids, attention_mask=torch.ones_like(ids)).logits)
    prompt = ref["greedy_prompt"]
    assert torch.equal(_generate(model, prompt)[:, prompt.shape[1]:], ref["greedy_tokens"])
    return ref


def _write(folder, ref):
    """Writes `ref` (name -> tensor) to folder/reference.npz: int64 as int32, floats as float32."""
    arrays = {k: v.detach().numpy() for k, v in ref.items()}
    arrays = {k: a.astype(np.int32 if a.dtype == np.int64 else np.float32)
              for k, a in arrays.items()}
    np.savez(folder / "reference.npz", **arrays)


def _saved_keys(folder):
    """Names of all tensors saved in folder's safetensors files."""
    keys = set()
    for f in folder.glob("*.safetensors"):
        keys |= safetensors.torch.load_file(f).keys()
    return keys


def _gpt2_config(n_embd):
    """2 layers, 4 heads, 64 positions, gelu_new, no dropout; BOS = EOS = the last id (the
    default, 50256, lies outside this vocabulary)."""
    kw = {**dict(n_embd=n_embd, n_layer=2, n_head=4), **SHAPES.get("gpt2", {})}
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64,
                                   activation_function="gelu_new",
                                   bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                                   initializer_range=INIT_STD, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, attn_implementation="eager", **kw)


def gpt2(folder):
    """GPT2LMHeadModel (keys `transformer.h.0...`, head tied to wte and not saved)."""
    model = transformers.GPT2LMHeadModel(_gpt2_config(n_embd=64)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    assert "transformer.h.0.attn.c_attn.weight" in _saved_keys(folder)
    return _lm_reference(model)


def gpt2_bare(folder):
    """GPT2Model, the base model without a head: saved keys have no `transformer.` prefix (the
    layout of the hub's `gpt2` checkpoint). Logits come from the tied head, hidden @ wte.T; the
    greedy decode is checked against GPT2LMHeadModel loaded from the bare folder."""
    model = transformers.GPT2Model(_gpt2_config(n_embd=32)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    keys = _saved_keys(folder)
    assert "h.0.attn.c_attn.weight" in keys and "wte.weight" in keys, keys
    assert not any(k.startswith("transformer.") for k in keys), keys

    def logits(ids):
        hidden = model(ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return hidden @ model.wte.weight.T

    ref = _decoder_reference(logits)
    with_head = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager")
    prompt = ref["greedy_prompt"]
    assert torch.equal(_generate(with_head.eval(), prompt)[:, prompt.shape[1]:],
                       ref["greedy_tokens"])
    return ref


def llama_gqa(folder):
    """LlamaForCausalLM with grouped-query attention (4 query heads, 2 KV heads), untied head and
    llama3 RoPE scaling whose original context (16) is short enough to change the logits."""
    rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rope_theta=500000.0, hidden_act="silu", rms_norm_eps=1e-5,
              tie_word_embeddings=False, initializer_range=INIT_STD,
              attn_implementation="eager")
    kw.update(SHAPES.get("llama", {}))
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(rope_scaling=rope_scaling, **kw)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    ref = _lm_reference(model)
    unscaled = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    unscaled.load_state_dict(model.state_dict())
    diff = (unscaled(ref["input_ids"]).logits - ref["logits"]).abs().max()
    print(f"  llama3 scaling moves the logits by up to {diff:.3g}")
    assert diff > 1e-2
    return ref


def llama_tied(folder):
    """LlamaForCausalLM with tied embeddings, plain RoPE, as many KV heads as query heads, saved
    in several safetensors shards with an index."""
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4)
    kw.update({k: v for k, v in SHAPES.get("llama", {}).items() if k != "num_key_value_heads"})
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=64, hidden_act="silu", rms_norm_eps=1e-6,
        tie_word_embeddings=True, initializer_range=INIT_STD, attn_implementation="eager", **kw)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    assert (folder / "model.safetensors.index.json").exists()
    return _lm_reference(model)


def _t5(folder, **kw):
    """T5ForConditionalGeneration (d_model 32, 4 heads of 8, 2 encoder layers, 8 relative
    buckets up to distance 20) with its reference: logits for teacher-forced decoder inputs, the
    encoder output, and the 16 tokens greedy decoding generates after the decoder start token."""
    kw = {**dict(d_model=32, d_kv=8, d_ff=64, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=20), **SHAPES.get("t5", {}), **kw}
    config = transformers.T5Config(
        vocab_size=VOCAB, num_layers=2, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager",
        **kw)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    input_ids = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones_like(input_ids)
    decoder_input_ids = torch.randint(0, VOCAB, (2, 7))
    decoder_input_ids[:, 0] = config.decoder_start_token_id
    encoder_hidden = model.encoder(input_ids, attention_mask=mask).last_hidden_state
    greedy = _greedy(lambda dec: model(encoder_outputs=(encoder_hidden,), attention_mask=mask,
                                       decoder_input_ids=dec).logits,
                     torch.full((2, 1), config.decoder_start_token_id))
    # A fresh cache grows per layer; generate's default one is sized by config.num_hidden_layers,
    # which T5Config maps to the encoder's num_layers (IndexError with more decoder layers).
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(),
                                             transformers.DynamicCache())
    generated = _generate(model, input_ids, past_key_values=cache)
    assert torch.all(generated[:, 0] == config.decoder_start_token_id)
    assert torch.equal(generated[:, 1:], greedy["greedy_tokens"])
    logits = model(input_ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
    return dict(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                logits=logits, encoder_hidden=encoder_hidden, **greedy)


def t5_relu(folder):
    """T5 v1.0 kind: ReLU feed-forward, tied head (decoder output scaled by d_model**-0.5),
    2 decoder layers."""
    return _t5(folder, feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=2)


def t5_gated(folder):
    """T5 v1.1 kind: gated-GELU (gelu_new) feed-forward, untied head, 3 decoder layers."""
    return _t5(folder, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
               num_decoder_layers=3)


# ---------------------------------------------------------------- tokenizers

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京",
    "  leading and trailing spaces  ",
    " one leading space",
    "line one\nline two\n\nline four\n",
    "Digits 0123456789, 3.14159 and 1e-5; 2024-01-31.",
    "",
    "   ",
    "def f(x):\n    return x ** 2\t# tab",
    "Emoji 🙂, symbols ©®™ ≤ ≥ and CamelCaseWords",
    "Specials in text: <|endoftext|> <s> </s> <unk> <pad> <extra_id_0>",
    "A class definition may be decorated by one or more decorator expressions.",
]


def _corpus(seed):
    """Training text: a seed-dependent 90% of the paragraphs of Python's documentation topics,
    as lines (SentencePiece reads one sentence per line)."""
    from pydoc_data.topics import topics
    paragraphs = [p for text in topics.values() for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    chosen = rng.sample(paragraphs, k=len(paragraphs) * 9 // 10)
    return [line for p in chosen for line in p.splitlines() if line.strip()]


def _tok_reference(folder, tok, kwargs, package_encode, package_decode):
    """reference.json for a `transformers` tokenizer `tok` built with `kwargs`, next to what the
    plain tokenizers/sentencepiece package gives (`package_encode`/`package_decode`)."""
    cases = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        package_ids = package_encode(text)
        cases.append(dict(text=text, ids=ids, ids_special=tok.encode(text),
                          decoded=tok.decode(ids), package_ids=package_ids,
                          package_decoded=package_decode(package_ids)))
        if package_ids != ids:
            print(f"  package differs on {text!r}:\n    transformers {ids}\n    package      "
                  f"{package_ids}")
    special = {name: getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")}
    ref = dict(tokenizer_class=type(tok).__name__, kwargs=kwargs, vocab_size=len(tok),
               special_ids=special, additional_special_ids=tok.additional_special_tokens_ids,
               clean_up_tokenization_spaces=tok.clean_up_tokenization_spaces, cases=cases)
    (folder / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")


def tok_bpe(folder, seed):
    """GPT-2-style byte-level BPE (vocab 500, `<|endoftext|>`) trained with `tokenizers`, saved as
    tokenizer.json, then loaded by GPT2TokenizerFast and saved again (the hub's layout)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    hf = transformers.GPT2TokenizerFast(tokenizer_file=str(path))
    hf.save_pretrained(folder)
    plain = tokenizers.Tokenizer.from_file(str(path))
    _tok_reference(folder, hf, {}, lambda t: plain.encode(t).ids,
                   lambda ids: plain.decode(ids, skip_special_tokens=False))


def _train_sp(path, seed, **kw):
    """Trains a SentencePiece model (vocab 500, all characters covered) and writes it to `path`
    (through a buffer, so no output path is recorded in the model); returns `path`."""
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)), model_writer=buffer, vocab_size=500,
        character_coverage=1.0, num_threads=1, minloglevel=2, **kw)
    path.write_bytes(buffer.getvalue())
    return path


def _sp_reference(folder, tok, kwargs, model_file):
    """`_tok_reference` next to the plain sentencepiece package loading `model_file`."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    _tok_reference(folder, tok, kwargs, sp.encode, sp.decode)


def tok_sp(folder, seed):
    """T5-style SentencePiece unigram (pad 0, eos 1, unk 2, no bos) saved as spiece.model, loaded
    by the slow T5Tokenizer (legacy=True, the hub default; 100 sentinels <extra_id_N> appended
    after the SentencePiece vocabulary as in T5) and saved again."""
    model_file = _train_sp(folder / "spiece.model", seed, model_type="unigram",
                           pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    kwargs = dict(legacy=True, extra_ids=100)
    tok = transformers.T5Tokenizer(vocab_file=str(model_file), **kwargs)
    tok.save_pretrained(folder)
    _sp_reference(folder, tok, kwargs, model_file)


def tok_sp_llama(folder, seed):
    """LLaMA-2-style SentencePiece BPE (byte fallback, digits split, identity normalisation, no
    whitespace collapsing; unk 0, bos 1, eos 2, no pad) saved as tokenizer.model, loaded by the
    slow LlamaTokenizer (legacy=False, as Llama-2's hub folder; adds BOS) and saved again."""
    model_file = _train_sp(folder / "tokenizer.model", seed, model_type="bpe",
                           byte_fallback=True, split_digits=True,
                           normalization_rule_name="identity", remove_extra_whitespaces=False,
                           allow_whitespace_only_pieces=True,
                           unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    kwargs = dict(legacy=False)
    tok = transformers.LlamaTokenizer(vocab_file=str(model_file), **kwargs)
    tok.save_pretrained(folder)
    _sp_reference(folder, tok, kwargs, model_file)


# ---------------------------------------------------------------- vision backbones (issue 20)
# Inputs are saved NHWC (`pixel_values` [B, H, W, 3], mnemax's layout); torch gets them as NCHW.
OTHER_SHAPES["clip_vision"] = dict(hidden_size=48, intermediate_size=80, num_attention_heads=6,
                                   num_hidden_layers=3, image_size=24, patch_size=6,
                                   projection_dim=20)
OTHER_SHAPES["resnet"] = dict(embedding_size=12, hidden_sizes=[24, 40, 48], depths=[2, 1, 1],
                              downsample_in_bottleneck=True, downsample_in_first_stage=True)


def _clip_vision_config(**kw):
    """Two layers of width 32 (4 heads of 8, MLP 64), 32x32 images in 8x8 patches (16 patches +
    the class token), quick_gelu, projection to 24, layer-norm eps 1e-5."""
    kw = {**dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=24,
                 hidden_act="quick_gelu"), **SHAPES.get("clip_vision", {}), **kw}
    return transformers.CLIPVisionConfig(layer_norm_eps=1e-5, attention_dropout=0.0,
                                         attn_implementation="eager", **kw)


def _vision_reference(pixels_NCHW, out):
    """pixel_values saved NHWC, every output array named as transformers names it."""
    return dict(pixel_values=pixels_NCHW.permute(0, 2, 3, 1), **out)


def _save_processor(folder, size, mean, std):
    """preprocessor_config.json as CLIPImageProcessor.save_pretrained writes it (written directly:
    the image processors need PIL, which this venv lacks) for images of `size` (bicubic resize
    of the shortest edge, centre crop) with the checkpoint's normalisation: what mnemax's
    preprocessing reads."""
    config = dict(crop_size={"height": size, "width": size}, do_center_crop=True,
                  do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                  image_mean=mean, image_processor_type="CLIPImageProcessor", image_std=std,
                  resample=3, rescale_factor=1 / 255, size={"shortest_edge": size})
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def clip_vision(folder):
    """CLIPVisionModelWithProjection (model_type clip_vision_model; keys `vision_model.…`,
    `visual_projection.weight`): image_embeds, pooler_output (post-layernorm class token) and
    last_hidden_state for 2 random images, plus a preprocessor_config.json."""
    config = _clip_vision_config()
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    _save_processor(folder, config.image_size, [0.48145466, 0.4578275, 0.40821073],
                    [0.26862954, 0.26130258, 0.27577711])
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    out = model(pixel_values=pixels)
    return _vision_reference(pixels, dict(image_embeds=out.image_embeds,
                                          pooler_output=model.vision_model(pixels).pooler_output,
                                          last_hidden_state=out.last_hidden_state))


def clip(folder):
    """CLIPModel (model_type clip, the hub's openai/clip-vit-* layout: vision_config nested,
    a tiny text tower of vocab 64 whose tensors the vision loader leaves unread):
    get_image_features for 2 random images."""
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=8)
    vision = _clip_vision_config(hidden_act="gelu").to_dict()
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    size = config.vision_config.image_size
    _save_processor(folder, size, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    pixels = torch.randn(2, 3, size, size)
    feats = model.get_image_features(pixel_values=pixels)
    return _vision_reference(pixels, dict(image_embeds=feats))


def _randomise_batch_norms(model):
    """Random scale, shift and running statistics in every BatchNorm2d (a fresh model has mean 0,
    var 1, scale 1, shift 0, which would hide a normalisation that ignores them)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def _resnet(folder, **kw):
    kw = {**kw, **SHAPES.get("resnet", {})}
    model = transformers.ResNetModel(transformers.ResNetConfig(**kw)).eval()
    _randomise_batch_norms(model)
    model.save_pretrained(folder, safe_serialization=True)
    _save_processor(folder, 32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    pixels = torch.randn(2, 3, 32, 28)   # not square: strides and padding on both axes differ
    out = model(pixel_values=pixels)
    return _vision_reference(pixels, dict(
        pooler_output=out.pooler_output.flatten(1),
        last_hidden_state=out.last_hidden_state.permute(0, 2, 3, 1)))


def resnet(folder):
    """ResNetModel, bottleneck layers (ResNet-50's kind: 1x1 reduce by 4, 3x3, 1x1), stem width 8,
    stages of 16 and 32 channels with 1 and 2 layers, downsampling in the 3x3 conv as the hub's
    microsoft/resnet-50; batch norms with random running statistics. pooler_output flattened
    [B, C], last_hidden_state NHWC, for 2 random 32x28 images."""
    return _resnet(folder, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2],
                   layer_type="bottleneck", downsample_in_first_stage=False,
                   downsample_in_bottleneck=False)


def resnet_basic(folder):
    """ResNetModel, basic layers (ResNet-18/34's kind: two 3x3 convs), stem width 8, stages of 8
    and 16 channels with 2 and 1 layers, downsample_in_first_stage (a stride-2 first stage)."""
    return _resnet(folder, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1],
                   layer_type="basic", downsample_in_first_stage=True)


# ---------------------------------------------------------------- driver

MODELS = [gpt2, gpt2_bare, llama_gqa, llama_tied, t5_relu, t5_gated, clip_vision, clip, resnet,
          resnet_basic]
TOKENIZERS = [tok_bpe, tok_sp, tok_sp_llama]
FIXTURES = {f.__name__: f for f in MODELS + TOKENIZERS}


def versions():
    """The versions that made the fixtures (written to OUT/VERSIONS.json)."""
    return dict(python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                sentencepiece=sentencepiece.__version__, safetensors=safetensors.__version__,
                numpy=np.__version__)


def build(out, seed, names):
    """Writes the fixtures `names` to out/<name>/, replacing the files there. Fixture i (in
    FIXTURES order) uses torch seed seed * 1000 + i, so fixtures differ from each other and
    between seeds."""
    for offset, (name, make) in enumerate(FIXTURES.items()):
        if name not in names:
            continue
        print(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        torch.manual_seed(seed * 1000 + offset)
        if make in TOKENIZERS:
            make(folder, seed)
        else:
            with torch.no_grad():
                _write(folder, make(folder))


def big_llama(out, n_params, seed):
    """A random LlamaForCausalLM checkpoint of about `n_params` float32 parameters in out/:
    TinyLlama's width (hidden 2048, 32 heads, 4 KV heads, MLP 5632, vocab 32000, untied head)
    with as many layers as the count needs, in 2 GB safetensors shards plus their index. Tensors
    are made shard by shard (names and shapes from the model built on the meta device), so peak
    memory is about two shards. Weights ~ N(0, 0.02), norms 1."""
    vocab, hidden, kv_width, mlp = 32000, 2048, 4 * 64, 5632
    per_layer = 2 * hidden**2 + 2 * hidden * kv_width + 3 * hidden * mlp + 2 * hidden
    layers = max(1, round((n_params - 2 * vocab * hidden - hidden) / per_layer))
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="float32")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    shards, size = [[]], 0
    for name, shape in shapes.items():
        if shards[-1] and size + 4 * shape.numel() > 2e9:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += 4 * shape.numel()
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.ones(shapes[n]) if n.endswith("norm.weight")
                   else torch.empty(shapes[n]).normal_(0, 0.02, generator=generator)
                   for n in names}
        safetensors.torch.save_file(tensors, out / file, metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
    count = sum(s.numel() for s in shapes.values())
    index = dict(metadata=dict(total_size=4 * count), weight_map=weight_map)
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    print(f"{count:,} parameters, {layers} layers, {4 * count / 1e9:.2f} GB in "
          f"{len(shards)} shards")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(FIXTURES),
                        help="comma-separated fixture names (default: all): "
                             + ", ".join(FIXTURES))
    parser.add_argument("--big_llama_params", type=float,
                        help="instead of the fixtures, write one random LLaMA checkpoint of "
                             "about this many parameters")
    parser.add_argument("--other_shapes", action="store_true",
                        help="the model fixtures at other shapes (OTHER_SHAPES), e.g. with "
                             "another --seed into another --out, to test on unseen checkpoints")
    args = parser.parse_args()
    if args.other_shapes:
        SHAPES.update(OTHER_SHAPES)
    names = args.only.split(",")
    unknown = set(names) - set(FIXTURES)
    if unknown:
        parser.error(f"unknown fixtures {sorted(unknown)}; known: {', '.join(FIXTURES)}")
    torch.set_default_dtype(torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "VERSIONS.json").write_text(json.dumps(versions(), indent=1) + "\n")
    if args.big_llama_params:
        big_llama(args.out, int(args.big_llama_params), args.seed)
    else:
        build(args.out, args.seed, names)


if __name__ == "__main__":
    main()
