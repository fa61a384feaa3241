"""Data: tokenizers, memory-mapped token files and splits, batches, ``prepare``, embedded corpus.

Typical use::

    splits = load_splits(cfg.data, model_vocab_size=cfg.model.vocab_size, cache_dir=run_dir / ".data")
    batches = TrainBatches(splits.train, batch_size, seq_len, seed, rank, world_size)
    x, y = batches.get(step, micro)            # int64 [B, T], y = x shifted by one
    evals = eval_batches(splits.val, batch_size, seq_len, num_batches=20)
"""

from attnlab.data.corpus import embedded_corpus_files, embedded_description, stdlib_root
from attnlab.data.prepare import PrepareStats, prepare, sidecar_path
from attnlab.data.tokenizers import (
    ByteTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
    tokenizer_vocab_size,
)
from attnlab.data.tokens import (
    TokenSplits,
    TrainBatches,
    eval_batches,
    load_splits,
    open_tokens,
    read_sidecar,
    split_tokens,
)

__all__ = [
    "ByteTokenizer", "PrepareStats", "TiktokenTokenizer", "TokenSplits", "Tokenizer", "TrainBatches",
    "build_tokenizer", "embedded_corpus_files", "embedded_description", "eval_batches", "load_splits",
    "open_tokens", "prepare", "read_sidecar", "sidecar_path", "split_tokens", "stdlib_root",
    "tokenizer_vocab_size",
]
