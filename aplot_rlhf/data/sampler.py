"""The order pairs (or prompts) are visited in: deterministic, resumable, sharded over ranks."""
from __future__ import annotations

import random

from .reading import DataError


class PairSampler:
    """Deterministic, resumable, rank-sharded order of pair indices.

    Epoch e uses permutation Random(seed + e); rank r takes every world-th micro-batch. Drops the
    ragged tail so every rank runs the same number of micro-steps (collectives stay matched).

    lengths (optional, one per pair: the longer of its two sequences) turns on length grouping: the
    epoch's kept pairs (the same set as without grouping) are cut, in permutation order, into windows of
    GROUP_WINDOW global micro-batches; each window is sorted by length and cut into global micro-batches,
    whose order within the window is shuffled again with the epoch's seed. A micro-batch then pads to
    about its own pairs' length instead of the longest of a random draw, and the order stays a pure
    function of (seed, epoch), so resuming at a micro-step reproduces it.
    """

    GROUP_WINDOW = 64  # global micro-batches sorted together; larger groups tighter but mixes less

    def __init__(self, n_pairs: int, micro_batch_size: int, world_size: int, rank: int, seed: int,
                 lengths: list[int] | None = None):
        self.n, self.mbs, self.world, self.rank, self.seed = n_pairs, micro_batch_size, world_size, rank, seed
        if lengths is not None and len(lengths) != n_pairs:
            raise ValueError(f"lengths has {len(lengths)} entries for {n_pairs} pairs")
        self.lengths = lengths
        self._epoch_cache = None  # (epoch, its batches): one shuffle per epoch, not one per batch
        self.batches_per_rank = n_pairs // (micro_batch_size * world_size)
        if self.batches_per_rank == 0:
            raise DataError(f"{n_pairs} training pairs are fewer than one global micro-batch "
                            f"(--micro_batch_size {micro_batch_size} x {world_size} ranks)")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(self.n))
        rng = random.Random(self.seed + epoch)
        rng.shuffle(order)
        per_step = self.mbs * self.world
        order = order[:self.batches_per_rank * per_step]  # the ragged tail is dropped before any grouping
        if self.lengths is not None:
            grouped, span = [], self.GROUP_WINDOW * per_step
            for w in range(0, len(order), span):
                window = sorted(order[w:w + span], key=lambda i: self.lengths[i])  # stable: ties keep the draw
                chunks = [window[c:c + per_step] for c in range(0, len(window), per_step)]
                rng.shuffle(chunks)
                grouped += [i for chunk in chunks for i in chunk]
            order = grouped
        out = []
        for b in range(self.batches_per_rank):
            start = b * per_step + self.rank * self.mbs
            out.append(order[start:start + self.mbs])
        return out

    def batch(self, position: int) -> list[int]:
        """The indices of this rank's `position`-th batch of the run, counted across epochs."""
        epoch, b = divmod(position, self.batches_per_rank)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.epoch_batches(epoch))
        return self._epoch_cache[1][b]
