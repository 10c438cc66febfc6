"""XLM-R's parameter-name table for tensor parallelism: which tensors carry the vocabulary, which
are split on dim 0 (column-parallel) or dim 1 (row-parallel); everything else is replicated.
The module-level functions are `xlmr_mp.parallel.shard.ShardSpec`'s, bound to this table."""
from __future__ import annotations

from xlmr_mp.parallel.shard import ShardSpec

# Parameters whose dim 0 is the vocabulary (padded under TP, stripped in full state dicts).
VOCAB_PARAMS = ("embeddings.word_embeddings.weight", "lm_head.bias", "lm_head.decoder_weight")

XLMR_SHARDING = ShardSpec(
    vocab=VOCAB_PARAMS,
    column=(".attention.qkv.weight", ".attention.qkv.bias", ".ffn.fc1.weight", ".ffn.fc1.bias"),
    row=(".attention.out.weight", ".ffn.fc2.weight"),
)

is_vocab_param = XLMR_SHARDING.is_vocab_param
partition_dim = XLMR_SHARDING.partition_dim
shard_tensor = XLMR_SHARDING.shard_tensor
full_to_local = XLMR_SHARDING.full_to_local
local_to_full = XLMR_SHARDING.local_to_full
