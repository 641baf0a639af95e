"""The per-row KV cache bookkeeping: rows left padded, joined and trimmed as they leave."""

import torch
from transformers import DynamicCache

from lorakit.serve.kv import BatchCache, cache_tensors


def _row_cache(length: int, fill: float) -> DynamicCache:
    kv = torch.full((1, 2, length, 3), fill)
    return DynamicCache(ddp_cache_data=[(kv, kv + 100)])


def test_batch_cache_left_pads_joins_and_trims_after_leaves():
    batch = BatchCache()
    batch.add_rows([_row_cache(3, 1.0)], [3])
    batch.add_rows([_row_cache(5, 2.0), _row_cache(2, 3.0)], [5, 2])
    keys, values = cache_tensors(batch.cache)[0]
    assert keys.shape == (3, 2, 5, 3) and batch.width == 5
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]  # row 0 padded by 2 on the left
    assert keys[2, 0, :, 0].tolist() == [0, 0, 0, 3, 3]
    assert values[1, 0, :, 0].tolist() == [102] * 5
    mask, positions = batch.step_inputs()
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 1, 1, 1]]
    assert positions.flatten().tolist() == [3, 5, 2]
    batch.keep_rows([0, 2])  # the longest row leaves: two padding columns go
    keys, _ = cache_tensors(batch.cache)[0]
    assert keys.shape == (2, 2, 3, 3) and batch.lengths == [3, 2]
    assert keys[1, 0, :, 0].tolist() == [0, 3, 3]
    batch.keep_rows([])
    assert batch.cache is None and len(batch) == 0
