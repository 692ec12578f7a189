"""Webdataset shards, their atomic commit, and the manifest that validates a hand-off.

A stage directory holds `shard-%06d.tar` files (a held-out split in `heldout/`) and, once every
shard is present, `manifest.json`. Rules:

- a shard is written under a temporary name, fsynced and renamed: a visible `.tar` is complete;
- its receipt (`.parts/NAME.json`: samples, tokens, bytes, sha256) is committed after the tar, so a
  task that dies between the two only costs that shard; tasks never read each other's tars;
- `.parts/header.json` pins what the directory is being written for (stage, config hash,
  fingerprints, ...): a rerun with other inputs is refused instead of mixing outputs;
- the manifest is the header plus every receipt, written by whichever task completes the set.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.errors import ShardError

# The format of everything a run directory holds (headers, manifests, shards, exits, metrics). Any
# change bumps it; a directory of another version is refused, never converted.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
PARTS = ".parts"
TOKENS_KEY = "input_ids.npy"  # every shard format carries the token ids of its samples
SPLIT_DIRS = {"train": "", "heldout": "heldout"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_path(stage_dir: Path, split: str, index: int) -> Path:
    return Path(stage_dir) / SPLIT_DIRS[split] / f"shard-{index:06d}.tar"


def _receipt_path(shard: Path) -> Path:
    return shard.parent / PARTS / f"{shard.name}.json"


def atomic_write(path: Path, data: bytes, shared: bool = False) -> None:
    """Write under a temporary name, then rename. A shard or receipt has one writer (tasks own
    disjoint shards), so a leftover temp of it is from a killed run and goes; the header and the
    manifest are `shared` by concurrent tasks (same content), so theirs are left alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not shared:
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, a lost mount: say which file, keep what is committed
        raise ShardError(f"{path}: write failed ({e.strerror or e}); everything committed before it is "
                         "intact: fix the cause and rerun to continue") from e
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardRecord:
    file: str  # relative to the stage directory
    samples: int
    tokens: int
    bytes: int
    sha256: str
    totals: dict[str, int] = field(default_factory=dict)  # a stage's own counts, summed per split by the manifest


def encode_shard(samples: Iterable[dict]) -> tuple[bytes, int, int]:
    """Serialise samples ({'__key__': ..., 'name.npy': array, ...}) into tar bytes.

    The tar is reproducible (fixed mtime, owner and order), so equal samples give equal bytes.
    """
    buffer = io.BytesIO()
    count = tokens = 0
    with wds.TarWriter(buffer, mtime=0, user="balcony", group="balcony") as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
            tokens += int(np.asarray(sample[TOKENS_KEY]).size)
    return buffer.getvalue(), count, tokens


def write_shard(stage_dir: Path, split: str, index: int, samples: Iterable[dict],
                totals: dict[str, int] | None = None) -> ShardRecord:
    path = shard_path(stage_dir, split, index)
    data, count, tokens = encode_shard(samples)
    record = ShardRecord(
        file=str(path.relative_to(stage_dir)), samples=count, tokens=tokens, bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), totals=dict(totals or {}),
    )
    atomic_write(path, data)
    atomic_write(_receipt_path(path), json.dumps(asdict(record)).encode())
    return record


def completed_record(stage_dir: Path, split: str, index: int) -> ShardRecord | None:
    """The receipt of a committed shard, or None if the shard still has to be (re)written."""
    path = shard_path(stage_dir, split, index)
    receipt = _receipt_path(path)
    if not (receipt.exists() and path.exists()):
        return None
    record = ShardRecord(**json.loads(receipt.read_text()))
    return record if record.bytes == path.stat().st_size else None


# ---------------------------------------------------------------- header and manifest


def _differ(written: dict, wanted: dict) -> list[str]:
    """Fields of `wanted` that `written` does not hold, the specific ones first ("depths" says more
    than the config hash that covers it)."""
    return [k for k in sorted(wanted, key=lambda k: (k == "config_hash", k)) if written.get(k) != wanted[k]]


def check_format_version(path: Path, written: dict) -> None:
    """Refuse what another version of the pipeline wrote: formats change freely between versions."""
    if written.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: run-directory format {written.get('format_version')!r}, this pipeline writes "
                         f"format {FORMAT_VERSION}: start a new run.dir")


def claim_directory(stage_dir: Path, header: dict, write: bool = True) -> None:
    """Pin `stage_dir` to `header`, or refuse if earlier output was written for something else.

    In a multi-process job every rank checks (so all refuse alike) and one writes (`write`).
    """
    header = {**header, "format_version": FORMAT_VERSION}
    path = Path(stage_dir) / PARTS / "header.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        check_format_version(path, earlier)
        differ = _differ(earlier, header)
        if differ:
            was = ", ".join(f"{k}={earlier.get(k)!r}" for k in differ)
            now = ", ".join(f"{k}={header.get(k)!r}" for k in differ)
            raise ShardError(f"{stage_dir} holds output written with {was}; this run has {now}: "
                             f"use another run.dir or delete {stage_dir}")
        return
    if write:
        atomic_write(path, json.dumps(header, indent=1, sort_keys=True).encode(), shared=True)


def finalize_manifest(stage_dir: Path, header: dict, shard_counts: dict[str, int],
                      summary: Callable[[dict], dict] | None = None) -> dict | None:
    """Write manifest.json once every shard of every split has a receipt (with `summary(splits)`'s
    fields); return it, else None."""
    splits = {}
    for split, count in shard_counts.items():
        records = [completed_record(stage_dir, split, i) for i in range(count)]
        if any(r is None for r in records):
            return None
        splits[split] = {
            "shards": [asdict(r) for r in records],
            "samples": sum(r.samples for r in records),
            "tokens": sum(r.tokens for r in records),
            "bytes": sum(r.bytes for r in records),
            "totals": {key: sum(r.totals.get(key, 0) for r in records) for key in (records[0].totals if records else {})},
        }
    manifest = {**header, **(summary(splits) if summary else {}), "format_version": FORMAT_VERSION, "splits": splits}
    atomic_write(Path(stage_dir) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode(), shared=True)
    return manifest


def manifest_hash(stage_dir: Path) -> str:
    return file_sha256(Path(stage_dir) / MANIFEST)


def read_manifest(stage_dir: Path, stage: str, expect: dict | None = None) -> dict:
    """Load and check a finished stage's manifest; `expect` maps fields to required values."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path} not found: run the {stage} stage first (or let it finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    check_format_version(path, manifest)
    checks = {"stage": stage, **(expect or {})}
    for key in _differ(manifest, checks):
        raise ShardError(f"{path}: {key} is {manifest.get(key)!r}, expected {checks[key]!r}")
    return manifest


def verify_shard(stage_dir: Path, record: dict) -> Path:
    path = Path(stage_dir) / record["file"]
    if not path.exists():
        raise ShardError(f"{path}: missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ShardError(f"{path}: size is {size} bytes, the manifest says {record['bytes']} (truncated or replaced)")
    digest = file_sha256(path)
    if digest != record["sha256"]:
        raise ShardError(f"{path}: sha256 is {digest}, the manifest says {record['sha256']} (corrupt or replaced)")
    return path


def read_shard(stage_dir: Path, record: dict) -> Iterator[dict]:
    """Samples of one shard, in order, after verifying it against its manifest record."""
    path = verify_shard(stage_dir, record)
    dataset = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None).decode()
    count = 0
    for sample in dataset:
        count += 1
        yield sample
    if count != record["samples"]:
        raise ShardError(f"{path}: {count} samples, the manifest says {record['samples']}")
