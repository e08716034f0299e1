"""grain input pipelines: random-access source -> shard -> shuffle -> tokenize -> pack/pad -> batch.

`make_dataset(data_config, split=..., seed=..., global_batch_size=..., seq_len=...)` is what the
trainer calls. It returns a grain `DatasetIterator` over process-local batches

    {"inputs": int32 [B, T], "targets": int32 [B, T], "weights": float32 [B, T]}

with B = global_batch_size // process_count, targets[:, t] the token after inputs[:, t] (for MQAR
too), and weights 0 wherever the target is padding (MQAR: 1 only at the answer positions);
"mac_meta" and "mac_qa" batches hold documents and their questions instead
(train/data/mac_data.py, train/data/mac_qa.py),
"images" batches images and labels (train/data/images.py), "embeddings" batches embeddings
and labels (train/data/embeddings.py). Feed
a batch to a jitted step with `to_global_array(batch, mesh)`.

The pipeline (grain 0.2.18 "Dataset" API: `grain.MapDataset` / `grain.IterDataset`):

1. source: an `ArrayRecordDataSource` from a TFDS array_record build (`source="tfds"`), or an
   in-memory random-access list (`source="memory"`); see `make_source`;
2. shard by process: process p keeps records p, p + P, p + 2P, ... of the first
   floor(N / P) * P (`grain.sharding.ShardOptions` semantics with drop_remainder=True, taken from
   `ShardByJaxProcess` unless process_index/process_count are given), so shards are disjoint
   and equally long;
3. shuffle with `seed` (a bijective index shuffle, reseeded per epoch), repeat `num_epochs`
   times (None: forever);
4. text: tokenize each document with `data.tokenizer` (default "byte"; `data_tokenizer`) and
   append EOS (BOS first if `add_bos`); then either pack
   (`grain.experimental.ConcatThenSplitIterDataset`: the document stream is concatenated and cut
   into windows of T + 1 tokens, a document may span windows; only the very end of a finite
   stream is padded, with the tokenizer's PAD, or EOS where it has none) or pad (each document
   cut/padded to T + 1 tokens on its own); `data.windows="random"` instead reads the split as
   one token stream and each record is a window at a random offset of it (the official
   landmark-attention layout, train/data/token_stream.py); `mask_after_eos` weighs 0 the
   targets of EOS inputs;
5. window [T + 1] -> inputs = window[:-1], targets = window[1:]; batch B rows, dropping a last
   incomplete batch (so an epoch of evaluation may skip up to B - 1 rows; pick sizes that
   divide when every row matters);
6. `worker_count > 0` moves everything into grain worker processes (`mp_prefetch`); the default
   0 runs in the calling process (no multiprocessing).

`data_config` may be a full `default_data_config(name)` or only the fields that differ from it
(`resolve_data_config` fills in the rest and rejects unknown fields).

Determinism and checkpointing. Given the same config, seed, split and process layout the batches
are identical on every run. The returned iterator has `get_state() -> dict` (JSON-serialisable)
and `set_state(dict)`; restoring a state into a fresh iterator from the same `make_dataset`
call continues with exactly the batches the saved iterator would have produced next. With Orbax
(orbax-checkpoint 0.12.8 + grain 0.2.18) the handler that works is
`grain.checkpoint.CheckpointHandler` (the same class as `grain.python.PyGrainCheckpointHandler`),
with args `grain.checkpoint.CheckpointSave(iterator)` / `grain.checkpoint.CheckpointRestore(iterator)`
(aliases `grain.python.PyGrainCheckpointSave/Restore`). They are registered with Orbax at import,
so inside a `CheckpointManager` the data item is simply

    manager.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it)))
    manager.restore(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(it)))

The handler writes one JSON file per process, `process_{i}-of-{n}.json`, with i, n from
`jax.process_index()/process_count()` (so every process saves and restores its own iterator);
restore calls `set_state` on the iterator passed in and returns it. A state belongs to one
pipeline layout: restore it into an iterator made with the same data config (in particular the
same `worker_count`: with workers the state is that of grain's multiprocess prefetcher), seed,
batch size, seq_len and process layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from train.data import (birdie_data, catalog, embeddings, images, mac_data, mac_qa,
                        memory_bench, mqar, passkey_data, recall, text_corpus, token_stream,
                        tokenizer)
from train.objectives import birdie

DATASET_NAMES = ("mqar", "text", "tfds", "birdie", "recall", "passkey", "mac_lm", "mac_meta",
                 "mac_qa", "images", "embeddings", "memory_bench")
SOURCES = ("tfds", "memory")


# ---------------------------------------------------------------------------------------------
# Configs.


def objective_settings_config(settings: birdie.ObjectiveSettings = birdie.PAPER_SETTINGS
                              ) -> ml_collections.ConfigDict:
    """`data.objective_settings` of datasets "birdie" and "recall": every field of
    train/objectives/birdie.py ObjectiveSettings (defaults: the paper's), as a ConfigDict.

    deshuffle_fractions (0.5, 1.0): one deshuffling configuration per fraction of units shuffled;
    deshuffle_mean_chunk 1.0: the unit (1: single tokens, > 1: chunks of that mean length);
    selective_copying_query "either": the query "before" / "after" the context, or half each;
    selective_copying_spans (4, 32), selective_copying_delimiters (1, 8): their lengths (min,
    max); paradigm_placement "either": the paradigm token first ("prepend"), last ("append") or
    last half of the time; ul2_s_prefix (0.75, 0.75): the S-denoiser's prompt share [low, high].
    birdie.COMPACT_SETTINGS are the CPU figures' (chunks of 8, query first, 2-16 / 2-6,
    prepended, uniform split).
    """
    return ml_collections.ConfigDict(settings.as_dict())


def default_data_config(name: str) -> ml_collections.ConfigDict:
    """The data config of dataset `name` (one of DATASET_NAMES), every field commented."""
    if name not in DATASET_NAMES:
        raise ValueError(f"data_config.name={name!r} is unknown; allowed: {DATASET_NAMES}")
    c = ml_collections.ConfigDict()
    # Which dataset: "mqar" (synthetic associative recall), "text" (Python docs prose, offline)
    # or "tfds" (any TFDS catalog dataset with a text feature, e.g. pg19, read as array_record).
    c.name = name
    # Where TFDS array_record builds live. "" means $MNEMAX_DATA_DIR or ~/.cache/mnemax/tfds for
    # the local builders (mqar, text), and TFDS's own default (~/tensorflow_datasets) for "tfds".
    c.data_dir = ""
    # Shuffle records (with the seed given to make_dataset; reshuffled every epoch).
    c.shuffle = True
    # grain worker processes; 0 = produce batches in the calling process.
    c.worker_count = 0
    # How processes split the data. "rows": every process reads the global stream and keeps its
    # rows of each global batch, so the run sees the same batches whatever the process count
    # (small and synthetic data, reproducibility across topologies); "records": each process
    # reads a disjoint 1/P of the records (large corpora; batches then depend on P).
    c.shard_mode = "rows"
    # Threads reading records from the source, and how many records they read ahead.
    c.read_threads = 1
    c.read_buffer = 64
    if name == "mqar":
        # "tfds": build an array_record TFDS dataset once into data_dir and read it;
        # "memory": generate example i on the fly when read (same records, nothing written).
        c.source = "tfds"
        # P: key-value pairs at the start of each sequence (Zoology's num_kv_pairs).
        c.num_pairs = 8
        # Q: queries after the pairs (1 <= Q <= P); weights are 1 at these Q positions.
        c.num_queries = 8
        # Keys are ids in [lo, hi); values in the disjoint [lo, hi) below. Both inside the byte
        # range by default, so the byte tokenizer's vocabulary (320) fits every task.
        c.key_range = (1, 128)
        c.value_range = (128, 256)
        # Id between queries; outside both ranges.
        c.fill_token = 0
        # Examples in the "train" and "test" splits.
        c.num_train = 2048
        c.num_test = 256
        # Seed of the dataset's content (which keys, values, queries); the shuffle seed is
        # make_dataset's `seed`.
        c.data_seed = 0
    elif name == "text":
        # "tfds": the "python_docs" TFDS build in data_dir; "memory": the same documents as a list.
        c.source = "tfds"
        # A folder of local files to read instead of Python's docs (e.g. arXiv math .tex
        # sources): one document per file matching text_patterns, built once into data_dir as
        # the "local_text" TFDS dataset (text_corpus.local_data_source). "": Python's docs.
        c.text_dir = ""
        c.text_patterns = text_corpus.DEFAULT_PATTERNS
        # Percent of documents (chosen by hash of their id) in split "validation".
        c.validation_percent = 10
        # True: concatenate documents (EOS-separated) into full windows; False: one document per
        # row, cut or padded to seq_len + 1.
        c.pack = True
        # Put BOS before every document (EOS always follows one).
        c.add_bos = False
        # Tokenizer (train/data/tokenizer.py: load_tokenizer): "byte" (UTF-8 bytes + specials,
        # V = 320), or a tokenizer.json / SentencePiece .model file or a folder holding one,
        # "+NAME,..." appending specials ("+PAD,LANDMARK"). It must have EOS (and BOS with
        # add_bos); model.vocab_size must be >= its vocab_size.
        c.tokenizer = "byte"
        # Windows: "packed" (the documents, shuffled, concatenated and cut into consecutive
        # windows, as set by `pack`) or "random" (official lm_benchmark, train/data/token_stream.py:
        # the split's documents in source order as one EOS-separated stream, each row a window at
        # a uniformly random offset of it).
        c.windows = "packed"
        # Weight 0 on the target of an EOS input (official get_batch: a document's last token
        # does not predict the next document's first); both window kinds.
        c.mask_after_eos = False
        # windows="random": rows carry stream_phase [T] = stream index mod this (the landmark
        # objective puts a landmark after every mem_freq-th token of the stream); 0: none.
        c.stream_mem_freq = 0
        # windows="random": folder where each split's token stream is written once and read
        # memory-mapped ("" keeps it in memory: small corpora).
        c.stream_dir = ""
    elif name == "birdie":
        # Packed rows of Birdie objectives (train/data/birdie_data.py), generated when read.
        # Objective set: "birdie" | "ul2" | "ntp" (plain next-token prediction).
        c.objectives = "birdie"
        # Text the objectives read: "text" (local prose) | "local_text" (the files of text_dir)
        # | "tfds" (a prepared TFDS text dataset, tfds_name/text_key) | "phonebook" | "mix"
        # (prose and phone books, half each). Only "phonebook" and "mix" hold the task's text.
        c.corpus = "mix"
        # Tokenizer of the text (load_tokenizer spec); a non-byte one's ids are mapped around
        # Birdie's 64 specials (birdie_data.to_birdie_ids): model vocab = its vocab + 64.
        c.tokenizer = "byte"
        # corpus "local_text": the folder and file patterns; corpus "tfds": dataset and feature.
        c.text_dir = ""
        c.text_patterns = text_corpus.DEFAULT_PATTERNS
        c.tfds_name = ""
        c.text_key = "text"
        # Probability that a drawn example is the phone-book task (prompt -> numbers).
        c.task_weight = 0.0
        # Emit the per-token prefix flag (False for models without a prefix: the Transformer).
        c.with_prefix = True
        # Phone books: entries (inclusive range) and queried names of the task.
        c.phonebook_entries = (4, 8)
        c.phonebook_queries = (1, 2)
        # Prose documents held out for "validation".
        c.validation_percent = 10
        # Rows per split (generated on read, so the train size costs nothing).
        c.num_train = 1_000_000
        c.num_validation = 256
        # Content seed; the shuffle seed is make_dataset's `seed`.
        c.data_seed = 0
        # Weights over the objective set's configurations (K floats); () = Birdie's uniform
        # mixture over classes. The Birdie controller (a trainer hook) sets it as it goes.
        c.mixture = ()
        # Row i holds only configuration i % K (the controller's balanced validation rows).
        c.objective_per_row = False
        # How the objective set is built (objective_settings_config: every field; the paper's).
        c.objective_settings = objective_settings_config()
    elif name == "recall":
        # Packed rows of the recall task and Birdie's objectives over key-value text
        # (train/data/recall.py), generated when read. The task's layout (RecallTask): queried
        # keys per example, key and value id ranges [lo, hi), a distinct query form (offset),
        # the queries also stated before the pairs.
        c.num_queries = 1
        c.key_range = (0, 8)
        c.value_range = (64, 72)
        c.query_offset = 0
        c.queries_before = False
        # Pair counts, drawn uniformly per example.
        c.pairs = (1, 2, 4, 6)
        # The pre-training objective set over the key-value text: "birdie" | "ntp".
        c.objectives = "birdie"
        # Weights over the actions: the set's K configurations, then the task; () = the task
        # alone. The Birdie controller (a trainer hook) sets it as it goes.
        c.mixture = ()
        # Emit the per-token prefix flag (False for models that read none).
        c.with_prefix = True
        # Rows per split (generated on read); content seed.
        c.num_train = 1_000_000
        c.num_validation = 256
        c.data_seed = 0
        # Row i holds only action i % (K + 1) (the controller's balanced validation rows).
        c.objective_per_row = False
        # How the objective set is built (objective_settings_config: every field; the paper's).
        c.objective_settings = objective_settings_config()
    elif name == "passkey":
        # Passkey prompts (the landmark paper's, train/data/passkey_data.py) mixed with windows
        # of the local prose corpus; generated when read.
        # Probability that a row is a passkey prompt (+ EOS + prose fill) rather than prose.
        c.passkey_fraction = 0.5
        # Digits of the key; start prompts with the paper's task line; shortest prompt (bytes).
        c.num_digits = 5
        c.intro = False
        c.min_length = 0
        # Loss weight of the answer digits (every other real token weighs 1).
        c.answer_weight = 1.0
        # Prose documents held out for "validation"; rows per split; content seed.
        c.validation_percent = 10
        c.num_train = 1_000_000
        c.num_validation = 512
        c.data_seed = 0
    elif name == "memory_bench":
        # The memory benchmark's probe mixture (train/data/memory_bench.py), generated when read:
        # one probe example per row; weights 1 at the answer tokens; `prefix` marks the prompt.
        # Probability of each probe (mqar, passkey, phonebook, streamqa), normalised.
        c.weights = (1.0, 1.0, 1.0, 1.0)
        # Training difficulty ranges (inclusive): MQAR pairs, passkey prompt bytes, book entries,
        # streaming-QA documents.
        c.mqar_pairs = (1, 8)
        c.passkey_lengths = (memory_bench.PASSKEY_MIN, 120)
        c.phonebook_entries = (1, 3)
        c.streamqa_documents = (1, 3)
        # > 0: MAC's rows instead (train/data/memory_bench_mac.py: the example's facts as
        # documents of this many tokens, one question for the LM); 0: one LM row per example.
        c.mac_doc_length = 0
        # Share of rows packed with Birdie's objectives over probe text instead (0: none).
        c.birdie_fraction = 0.0
        # Weights over Birdie's K configurations (memory_bench.birdie_objectives()) that those
        # rows pack; () = uniform over the classes. The Birdie controller (a trainer hook) sets it.
        c.mixture = ()
        # Every row a Birdie row, row i holding only configuration i % K (the controller's
        # balanced validation rows).
        c.objective_per_row = False
        # Rows per split (generated on read; "validation" is the controller's); content seed.
        c.num_train = 1_000_000
        c.num_test = 256
        c.num_validation = 256
        c.data_seed = 0
    elif name in ("mac_lm", "mac_meta"):
        # MAC's fact-stream documents (train/data/mac_data.py), generated in memory: "mac_lm"
        # the base LM's rows (seq_len tokens), "mac_meta" one record per document.
        # Train documents (distinct entities); validation/test hold at most eval_documents.
        c.documents = 16000
        c.eval_documents = 512
        # Content seed of the fact stream; the shuffle seed is make_dataset's `seed`.
        c.data_seed = 0
        # Token lengths of documents, questions and `question SEP answer EOS` rows.
        c.doc_length = 112
        c.question_length = 32
        c.qa_length = 40
        if name == "mac_lm":
            # Fraction of rows that are packed `question SEP answer EOS` without the document.
            c.qa_only_fraction = 0.5
    elif name == "mac_qa":
        # MAC's real QA streams (train/data/mac_qa.py): "streamingqa" | "archivalqa" (files
        # data_dir/{train,val,test}.csv in the official columns) | "squad" (the TFDS build in
        # data_dir; "" = TFDS's default folder).
        c.format = "streamingqa"
        # Tokenizer specs (train/data/tokenizer.load_tokenizer): the base LM's (questions and
        # answers) and the amortization networks' (T5's: documents and h's questions).
        c.lm_tokenizer = ""
        c.amort_tokenizer = ""
        # Token lengths of documents, h's questions and the LM's `question answer EOS` rows.
        c.doc_length = 512
        c.question_length = 64
        c.qa_length = 96
        # Seed of the official order (row or document-group shuffle, facts.official_order).
        c.data_seed = 0
        # ArchivalQA: whole articles (ans_text) as documents instead of paragraphs.
        c.full_passage = False
        # Rows read per split (0: all).
        c.limit = 0
    elif name == "images":
        # Images for DKVB's encoders (train/data/images.py): "mnist_8x8" | "cifar10" | "cifar100".
        c.dataset = "mnist_8x8"
        # Records carry their labels; False leaves them out (a model fitted without labels).
        c.with_labels = True
        # The first max_examples images of the split (0: all), then every subsample-th.
        c.max_examples = 0
        c.subsample = 1
    elif name == "embeddings":
        # Precomputed embeddings (train/data/embeddings.py) in data_dir: train.npz, test.npz.
        # The classes of the train split read (a class-incremental task; () = all) and of the
        # test split evaluated (() = all).
        c.classes = ()
        c.eval_classes = ()
    else:
        # TFDS catalog name, with optional config/version ("pg19", "wiki40b/en").
        c.tfds_name = "pg19"
        # Feature holding the text ("book_text" for pg19, "text" for most others).
        c.text_key = "book_text"
        # Let TFDS download and prepare the dataset if missing (never in tests or demos).
        c.download = False
        # As for "text": pack documents into full windows, or one per row; BOS; the tokenizer.
        c.pack = True
        c.add_bos = False
        c.tokenizer = "byte"
        # As for "text": windows "packed" | "random" (PG-19 at the official layout), the mask
        # after EOS, stream_phase rows, the stream's folder.
        c.windows = "packed"
        c.mask_after_eos = False
        c.stream_mem_freq = 0
        c.stream_dir = ""
    return c


def resolve_data_config(data_config: ml_collections.ConfigDict | Mapping[str, Any],
                        overrides: Mapping[str, Any] | None = None):
    """`default_data_config(data_config.name)` overridden by the fields `data_config` sets, then
    by `overrides` (a new ConfigDict; `data_config` is not changed).

    A config may set only the fields it changes; a field that the dataset does not have (a typo,
    or a field of another dataset) is a ValueError rather than silently ignored.
    """
    given = {**dict(data_config.items()), **(overrides or {})}
    if "name" not in given:
        raise ValueError(f"data_config has no field 'name'; allowed names: {DATASET_NAMES}")
    full = default_data_config(given["name"])
    unknown = sorted(set(given) - set(full.keys()))
    if unknown:
        raise ValueError(
            f"data_config fields {unknown} are unknown for name={given['name']!r}; "
            f"allowed: {sorted(full.keys())}"
        )
    for key, value in given.items():
        if isinstance(full[key], ml_collections.ConfigDict):   # nested: fields it sets, checked
            sub = dict(value.items()) if hasattr(value, "items") else value
            if not isinstance(sub, dict):
                raise ValueError(f"data_config.{key}={value!r} is not allowed; allowed: a "
                                 f"ConfigDict of fields {sorted(full[key].keys())}")
            bad = sorted(set(sub) - set(full[key].keys()))
            if bad:
                raise ValueError(f"data_config.{key} fields {bad} are unknown; allowed: "
                                 f"{sorted(full[key].keys())}")
            for k, v in sub.items():
                full[key][k] = tuple(v) if isinstance(full[key][k], tuple) else v
        else:
            full[key] = tuple(value) if isinstance(full[key], tuple) else value
    return full


def vocab_size(data_config: ml_collections.ConfigDict) -> int:
    """Smallest vocabulary (V) that holds every id the dataset produces: the text datasets'
    tokenizer's vocab_size (320 for "byte"); Birdie's rows its tokenizer's + 64
    (birdie_data.vocab_size); the others at least 320 (bytes + specials)."""
    data_config = resolve_data_config(data_config)
    if data_config.name == "birdie":
        try:
            return birdie_data.vocab_size(data_config.tokenizer)
        except ValueError as e:
            raise ValueError(f"data.tokenizer: {e}") from None
    if "tokenizer" in data_config:
        return data_tokenizer(data_config).vocab_size
    if data_config.name == "mqar":
        return max(
            tokenizer.VOCAB_SIZE,
            int(data_config.key_range[1]),
            int(data_config.value_range[1]),
            int(data_config.fill_token) + 1,
        )
    return tokenizer.VOCAB_SIZE


def data_tokenizer(data_config: ml_collections.ConfigDict) -> tokenizer.Tokenizer:
    """The tokenizer of a dataset: `data.tokenizer` for the text datasets ("text", "tfds"), the
    byte tokenizer for every other (their generators are defined on byte ids). Checks that it
    has what the pipeline inserts (EOS after every document, BOS before it with add_bos)."""
    data_config = resolve_data_config(data_config)
    spec = data_config.get("tokenizer", "byte")
    try:
        tok = tokenizer.cached_tokenizer(spec)
    except ValueError as e:
        raise ValueError(f"data.tokenizer: {e}") from None
    needs = ["EOS"] + (["BOS"] if data_config.get("add_bos") else [])
    for name in needs:
        if name not in tok.specials:
            raise ValueError(f"data.tokenizer={spec!r} is not allowed: it has no {name} token, "
                             f"which data.name={data_config.name!r} inserts; allowed: a tokenizer "
                             f"with one, or append it: {tok.add_special_tokens([name]).spec!r}")
    return tok


def splits(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The split names of the dataset ("tfds": whatever the catalog has, not checked here)."""
    if data_config.name == "mqar":
        return mqar.SPLITS
    if data_config.name == "text":
        return text_corpus.SPLITS
    if data_config.name == "birdie":
        return birdie_data.SPLITS
    if data_config.name == "recall":
        return recall.SPLITS
    if data_config.name == "passkey":
        return passkey_data.SPLITS
    if data_config.name == "memory_bench":
        return memory_bench.SPLITS
    if data_config.name in ("mac_lm", "mac_meta"):
        return mac_data.SPLITS
    if data_config.name == "mac_qa":
        return mac_qa.SPLITS
    if data_config.name == "images":
        return images.SPLITS.get(data_config.dataset, ())
    if data_config.name == "embeddings":
        return embeddings.SPLITS
    return ()


