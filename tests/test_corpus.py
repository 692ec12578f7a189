import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.corpus import Router, ShardSpec, is_heldout, pack_shards, plan_shards
from pipeline.sources import source_fingerprint
from pipeline.errors import InputError


def _data(**kw):
    base = dict(files=["x"], train_tokens=1000, heldout_tokens=100, seq_len=10, sequences_per_shard=30,
                heldout_fraction=0.2, shuffle_buffer=0)
    return DataConfig(**{**base, **kw})


def test_plan_meets_budget_within_one_sequence():
    specs = plan_shards(_data(train_tokens=1004))
    train = [s for s in specs if s.split == "train"]
    assert [s.sequences for s in train] == [30, 30, 30, 10]
    assert abs(sum(s.sequences for s in train) * 10 - 1004) < 10
    assert [s for s in specs if s.split == "heldout"] == [ShardSpec("heldout", 0, 10)]


def test_heldout_share_is_close_to_the_fraction():
    share = np.mean([is_heldout(0, j, 0.1) for j in range(20000)])
    assert abs(share - 0.1) < 0.01
    assert [is_heldout(0, j, 0.5) for j in range(50)] != [is_heldout(1, j, 0.5) for j in range(50)]


def _documents(n=400):
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(3, 50, rng.integers(5, 40))] for _ in range(n)]


def _encode(texts):
    return [ids + [2] for ids in texts]  # documents are already ids here; EOS = 2


def _pack(data, owned=None):
    specs = plan_shards(data)
    return {(s.split, s.index): seqs
            for s, seqs in pack_shards(specs, owned or specs, _documents(), _encode, data, batch_documents=7)}


def test_any_subset_of_owners_gives_identical_shards():
    data = _data()
    everything = _pack(data)
    assert len(everything) == len(plan_shards(data))
    specs = plan_shards(data)
    for count in (2, 3):
        for index in range(count):
            for key, seqs in _pack(data, specs[index::count]).items():
                np.testing.assert_array_equal(seqs, everything[key])


def test_routing_balances_characters_per_sequence():
    specs = [ShardSpec("train", 0, 30), ShardSpec("train", 1, 30), ShardSpec("train", 2, 10)]
    router = Router(specs)
    rng = np.random.default_rng(1)
    load = [0, 0, 0]
    for length in rng.integers(1, 500, 3000):
        load[router.route("train", "x" * int(length))] += int(length)
    per_sequence = [load[0] / 30, load[1] / 30, load[2] / 10]
    assert max(per_sequence) - min(per_sequence) <= 500 / 10  # within one document


def test_shards_are_their_documents_joined_by_eos():
    data = _data(heldout_fraction=1e-9, train_tokens=60, seq_len=10, sequences_per_shard=2)
    specs = plan_shards(data)
    train = [s for s in specs if s.split == "train"]
    out = _pack(data, train)
    router, routed = Router(specs), {0: [], 1: [], 2: []}
    for doc in _documents():
        routed[router.route("train", doc)].extend(doc + [2])
    for index, stream in routed.items():
        np.testing.assert_array_equal(out[("train", index)].ravel(), stream[:20])


def test_corpus_too_small_is_a_clear_error():
    with pytest.raises(InputError, match="data.train_tokens: the corpus ran out"):
        _pack(_data(train_tokens=100_000))


def test_files_with_the_same_name_in_two_folders_are_both_fingerprinted(tmp_path):
    for folder, text in (("a", "one"), ("b", "two")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.jsonl").write_text(f'{{"text": "{text}"}}\n')
    fingerprint = source_fingerprint(DataConfig(files=[str(tmp_path / "*" / "train.jsonl")], train_tokens=64, seq_len=8))
    assert sorted(fingerprint) == ["a/train.jsonl", "b/train.jsonl"]
    assert fingerprint["a/train.jsonl"] != fingerprint["b/train.jsonl"]
