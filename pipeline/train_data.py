"""The train split of a stage directory (RUN/teacher/, or RUN/tokens/ for an online teacher) as
per-rank micro-batches, in an order a resumed run can skip to without reading what it skips.

- Each epoch permutes the shards with a seeded RNG; the samples, in that shard order and in file
  order within a shard, form the epoch's sequence. Rank r of W takes the r-th of W equal contiguous
  blocks of it, so a rank reads about 1/W of the shards and every rank runs the same number of
  micro-batches (no rank waits on a collective the others skipped). What does not fill a block or
  a micro-batch (fewer than W x micro_batch samples) is the only data an epoch drops; `dropped` says
  how many samples.
- The order is a pure function of (seed, epoch, world size): a resume at micro-batch n finds its
  shard and offset from the manifest's per-shard sample counts, opens that shard, and reads no shard
  before it.
- A shard is checked against its manifest record (size, sha256) when this process first opens it,
  before any of its samples is used: nothing hashes the whole dataset up front.
- A teacher shard's encoded targets are decoded sample by sample into the [B, T, entries] ids and
  log-probs the loss reads (`TARGET_IDS`, `TARGET_LOGPROBS`).
- `num_workers: 1` reads and decodes in one background process (the order is kept); 0 in the
  training process.
"""
from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from pipeline.errors import ShardError
from pipeline.shards import TOKENS_KEY, verify_shard
from pipeline.targets import TARGETS_KEY, TargetFormat


class TrainBatches:
    def __init__(self, stage_dir: Path, manifest: dict, fmt: TargetFormat | None, micro_batch: int,
                 rank: int, world: int, seed: int, num_workers: int = 0):
        """`fmt`: the teacher shards' target format; None: token shards (no targets)."""
        self.dir, self.fmt, self.micro_batch = Path(stage_dir), fmt, micro_batch
        self.keys = (TOKENS_KEY,) if fmt is None else (TOKENS_KEY, TARGETS_KEY)
        self.rank, self.world, self.seed, self.workers = rank, world, seed, num_workers
        self.shards = manifest["splits"]["train"]["shards"]
        self.samples = sum(s["samples"] for s in self.shards)
        self.batches_per_epoch = self.samples // world // micro_batch  # the same on every rank
        self.block = self.batches_per_epoch * micro_batch  # samples per rank per epoch
        self.dropped = self.samples - world * self.block
        if self.batches_per_epoch < 1:
            raise ShardError(f"{self.dir}: {self.samples} train samples cannot give {world} ranks a micro-batch "
                             f"of {micro_batch}; lower train.micro_batch_size or add data")
        self._verified: set[str] = set()  # each shard is checked once per process, when first opened

    def epoch_order(self, epoch: int) -> list[dict]:
        """The train shards in `epoch`'s seeded order."""
        order = list(range(len(self.shards)))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return [self.shards[i] for i in order]

    def stream(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from global number `start` on, epoch after epoch."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        source = _Samples(self, epoch, skip)
        loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=self.workers)
        for item in loader:
            if isinstance(item, _Failure):  # a worker's ShardError, as the one-line error it is
                raise ShardError(item.message)
            yield item

    def _samples(self, epoch: int, skip: int) -> Iterator[tuple]:
        """This rank's samples of `epoch` from micro-batch `skip` on: its block of the epoch's sequence."""
        shards = self.epoch_order(epoch)
        starts = list(itertools.accumulate((s["samples"] for s in shards), initial=0))
        begin = self.rank * self.block + skip * self.micro_batch
        end = (self.rank + 1) * self.block
        first = bisect.bisect_right(starts, begin) - 1
        for record, offset in zip(shards[first:], starts[first:]):
            if offset >= end:
                return
            if record["file"] not in self._verified:
                verify_shard(self.dir, record)
                self._verified.add(record["file"])
            dataset = wds.WebDataset(str(self.dir / record["file"]), shardshuffle=False, nodesplitter=None,
                                     workersplitter=None, empty_check=False).decode().to_tuple(*self.keys)
            for index, sample in enumerate(dataset, offset):
                if index >= end:
                    return
                if index >= begin:
                    yield sample

    def _batches(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        samples = self._samples(epoch, skip)
        while True:
            group = list(itertools.islice(samples, self.micro_batch))
            if len(group) < self.micro_batch:
                return
            batch = {TOKENS_KEY: torch.as_tensor(np.stack([sample[0] for sample in group]))}
            if self.fmt is not None:
                batch.update(self.fmt.decode_batch([sample[1] for sample in group], batch[TOKENS_KEY].shape[1]))
            yield batch


class _Failure:
    def __init__(self, message: str):
        self.message = message


class _Samples(torch.utils.data.IterableDataset):
    """Micro-batches from (epoch, skip) on, forever; in a worker process when num_workers is 1."""

    def __init__(self, batches: TrainBatches, epoch: int, skip: int):
        self.batches, self.epoch, self.skip = batches, epoch, skip

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        try:
            while True:
                yield from self.batches._batches(epoch, skip)
                epoch, skip = epoch + 1, 0
        except ShardError as e:
            yield _Failure(str(e))
