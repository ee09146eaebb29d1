"""Data: `lunaris prepare` (sources -> tokenizer -> token shards + manifest) and the sharded token stream."""

from lunaris.data.loader import EpochBatchSampler, TokenLoader, epoch_permutation, sequential_batches
from lunaris.data.shards import ShardDataset, check_vocab, read_manifest, resolve_data_dirs, split_info, tokenizer_path

__all__ = [
                                 "EpochBatchSampler",
                                 "ShardDataset",
                                 "TokenLoader",
                                 "check_vocab",
                                 "epoch_permutation",
                                 "read_manifest",
                                 "resolve_data_dirs",
                                 "sequential_batches",
                                 "split_info",
                                 "tokenizer_path",
]
