"""Data: text sources, tokenizers, memory-mapped token cache, grain pipeline.

The trainer needs three calls (see docs/data.md):

  train, val, tok = prepare_train_val("stdlib", "bpe:8192", cache_dir)
  it = train_iterator(train, seq_len, global_batch, seed=0)   # checkpointable
  for x in eval_batches(val, batch_size, seq_len, num_batches): ...
"""
from vesperjax.data.cache import TokenCache
from vesperjax.data.errors import (CacheError, DataError, DatasetTooSmallError,
                                   DecodeError, EmptySourceError, MalformedRecordError,
                                   MissingPathError, TokenizerError)
from vesperjax.data.pipeline import eval_batches, train_dataset, train_iterator
from vesperjax.data.prepare import prepare_dataset, prepare_train_val, resolve_tokenizer
from vesperjax.data.sources import open_source
from vesperjax.data.tokenizer import EOD, Tokenizer, padded_vocab_size

__all__ = [
    "CacheError", "DataError", "DatasetTooSmallError", "DecodeError", "EOD",
    "EmptySourceError", "MalformedRecordError", "MissingPathError", "TokenCache",
    "Tokenizer", "TokenizerError", "eval_batches", "open_source", "padded_vocab_size",
    "prepare_dataset", "prepare_train_val", "resolve_tokenizer", "train_dataset",
    "train_iterator",
]
