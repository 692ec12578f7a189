"""The train split of a stage directory (RUN/teacher/, or RUN/tokens/ for an online teacher) as
per-rank micro-batches, in an order a resumed run can skip to.

- Each epoch permutes the shards with a seeded RNG; rank r of W takes shards r::W (split by node),
  and DataLoader worker w of a rank takes that rank's shards w::num_workers (split by worker).
- Every rank runs the same number of micro-batches per epoch: the smallest any rank can fill
  exactly, computed from the manifest, so ranks never wait on a collective the others skipped.
- The order is a pure function of (seed, epoch): a resumed run skips to micro-batch
  `step * accumulation` without any saved iterator state.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from pipeline.errors import ShardError
from pipeline.shards import TOKENS_KEY, verify_shard


class TrainBatches:
    def __init__(self, stage_dir: Path, manifest: dict, target_keys: tuple[str, ...], micro_batch: int,
                 rank: int, world: int, seed: int, num_workers: int = 0):
        self.dir, self.keys, self.micro_batch = Path(stage_dir), (TOKENS_KEY, *target_keys), micro_batch
        self.rank, self.world, self.seed, self.workers = rank, world, seed, num_workers
        self.shards = manifest["splits"]["train"]["shards"]
        self._verified: set[str] = set()  # checksums are checked once per process, not once per epoch
        if len(self.shards) < world * max(1, num_workers):
            raise ShardError(f"{self.dir}: {len(self.shards)} train shards cannot feed {world} ranks x "
                             f"{max(1, num_workers)} workers; use a smaller data.sequences_per_shard")

    def _rank_shards(self, rank: int, epoch: int) -> list[dict]:
        order = list(range(len(self.shards)))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return [self.shards[i] for i in order[rank :: self.world]]

    def _batches(self, rank: int, epoch: int) -> int:
        """Full micro-batches rank `rank` yields in `epoch` (each worker drops its own remainder)."""
        mine = self._rank_shards(rank, epoch)
        groups = [mine[w :: self.workers] for w in range(self.workers)] if self.workers else [mine]
        return sum(sum(s["samples"] for s in group) // self.micro_batch for group in groups)

    def batches_in(self, epoch: int) -> int:
        """Micro-batches every rank runs in `epoch`."""
        return min(self._batches(rank, epoch) for rank in range(self.world))

    def stream(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from global number `start` on, epoch after epoch."""
        epoch = 0
        while True:
            count = self.batches_in(epoch)
            if start < count:
                yield from self._epoch(epoch, start, count)
                start = 0
            else:
                start -= count
            epoch += 1

    def _collate(self, samples: list[tuple]) -> dict[str, torch.Tensor]:
        return {key: torch.as_tensor(np.stack(column)) for key, column in zip(self.keys, zip(*samples))}

    def _epoch(self, epoch: int, skip: int, count: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches `skip` to `count` of `epoch`."""
        shards = self._rank_shards(self.rank, epoch)
        for record in shards:
            if record["file"] not in self._verified:
                verify_shard(self.dir, record)
                self._verified.add(record["file"])
        pipeline = (
            wds.WebDataset([str(self.dir / s["file"]) for s in shards], shardshuffle=False, nodesplitter=None,
                           workersplitter=wds.split_by_worker, empty_check=False)
            .decode()
            .to_tuple(*self.keys)
            .batched(self.micro_batch, collation_fn=self._collate, partial=False)
        )
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=self.workers)
        return itertools.islice(loader, skip, count)
