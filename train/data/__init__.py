"""Data: tokenizers, TFDS builders (array_record, no TensorFlow) and grain pipelines.

Modules:
  tokenizer    byte-level ids 0..255 plus specials (PAD, BOS, EOS, SEP, LANDMARK, sentinels, ...);
               one Tokenizer interface over it, tokenizer.json (HF `tokenizers`) and SentencePiece
  mqar         multi-query associative recall: pure generator, in-memory source, TFDS builder
  phonebook    phone-book lookup examples (Birdie's retrieval task)
  text_corpus  offline English prose (Python's docs and docstrings): documents, TFDS builder
  catalog      TFDS plumbing: data_dir, build-once, real catalog datasets (pg19, ...)
  pipeline     make_dataset(...) -> checkpointable grain iterator of {inputs, targets, weights}

Submodules are not imported here, so `import train.data.tokenizer` stays light.
"""
