"""Sources -> documents -> token budget -> packed sequences, laid out so that tasks work alone.

The layout is a pure function of the config, so any number of tasks produce the same bytes:

- documents come from `pipeline.sources` (local text/JSONL/parquet or a hub dataset) in a
  seeded order; document j is held out when a hash of (seed, j) falls below `heldout_fraction`;
- each split needs `round(tokens / seq_len)` sequences, cut into shards of `sequences_per_shard`;
- each document goes to the shard of its split that has received the fewest characters per
  sequence so far (characters, not tokens: every task can route every document without
  tokenizing it), and a shard packs its own documents, each followed by EOS, until its sequences
  are full; the tail of the document that overflows a shard is dropped. Balancing by length
  rather than by count keeps shards filling at the same pace, so budgets close to the corpus
  size still fit.

So a shard depends only on its own documents: a task tokenizes just the documents of the shards
it owns, and a rerun redoes only missing shards.

With `data.read_groups` G > 1 the source's files are cut into G groups (`sources.source_groups`);
each split's sequences are shared between the groups in proportion to their size, each group's share
is cut into its own shards, and all of the above happens within a group, over its own documents
(seed + group for its order and its held-out choice). A task then reads only the groups its shards
come from, and a group's shards are all written once its documents are packed.
"""
from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.backbone import tokenizer_fingerprint
from pipeline.config import Config, DataConfig
from pipeline.errors import InputError
from pipeline.registry import TOKENIZE
from pipeline.shards import PARTS, TOKENS_KEY
from pipeline.sources import (Group, Scan, hub_documents, sample_documents, scan_sources, source_fingerprint,
                              source_groups)

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    sequences: int
    group: int = 0  # the read group (data.read_groups) whose documents fill it


