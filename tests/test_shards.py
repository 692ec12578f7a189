import json
import os

import numpy as np
import pytest

from pipeline import shards
from pipeline.errors import ShardError


def _samples(n, seed=0, length=16):
    rng = np.random.default_rng(seed)
    return [{"__key__": f"s-{i:04d}", shards.TOKENS_KEY: rng.integers(0, 1000, length).astype(np.int32)}
            for i in range(n)]


def test_shard_round_trip_and_reproducible_bytes(tmp_path):
    rec = shards.write_shard(tmp_path, "train", 0, _samples(5))
    assert (rec.samples, rec.tokens, rec.file) == (5, 80, "shard-000000.tar")
    first = (tmp_path / rec.file).read_bytes()
    shards.write_shard(tmp_path, "train", 0, _samples(5))
    assert (tmp_path / rec.file).read_bytes() == first  # no timestamps in the tar
    got = list(shards.read_shard(tmp_path, json.loads(json.dumps(rec.__dict__))))
    assert [s["__key__"] for s in got] == [f"s-{i:04d}" for i in range(5)]
    for s, want in zip(got, _samples(5)):
        np.testing.assert_array_equal(s[shards.TOKENS_KEY], want[shards.TOKENS_KEY])


def test_failed_write_leaves_nothing_visible(tmp_path):
    good = shards.write_shard(tmp_path, "train", 0, _samples(3))

    def exploding():
        yield from _samples(2)
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        shards.write_shard(tmp_path, "train", 1, exploding())
    assert not shards.shard_path(tmp_path, "train", 1).exists()
    assert shards.completed_record(tmp_path, "train", 1) is None
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert shards.verify_shard(tmp_path, good.__dict__)


def test_tar_without_receipt_is_incomplete(tmp_path):
    rec = shards.write_shard(tmp_path, "heldout", 2, _samples(2))
    assert rec.file == "heldout/shard-000002.tar"
    assert shards.completed_record(tmp_path, "heldout", 2) == rec
    (tmp_path / "heldout" / shards.PARTS / "shard-000002.tar.json").unlink()
    assert shards.completed_record(tmp_path, "heldout", 2) is None
    rec = shards.write_shard(tmp_path, "heldout", 2, _samples(2))
    with open(tmp_path / rec.file, "ab") as f:
        f.write(b"x")  # a receipt for different bytes does not count
    assert shards.completed_record(tmp_path, "heldout", 2) is None


def _finished(tmp_path):
    header = {"stage": "tokenize", "config_hash": "abc", "seq_len": 16}
    for i in range(2):
        shards.write_shard(tmp_path, "train", i, _samples(3, seed=i))
    assert shards.finalize_manifest(tmp_path, header, {"train": 2, "heldout": 1}) is None  # heldout missing
    shards.write_shard(tmp_path, "heldout", 0, _samples(1))
    manifest = shards.finalize_manifest(tmp_path, header, {"train": 2, "heldout": 1})
    return header, manifest


def test_manifest_lists_every_shard_with_checksums(tmp_path):
    header, manifest = _finished(tmp_path)
    assert manifest["splits"]["train"]["tokens"] == 96 and manifest["splits"]["heldout"]["samples"] == 1
    assert shards.read_manifest(tmp_path, "tokenize", expect={"seq_len": 16}) == manifest
    for record in manifest["splits"]["train"]["shards"]:
        assert shards.verify_shard(tmp_path, record)


@pytest.mark.parametrize("damage,message", [
    ("flip", "sha256 is"), ("truncate", "size is"), ("delete", "missing"), ("append", "size is"),
])
def test_damaged_shard_is_refused_naming_file_and_check(tmp_path, damage, message):
    _, manifest = _finished(tmp_path)
    record = manifest["splits"]["train"]["shards"][1]
    path = tmp_path / record["file"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-1000]))
    elif damage == "append":
        path.write_bytes(bytes(data) + b"\0" * 512)
    else:
        path.unlink()
    with pytest.raises(ShardError) as err:
        list(shards.read_shard(tmp_path, record))
    assert str(path) in str(err.value) and message in str(err.value)


def test_manifest_field_mismatch_names_field_and_values(tmp_path):
    _finished(tmp_path)
    with pytest.raises(ShardError, match=r"seq_len is 16, expected 32"):
        shards.read_manifest(tmp_path, "tokenize", expect={"seq_len": 32})
    with pytest.raises(ShardError, match=r"stage is 'tokenize', expected 'teacher'"):
        shards.read_manifest(tmp_path, "teacher")
    (tmp_path / shards.MANIFEST).write_text("{ not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        shards.read_manifest(tmp_path, "tokenize")
    with pytest.raises(ShardError, match="run the tokenize stage first"):
        shards.read_manifest(tmp_path / "nowhere", "tokenize")


def test_directory_claim_refuses_other_inputs(tmp_path):
    shards.claim_directory(tmp_path, {"stage": "tokenize", "tokenizer_fingerprint": "aaa"})
    shards.claim_directory(tmp_path, {"stage": "tokenize", "tokenizer_fingerprint": "aaa"})
    with pytest.raises(ShardError, match="tokenizer_fingerprint='aaa'; this run has tokenizer_fingerprint='bbb'"):
        shards.claim_directory(tmp_path, {"stage": "tokenize", "tokenizer_fingerprint": "bbb"})


def test_atomic_write_never_exposes_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def no_rename(src, dst):
        raise OSError("injected failure before rename")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(ShardError, match=r"f.bin: write failed \(injected failure before rename\)"):
        shards.atomic_write(target, b"new contents")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_a_directory_is_pinned_to_its_header_and_format_version(tmp_path):
    shards.claim_directory(tmp_path, {"stage": "teacher", "config_hash": "old"})
    shards.claim_directory(tmp_path, {"stage": "teacher", "config_hash": "old"})  # the same inputs resume
    with pytest.raises(ShardError, match="config_hash='old'; this run has config_hash='new'"):
        shards.claim_directory(tmp_path, {"stage": "teacher", "config_hash": "new"})
    header = tmp_path / shards.PARTS / "header.json"  # as an earlier version of the pipeline wrote it
    header.write_text(json.dumps({"stage": "teacher", "config_hash": "old", "format_version": 1}))
    with pytest.raises(ShardError) as err:
        shards.claim_directory(tmp_path, {"stage": "teacher", "config_hash": "old"})
    assert str(err.value) == (f"{header}: run-directory format 1, this pipeline writes format "
                              f"{shards.FORMAT_VERSION}: start a new run.dir")