def mqar_spec(data_config: ml_collections.ConfigDict, seq_len: int) -> mqar.MqarSpec:
    """The `MqarSpec` (content definition) of an mqar data config at sequence length T."""
    return mqar.MqarSpec(
        seq_len=seq_len,
        num_pairs=data_config.num_pairs,
        num_queries=data_config.num_queries,
        key_range=tuple(data_config.key_range),
        value_range=tuple(data_config.value_range),
        fill_token=data_config.fill_token,
        num_train=data_config.num_train,
        num_test=data_config.num_test,
        seed=data_config.data_seed,
    )


def memory_bench_spec(data_config: ml_collections.ConfigDict,
                      seq_len: int) -> memory_bench.MixtureSpec:
    """The `MixtureSpec` of a memory_bench data config at sequence length T (fields it does not
    set at their defaults)."""
    data_config = resolve_data_config(data_config)
    return memory_bench.MixtureSpec(
        seq_len=seq_len, weights=tuple(data_config.weights),
        mqar_pairs=tuple(data_config.mqar_pairs),
        passkey_lengths=tuple(data_config.passkey_lengths),
        phonebook_entries=tuple(data_config.phonebook_entries),
        streamqa_documents=tuple(data_config.streamqa_documents),
        num_train=data_config.num_train, num_test=data_config.num_test,
        seed=data_config.data_seed, birdie_fraction=data_config.birdie_fraction,
        mixture=tuple(data_config.mixture), num_validation=data_config.num_validation,
        objective_per_row=bool(data_config.objective_per_row))


