"""train-exits' data: every sample used whatever the rank count, resume by position without reading
earlier shards, and each shard verified when first opened (not the whole dataset up front)."""
import numpy as np
import pytest

from pipeline import shards
from pipeline.errors import ShardError
from pipeline.train_data import TrainBatches

SHARD_SIZES = [5, 3, 4, 6, 2, 5]  # 25 samples, uneven shards


@pytest.fixture
def stage_dir(tmp_path):
    """Train shards whose sample i holds the number i in every position (so a batch names its samples)."""
    records, number = [], 0
    for index, size in enumerate(SHARD_SIZES):
        samples = [{"__key__": f"s-{number + j:04d}", shards.TOKENS_KEY: np.full(4, number + j, dtype=np.int32)}
                   for j in range(size)]
        records.append(shards.write_shard(tmp_path, "train", index, samples).__dict__)
        number += size
    return tmp_path, {"splits": {"train": {"shards": records}}}


def _numbers(batches, count, start=0):
    stream = batches.stream(start=start)
    return [[int(row[0]) for row in next(stream)[shards.TOKENS_KEY]] for _ in range(count)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_is_used_once_per_epoch_whatever_the_rank_count(stage_dir, world):
    folder, manifest = stage_dir
    micro = 2
    ranks = [TrainBatches(folder, manifest, None, micro, rank, world, seed=5) for rank in range(world)]
    per_rank = ranks[0].batches_per_epoch
    assert all(r.batches_per_epoch == per_rank for r in ranks)
    seen = [n for r in ranks for batch in _numbers(r, per_rank) for n in batch]
    assert len(seen) == len(set(seen)) == 25 - ranks[0].dropped
    assert ranks[0].dropped < world * micro  # only what does not fill W equal blocks of whole micro-batches
    # the next epoch is another order of the same samples
    again = [n for r in ranks for batch in _numbers(r, 2 * per_rank)[per_rank:] for n in batch]
    assert sorted(again) != sorted(seen) or again != seen


def test_one_rank_keeps_the_seeded_shard_order(stage_dir):
    """One rank's order: the shards permuted by the seed, samples in file order (as before this change)."""
    import random

    folder, manifest = stage_dir
    batches = TrainBatches(folder, manifest, None, 1, 0, 1, seed=5)
    order = list(range(len(SHARD_SIZES)))
    random.Random(5 * 100_003).shuffle(order)
    starts = np.cumsum([0] + SHARD_SIZES)
    expected = [n for i in order for n in range(starts[i], starts[i + 1])]
    assert [b[0] for b in _numbers(batches, 25)] == expected


def test_resume_reads_no_shard_before_the_one_it_needs(stage_dir, monkeypatch):
    folder, manifest = stage_dir
    whole = _numbers(TrainBatches(folder, manifest, None, 2, 1, 2, seed=3), 9)
    opened = []
    real = shards.verify_shard
    monkeypatch.setattr("pipeline.train_data.verify_shard", lambda d, r: opened.append(r["file"]) or real(d, r))
    resumed = TrainBatches(folder, manifest, None, 2, 1, 2, seed=3)
    assert _numbers(resumed, 4, start=5) == whole[5:9]  # the last batch of epoch 0, then epoch 1
    # 25 samples, 2 ranks, micro-batch 2: blocks of 12; rank 1's micro-batch 5 of epoch 0 is sample 12 + 10
    order = resumed.epoch_order(0)
    first = int(np.searchsorted(np.cumsum([s["samples"] for s in order]), 22, side="right"))
    assert opened[0] == order[first]["file"]  # opened in order from there: no earlier shard


def test_a_corrupt_shard_is_refused_when_first_opened_not_before(stage_dir):
    folder, manifest = stage_dir
    batches = TrainBatches(folder, manifest, None, 1, 0, 1, seed=0)
    victim = batches.epoch_order(0)[-1]["file"]  # read last in epoch 0
    data = bytearray((folder / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / victim).write_bytes(bytes(data))
    stream = batches.stream()
    before = [next(stream) for _ in range(25 - SHARD_SIZES[int(victim[6:12])])]  # the other shards' samples
    assert len(before) == 25 - SHARD_SIZES[int(victim[6:12])]
    with pytest.raises(ShardError, match=rf"{victim}: sha256 is \w+, the manifest says"):
        next(stream)


def test_a_background_reader_gives_the_same_batches_and_one_line_errors(stage_dir):
    folder, manifest = stage_dir
    in_process = _numbers(TrainBatches(folder, manifest, None, 2, 0, 2, seed=1), 6, start=3)
    background = _numbers(TrainBatches(folder, manifest, None, 2, 0, 2, seed=1, num_workers=1), 6, start=3)
    assert background == in_process
    (folder / manifest["splits"]["train"]["shards"][0]["file"]).unlink()
    with pytest.raises(ShardError) as refused:
        _numbers(TrainBatches(folder, manifest, None, 25, 0, 1, seed=1, num_workers=1), 1)
    assert "\n" not in str(refused.value) and "missing (listed in manifest.json)" in str(refused.value)
