"""Which examples make up each optimizer step's global batch.

The order is a pure function of (seed, epoch), so a resumed run, or several processes
each taking a slice of the same global batch, see exactly the batches a single
uninterrupted run sees.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from lorakit.data.stream import EncodedStream

GROUP_BATCHES = 32  # global batches whose examples are sorted by length together


@lru_cache(maxsize=2)
def epoch_batches(lengths: tuple, global_batch: int, seed: int, epoch: int, group: bool) -> list:
    """Example indices of every global batch of ``epoch``, from a seeded permutation.

    With ``group``, each run of ``GROUP_BATCHES`` batches is sorted by length before it
    is cut, and the batches are then shuffled: a batch pads to a similar length, so a
    step costs less (about 1.5x on the review snippets), while the data stays shuffled.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    order = order[:len(order) // global_batch * global_batch]
    chunk = GROUP_BATCHES * global_batch if group else global_batch
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i]) if group else order[start:start + chunk]
        batches += [part[j:j + global_batch] for j in range(0, len(part), global_batch)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist() if group else range(len(batches))
    return [batches[i] for i in shuffled]


def batch_of_step(train: list, lengths: tuple, step: int, steps_per_epoch: int, global_batch: int, seed: int,
                  group: bool) -> list:
    """The examples of optimizer step ``step``.

    A pure function of its arguments: a resumed run sees the very same batches. A
    streamed training split (:class:`~lorakit.data.stream.EncodedStream`) reads them
    from its file, in its own seeded order (not grouped by length).
    """
    if isinstance(train, EncodedStream):
        return train.batch(step, steps_per_epoch, global_batch, seed)
    epoch, position = divmod(step, steps_per_epoch)
    return [train[i] for i in epoch_batches(lengths, global_batch, seed, epoch, group)[position]]