def apportion(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights`, in whole units (largest remainders first, ties to the
    earlier one): the same for every task."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))[: total - sum(shares)]:
        shares[i] += 1
    return shares


def plan_shards(data: DataConfig, groups: list[Group] | None = None) -> list[ShardSpec]:
    """Every shard of both splits, train first: the unit of work, of resume and of task splitting.
    With read groups, each split's sequences are shared between the groups by size, and each group's
    share cut into its own shards (`groups`: source_groups, or looked up here)."""
    weights = [1.0] if data.read_groups == 1 else [g.weight for g in groups or source_groups(data)]
    specs = []
    for split, tokens in (("train", data.train_token_count), ("heldout", data.heldout_tokens)):
        index = 0
        for group, sequences in enumerate(apportion(max(1, round(tokens / data.seq_len)), weights)):
            for start in range(0, sequences, data.sequences_per_shard):
                specs.append(ShardSpec(split, index, min(data.sequences_per_shard, sequences - start), group))
                index += 1
    return specs


def shard_counts(specs: Iterable[ShardSpec]) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for spec in specs:
        counts[spec.split] += 1
    return counts


def is_heldout(seed: int, doc_index: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def check_budget(data: DataConfig, scan: Scan, encode, tokenizer, needed: int | None = None,
                 files: str = "the files") -> None:
    """Refuse, before any work, a budget the source plainly cannot fill. Local files (`files`, whose
    share of the budget is `needed`, by default all of it): their tokens estimated from the characters
    the scan counted, at the characters per token of a sample of each file. A hub dataset: the
    documents its metadata counts, at the tokens per document of its first ones. An estimate, so only
    a shortfall beyond BUDGET_MARGIN is refused here; packing names a closer one."""
    if data.source == "hub":
        documents = hub_documents(data)
        if documents is None:
            print(f"tokenize: {data.hub_name} has no split sizes in its metadata; a budget it cannot fill is "
                  "found when its documents run out", flush=True)
            return
        sample = sample_documents(data, tokenizer, HUB_SAMPLE)
        per_document = sum(len(ids) for ids in encode(sample)) / len(sample)
        estimate, where = round(documents * per_document), f"{data.hub_name} ({data.hub_split})"
        basis = (f"{documents:,} documents by its metadata at {per_document:,.0f} tokens each, measured on the "
                 f"first {len(sample)}")
    else:
        sample = encode(scan.sample)
        per_token = sum(map(len, scan.sample)) / sum(len(ids) for ids in sample)
        estimate, where = round(scan.characters / per_token), files
        basis = (f"{scan.characters:,} characters in {scan.documents:,} documents at {per_token:.2f} characters "
                 f"per token, measured on {len(sample)} of them")
    share = needed is not None
    needed = needed if share else data.train_token_count + data.heldout_tokens
    if estimate * BUDGET_MARGIN < needed:
        raise InputError(
            f"data.train_tokens: {where} hold{'s' if data.source == 'hub' else ''} about {estimate:,} tokens "
            f"({basis}), fewer than the {needed:,} that {'their share of ' if share else ''}data.train_tokens "
            "and data.heldout_tokens ask for; lower them or add " + ("data" if data.source == "hub" else "files")
            + (", or lower data.read_groups" if share else ""))


HUB_SAMPLE = 256  # a hub dataset's first documents, whose tokens per document scale its document count
BUDGET_MARGIN = 1.1  # the estimate's error, generously: characters per token vary between documents


# ---------------------------------------------------------------- packing


def document_encoder(tokenizer):
    """texts -> token ids per document, with the tokenizer's own special tokens, then EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("model.tokenizer: the tokenizer has no EOS token to separate documents")

    def encode(texts: list[str]) -> list[list[int]]:
        return [ids + [eos] for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]

    return encode


class ShardPacker:
    """Concatenates one shard's documents (each + EOS) until `sequences * seq_len` tokens."""

    def __init__(self, spec: ShardSpec, seq_len: int):
        self.spec, self.seq_len = spec, seq_len
        self.capacity = spec.sequences * seq_len
        self.buffer = np.empty(self.capacity, dtype=np.int32)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == self.capacity

    def add(self, token_ids: list[int]) -> None:
        take = min(len(token_ids), self.capacity - self.filled)
        self.buffer[self.filled : self.filled + take] = token_ids[:take]
        self.filled += take

    def sequences(self) -> np.ndarray:
        assert self.full, "a shard is only emitted when full"
        return self.buffer.reshape(self.spec.sequences, self.seq_len)


class Router:
    """Deterministic document -> shard routing: least characters per sequence of capacity first."""

    def __init__(self, specs: Iterable[ShardSpec]):
        self.heaps: dict[str, list[tuple[float, int, int]]] = {split: [] for split in SPLITS}
        for spec in specs:
            self.heaps[spec.split].append((0.0, spec.index, spec.sequences))
        for heap in self.heaps.values():
            heapq.heapify(heap)

    def route(self, split: str, text: str) -> int | None:
        heap = self.heaps[split]
        if not heap:  # a read group too small for a shard of this split
            return None
        load, index, sequences = heap[0]
        heapq.heapreplace(heap, (load + len(text) / sequences, index, sequences))
        return index


def pack_shards(
    specs: list[ShardSpec],
    owned: list[ShardSpec],
    documents: Iterable[str],
    encode,
    data: DataConfig,
    batch_documents: int = 64,
    group: int = 0,
) -> Iterator[tuple[ShardSpec, np.ndarray]]:
    """Yield (spec, [sequences, seq_len] int32) for each owned shard of read group `group` as soon as
    it is full, from that group's `documents`.

    `specs` is the whole plan (its shards of `group` decide the routing); `owned` the shards to build
    here; `encode(texts) -> list[list[int]]` tokenizes a batch and appends EOS to each document.
    """
    specs = [s for s in specs if s.group == group]
    owned = [s for s in owned if s.group == group]
    router = Router(specs)
    packers = {(s.split, s.index): ShardPacker(s, data.seq_len) for s in owned}
    pending: list[tuple[ShardPacker, str]] = []

    def flush():
        for packer, ids in zip([p for p, _ in pending], encode([t for _, t in pending])):
            if not packer.full:
                packer.add(ids)
                if packer.full:
                    yield packer.spec, packer.sequences()
                    del packers[(packer.spec.split, packer.spec.index)]
        pending.clear()

    for doc_index, text in enumerate(documents):
        if not packers:
            return
        split = "heldout" if is_heldout(data.seed + group, doc_index, data.heldout_fraction) else "train"
        packer = packers.get((split, router.route(split, text)))
        if packer is not None:
            pending.append((packer, text))
        if len(pending) >= batch_documents:
            yield from flush()
    yield from flush()
    if packers:
        short = min(packers.values(), key=lambda p: p.filled / p.capacity)
        where = f" (read group {group} of {data.read_groups})" if data.read_groups > 1 else ""
        raise InputError(
            f"data.train_tokens: the corpus ran out of documents{where}: shard {short.spec.split}/{short.spec.index} "
            f"got {short.filled} of {short.capacity} tokens; lower data.train_tokens / data.heldout_tokens "
            f"or add documents"
        )


# ---------------------------------------------------------------- the tokenize stage


def tokens_header(cfg: Config, tokenizer) -> dict:
    """What the token shards are a function of; pinned in .parts/header.json and the manifest."""
    return {
        "stage": TOKENIZE.tag,
        "config_hash": cfg.hash("data"),
        "input_fingerprint": source_fingerprint(cfg.data),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": cfg.data.seq_len,
    }


def scan_group(cfg: Config, group: Group, specs: list[ShardSpec], encode, tokenizer) -> Scan:
    """Read every record of a read group before anything is written: a bad one is refused (or counted),
    and a budget share its files cannot fill is refused."""
    scan = scan_sources(cfg.data, group=group)
    if cfg.data.read_groups == 1 or cfg.data.source == "hub":  # a hub card counts the whole split only
        check_budget(cfg.data, scan, encode, tokenizer)
    else:
        needed = sum(s.sequences for s in specs if s.group == group.index) * cfg.data.seq_len
        names = ", ".join(Path(f).name for f in group.files)
        check_budget(cfg.data, scan, encode, tokenizer, needed, f"read group {group.index} ({names})")
    return scan


def scan_record(out: Path, group: int) -> Path:
    return out / PARTS / f"scan-group-{group:04d}.json"


def shard_samples(split: str, index: int, sequences: np.ndarray):
    """A token shard's samples: one per packed sequence, keyed split-shard-row."""
    for row, ids in enumerate(sequences):
        yield {"__key__": f"{split}-{index:06d}-{row:06d}", TOKENS_KEY: ids}
