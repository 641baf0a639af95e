"""The key/value cache of a batch whose rows started at different times.

Each row is a request with its own length. Rows are left-padded to the longest one, so
the newest column of every row lines up and one forward of the model decodes one token
for all of them. Padding columns are masked out through the attention mask, and every
row gets its own position ids, so a row computes what it would compute alone (rotary
embeddings are applied before keys enter the cache, so padding does not shift them).

Only this module touches the inside of transformers' ``DynamicCache``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (rows, heads, length, head_dim)


def cache_tensors(cache: DynamicCache) -> KV:
    """Per-layer ``(keys, values)`` of a DynamicCache, each ``(rows, kv_heads, length, head_dim)``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    if width == 0:
        return tensor
    pad = tensor.new_zeros(*tensor.shape[:2], width, tensor.shape[3])
    return torch.cat([pad, tensor], dim=2)


class BatchCache:
    """KV cache and lengths of the rows now decoding together.

    Attributes:
        lengths: tokens each row has in the cache (prompt plus generated so far).
        cache: the DynamicCache handed to the model, or None when there are no rows.
    """

    def __init__(self, config=None):
        self.config = config
        self.lengths: list[int] = []
        self.cache: DynamicCache | None = None

    @property
    def width(self) -> int:
        """Columns of the cache: the longest row (shorter rows are padded on the left)."""
        return max(self.lengths, default=0)

    def __len__(self) -> int:
        return len(self.lengths)

    def add_rows(self, row_caches: list[DynamicCache], row_lengths: list[int]) -> None:
        """Append rows given as caches of their own (``rows_i`` rows each, no padding).

        ``row_lengths`` has one entry per appended row, in order.
        """
        new_width = max([self.width, *row_lengths])
        parts: list[KV] = []
        if self.cache is not None:
            parts.append([(_left_pad(k, new_width - self.width), _left_pad(v, new_width - self.width))
                          for k, v in cache_tensors(self.cache)])
        for cache in row_caches:
            kv = cache_tensors(cache)
            width = kv[0][0].shape[2]
            parts.append([(_left_pad(k, new_width - width), _left_pad(v, new_width - width)) for k, v in kv])
        merged = [
            (torch.cat([p[layer][0] for p in parts]), torch.cat([p[layer][1] for p in parts]))
            for layer in range(len(parts[0]))
        ]
        self.cache = DynamicCache(ddp_cache_data=merged, config=self.config)
        self.lengths.extend(row_lengths)

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows at indices ``keep`` (in that order) and drop padding nobody needs."""
        if len(keep) == len(self.lengths):
            return
        self.lengths = [self.lengths[i] for i in keep]
        if not keep:
            self.cache = None
            return
        old_width = self.cache.get_seq_length()
        start = old_width - self.width  # columns that are padding in every kept row
        index = torch.tensor(keep)
        merged = [(k[index, :, start:], v[index, :, start:]) for k, v in cache_tensors(self.cache)]
        self.cache = DynamicCache(ddp_cache_data=merged, config=self.config)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask ``(rows, width + 1)`` and position ids ``(rows, 1)`` for one decode step."""
        width = self.width
        lengths = torch.tensor(self.lengths)
        columns = torch.arange(width + 1)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return mask, lengths[:, None]

    def advance(self) -> None:
        """Record that every row gained one token (the model appended its column)."""
        self.lengths = [n + 1 for n in self.lengths]