def _check_choice(field: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {tuple(allowed)}")


def make_source(
    data_config: ml_collections.ConfigDict, *, split: str, seq_len: int
) -> tuple[Sequence[Mapping[str, Any]], str]:
    """The random-access source of `split` and its kind.

    Returns (source, kind): kind "examples" means records are already
    {inputs [T], targets [T], weights [T]} (mqar); kind "text" means records are {"text": bytes}
    (possibly with other fields) to be tokenized; kind "fields" means records of other fields,
    batched as they are ("mac_meta").
    """
    data_config = resolve_data_config(data_config)
    name = data_config.name
    if name in ("mqar", "text"):
        _check_choice("data_config.source", data_config.source, SOURCES)
        _check_choice("split", split, splits(data_config))
    data_dir = data_config.data_dir or None
    if name == "birdie":
        _check_choice("split", split, birdie_data.SPLITS)
        spec = birdie_data.BirdieDataSpec(
            seq_len=seq_len, objectives=data_config.objectives, corpus=data_config.corpus,
            task_weight=data_config.task_weight, with_prefix=data_config.with_prefix,
            phonebook_entries=tuple(data_config.phonebook_entries),
            phonebook_queries=tuple(data_config.phonebook_queries),
            validation_percent=data_config.validation_percent, num_train=data_config.num_train,
            num_validation=data_config.num_validation, seed=data_config.data_seed,
            mixture=tuple(data_config.mixture), objective_per_row=data_config.objective_per_row,
            objective_settings=data_config.objective_settings,
            tokenizer=data_config.tokenizer, text_dir=data_config.text_dir,
            text_patterns=tuple(data_config.text_patterns), tfds_name=data_config.tfds_name,
            text_key=data_config.text_key, data_dir=data_config.data_dir)
        return birdie_data.BirdieSource(spec, split), "examples"
    if name == "recall":
        _check_choice("split", split, recall.SPLITS)
        return recall.RecallSource(recall.spec_from_config(data_config, seq_len), split), \
            "examples"
    if name == "passkey":
        _check_choice("split", split, passkey_data.SPLITS)
        spec = passkey_data.PasskeySpec(
            seq_len=seq_len, passkey_fraction=data_config.passkey_fraction,
            num_digits=data_config.num_digits, intro=data_config.intro,
            min_length=data_config.min_length, answer_weight=data_config.answer_weight,
            validation_percent=data_config.validation_percent, num_train=data_config.num_train,
            num_validation=data_config.num_validation, seed=data_config.data_seed)
        return passkey_data.PasskeySource(spec, split), "examples"
    if name == "memory_bench":
        _check_choice("split", split, memory_bench.SPLITS)
        if data_config.get("mac_doc_length", 0):
            from train.data import memory_bench_mac
            return memory_bench_mac.MacSource(memory_bench_spec(data_config, seq_len), split,
                                              data_config.mac_doc_length), "fields"
        return memory_bench.MixtureSource(memory_bench_spec(data_config, seq_len), split), \
            "examples"
    if name in ("mac_lm", "mac_meta"):
        _check_choice("split", split, mac_data.SPLITS)
        lengths = mac_data.Lengths(doc=data_config.doc_length,
                                   question=data_config.question_length,
                                   qa=data_config.qa_length, lm=seq_len)
        spec = mac_data.MacDataSpec(
            documents=data_config.documents, eval_documents=data_config.eval_documents,
            seed=data_config.data_seed, lengths=lengths,
            qa_only_fraction=data_config.get("qa_only_fraction", 0.0))
        if name == "mac_lm":
            return mac_data.lm_source(spec, split, seq_len), "examples"
        return mac_data.meta_source(spec, split), "fields"
    if name == "mac_qa":
        _check_choice("split", split, mac_qa.SPLITS)
        return mac_qa.source(mac_qa.spec_from_config(data_config), split), "fields"
    if name == "embeddings":
        classes = data_config.classes if split == "train" else data_config.eval_classes
        return embeddings.EmbeddingSource(data_config.data_dir, split,
                                          tuple(int(c) for c in classes)), "fields"
    if name == "images":
        return images.ImageSource(data_config.dataset, split,
                                  with_labels=bool(data_config.with_labels),
                                  data_dir=data_config.data_dir,
                                  max_examples=data_config.max_examples,
                                  subsample=data_config.subsample), "fields"
    if name == "mqar":
        spec = mqar_spec(data_config, seq_len)
        if data_config.source == "memory":
            return mqar.MqarSource(spec, split), "examples"
        return mqar.data_source(spec, split, data_dir), "examples"
    if name == "text" and data_config.get("text_dir"):
        pct, patterns = data_config.validation_percent, tuple(data_config.text_patterns)
        digest = text_corpus.local_digest(data_config.text_dir, patterns)
        if data_config.source == "memory":
            source = [{"id": i.encode("utf-8"), "text": t.encode("utf-8")}
                      for i, t in text_corpus.local_documents(data_config.text_dir, patterns)
                      if text_corpus.split_of(i, pct) == split]
        else:
            source = text_corpus.local_data_source(split, data_config.text_dir, patterns, pct,
                                                   data_dir, digest=digest)
        key = f"text-files_{digest}-{pct}-{split}"
    elif name == "text":
        pct = data_config.validation_percent
        if data_config.source == "memory":
            source = text_corpus.documents(split, pct)
        else:
            source = text_corpus.data_source(split, pct, data_dir)
        key = f"text-{text_corpus.python_version_tag()}-{pct}-{split}"
    else:
        source = catalog.TextFieldSource(catalog.catalog_data_source(
            data_config.tfds_name, split=split, data_dir=data_dir,
            download=data_config.download), data_config.text_key)
        key = f"tfds-{data_config.tfds_name}-{data_config.text_key}-{split}"
    _check_choice("data_config.windows", data_config.windows, token_stream.WINDOWS)
    if data_config.windows == "packed":
        return source, "text"
    tok = data_tokenizer(data_config)
    stream = token_stream.token_stream(source, tok, add_bos=bool(data_config.add_bos),
                                       cache_dir=data_config.stream_dir, key=key)
    return token_stream.StreamWindows(
        stream, seq_len=seq_len, split=split, eos_id=tok.special("EOS"),
        mask_after_eos=bool(data_config.mask_after_eos),
        mem_freq=data_config.stream_mem_freq), "examples"


# ---------------------------------------------------------------------------------------------
# Per-record transforms (module-level so that grain workers can pickle them).


class _Tokenize(grain.transforms.Map):
    """{"text": bytes} -> {"tokens": int32 [L]}: the tokenizer's ids, then EOS (BOS first if
    asked). Holds the tokenizer's spec, not the tokenizer, so grain workers load their own."""

    def __init__(self, spec: str, add_bos: bool):
        self._spec, self._add_bos = spec, add_bos

    def map(self, record):
        tok = tokenizer.cached_tokenizer(self._spec)
        return {"tokens": tok.encode(record["text"], add_bos=self._add_bos, add_eos=True)}


def _pad_id(tok: tokenizer.Tokenizer) -> int:
    """The id padding gets (weight 0, after the real tokens): PAD, or EOS where there is none
    (GPT-2), so that a pretrained vocabulary need not grow for it."""
    return tok.pad_id if tok.pad_id is not None else tok.special("EOS")


class _PadWindow(grain.transforms.Map):
    """{"tokens": [L]} -> {inputs, targets, weights} [T]: cut/pad one document to T + 1 tokens."""

    def __init__(self, seq_len: int, pad_id: int = tokenizer.PAD):
        self._seq_len, self._pad_id = seq_len, pad_id

    def map(self, record):
        tokens = record["tokens"][: self._seq_len + 1]
        window = np.full(self._seq_len + 1, self._pad_id, dtype=np.int32)
        window[: len(tokens)] = tokens
        weights = (np.arange(self._seq_len) < len(tokens) - 1).astype(np.float32)
        return {"inputs": window[:-1], "targets": window[1:], "weights": weights}


class _PackedWindow(grain.transforms.Map):
    """ConcatThenSplit output (tokens, tokens_segment_ids [T+1]) -> {inputs, targets, weights} [T];
    with `mask_after_eos` (an EOS id), weight 0 where the input is EOS."""

    def __init__(self, pad_id: int = tokenizer.PAD, mask_after_eos: int | None = None):
        self._pad_id, self._eos = pad_id, mask_after_eos

    def map(self, record):
        valid = record["tokens_segment_ids"] != 0  # 0 marks padding at the end of the stream
        window = np.where(valid, record["tokens"], self._pad_id).astype(np.int32)
        weights = (valid[:-1] & valid[1:]).astype(np.float32)
        if self._eos is not None:
            weights[window[:-1] == self._eos] = 0.0
        return {"inputs": window[:-1], "targets": window[1:], "weights": weights}


class _CheckExample(grain.transforms.Map):
    """Casts an example record (mqar, birdie) to int32/int32/float32 and checks its length is T."""

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def map(self, record):
        out = {
            "inputs": np.asarray(record["inputs"], np.int32),
            "targets": np.asarray(record["targets"], np.int32),
            "weights": np.asarray(record["weights"], np.float32),
        }
        # Packed rows (birdie) also carry segment ids, objective ids and the prefix flag; the
        # official landmark layout's rows (token_stream.py) their stream phase.
        for key in ("segment_ids", "objective_ids", "stream_phase"):
            if key in record:
                out[key] = np.asarray(record[key], np.int32)
        if "prefix" in record:
            out["prefix"] = np.asarray(record["prefix"], bool)
        for key, value in out.items():
            if value.shape != (self._seq_len,):
                raise ValueError(
                    f"record[{key!r}] has shape {value.shape}; the pipeline's seq_len needs "
                    f"({self._seq_len},)"
                )
        return out


# ---------------------------------------------------------------------------------------------
# The entry point.


class _Rows(grain.transforms.Map):
    """Keeps rows [start, start + size) of a global batch (shard_mode="rows")."""

    def __init__(self, start: int, size: int):
        self._start, self._size = start, size

    def map(self, batch):
        return {k: v[self._start : self._start + self._size] for k, v in batch.items()}


def make_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    split: str,
    seed: int,
    global_batch_size: int,
    seq_len: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of this process's batches (see the module docstring).

    Args:
      data_config: a config from `default_data_config(name)` (possibly overridden).
      split: "train"/"test" (mqar), "train"/"validation" (text), any TFDS split string (tfds).
      seed: shuffle seed, 0 <= seed < 2**32.
      global_batch_size: rows per step over all processes; must divide by process_count.
      seq_len: T, tokens per row.
      process_index, process_count: this process's shard; both None -> from
        `grain.sharding.ShardByJaxProcess` (jax.process_index(), jax.process_count()).
      num_epochs: passes over the split; None repeats forever.

    Returns:
      `grain.DatasetIterator` yielding {"inputs": int32 [B, T], "targets": int32 [B, T],
      "weights": float32 [B, T]} with B = global_batch_size // process_count.
    """
    if (process_index is None) != (process_count is None):
        raise ValueError(
            f"process_index={process_index} and process_count={process_count} must both be "
            "given or both be None"
        )
    if process_index is None:
        shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    else:
        shard = grain.sharding.ShardOptions(
            shard_index=process_index, shard_count=process_count, drop_remainder=True
        )
    if shard.shard_count < 1 or not 0 <= shard.shard_index < shard.shard_count:
        raise ValueError(
            f"process_index={shard.shard_index} must be in 0..process_count-1 with "
            f"process_count={shard.shard_count} >= 1"
        )
    if global_batch_size < 1 or global_batch_size % shard.shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={shard.shard_count}"
        )
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} must be in 0..2**32-1")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None (forever)")
    data_config = resolve_data_config(data_config)
    if data_config.worker_count < 0:
        raise ValueError(f"data_config.worker_count={data_config.worker_count} must be >= 0")
    _check_choice("data_config.shard_mode", data_config.shard_mode, ("rows", "records"))
    batch_size = global_batch_size // shard.shard_count
    by_rows = data_config.shard_mode == "rows"

    source, kind = make_source(data_config, split=split, seq_len=seq_len)
    ds = grain.MapDataset.source(source)
    if len(ds) == 0:   # grain would repeat an empty epoch forever
        raise ValueError(
            f"split {split!r} of data.name={data_config.name!r} has no records; allowed: a "
            "split with at least one (check the config's split sizes, e.g. num_train, "
            "num_test, validation_percent, documents, classes)")
    if not by_rows:
        per_shard = len(ds) // shard.shard_count
        if per_shard == 0:
            raise ValueError(
                f"split {split!r} has {len(ds)} records, fewer than "
                f"process_count={shard.shard_count}"
            )
        ds = ds[shard.shard_index : per_shard * shard.shard_count : shard.shard_count]
    if data_config.shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs)

    pack = kind == "text" and bool(data_config.pack)
    if kind == "examples":
        ds = ds.map(_CheckExample(seq_len))
    elif kind == "text":
        tok = data_tokenizer(data_config)
        ds = ds.map(_Tokenize(tok.spec, bool(data_config.add_bos)))
        if not pack:
            ds = ds.map(_PadWindow(seq_len, _pad_id(tok)))
    read_options = grain.ReadOptions(
        num_threads=max(int(data_config.read_threads), 0),
        prefetch_buffer_size=max(int(data_config.read_buffer), 1),
    )
    it = ds.to_iter_dataset(read_options)
    if pack:
        it = grain.experimental.ConcatThenSplitIterDataset(
            it, length_struct={"tokens": seq_len + 1}
        )
        it = it.map(_PackedWindow(_pad_id(tok), tok.special("EOS")
                                  if data_config.mask_after_eos else None))
    if by_rows:
        it = it.batch(global_batch_size, drop_remainder=True)
        it = it.map(_Rows(shard.shard_index * batch_size, batch_size))
    else:
        it = it.batch(batch_size, drop_remainder=True)
    if data_config.worker_count > 0:
        # grain's worker start-up reads absl flags; outside an absl app (tests, notebooks) they
        # were never parsed, so accept the defaults (train/main.py parses them itself).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
    return iter(it)


def to_global_array(
    batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    sharding: jax.sharding.Sharding | jax.sharding.PartitionSpec | None = None,
) -> dict[str, jax.Array]:
    """Process-local batch [B_local, ...] -> global jax.Arrays [B_local * process_count, ...].

    `sharding` is a `jax.sharding.Sharding`, a `PartitionSpec` on `mesh`, or None: rows split
    over the mesh's batch axes ('data' and 'fsdp', those present), the rest replicated. Each
    process passes its own rows, in process order, via `jax.make_array_from_process_local_data`.
    """
    if sharding is None:
        batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
        sharding = jax.sharding.PartitionSpec(batch_axes or None)
    if isinstance(sharding, jax.sharding.PartitionSpec):
        sharding = jax.sharding.NamedSharding(mesh, sharding)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }
