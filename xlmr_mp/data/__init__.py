"""Data: preprocessing formats and the multilingual masked-LM pipeline the trainer consumes.

Pipeline (training side):
  config.py    DataConfig: path, languages, alpha, share_unit, seq_length, break_mode, masking, workers, seed
  dataset.py   PackedLanguageDataset / MultilingualCorpus over <path>/<lang>/<split>.{bin,idx}
  packing.py   sentences -> blocks of <= seq_length - 1 tokens (fairseq 'complete'), C++ + reference
  blend.py     q_i ~ p_i^alpha and the linear-time blended (language, block, pass) stream, C++ + reference
  masking.py   XLM-R 15% / 80-10-10 dynamic masking keyed by (seed, language, pass, block); whole-word, span
  phases.py    data and batch phases by step or tokens (data.*_schedule, train.batch_warmup), branch histories
  loader.py    MLMLoader (DP-sharded micro-batches, exact resume), ValidationLoader (per language, bits/char)
Preprocessing side: indexed.py, corpus_io.py (tools/preprocess_data.py, tools/train_spm.py); the demo's
generated corpus is a fixture, xlmr_mp/fixtures/demo_corpus.py.
"""
