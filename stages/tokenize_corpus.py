"""tokenize: a token budget of the corpus -> RUN/tokens/ (webdataset shards, held-out split, manifest).

    python stages/tokenize_corpus.py --config configs/demo.yaml [key.path=value ...]
                                     [--task-index I --num-tasks N]

Task I of N writes block I of the plan's shards (train shards, then held-out shards), reading only
the read groups (data.read_groups) those shards come from, each read once for bad records before
anything is written; whichever task completes the set writes manifest.json. A rerun skips committed
shards; a finished stage is a no-op.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.backbone import load_tokenizer, tokenizer_fingerprint
from pipeline.config import Config
from pipeline.corpus import ShardSpec, check_budget, document_encoder, pack_shards, plan_shards, shard_counts
from pipeline.sources import Group, Scan, scan_sources, source_fingerprint, source_groups, stream_documents
from pipeline.shards import PARTS, TOKENS_KEY, atomic_write, completed_record, write_shard
from pipeline.registry import TOKENIZE
from pipeline.stage import owned_shards, run_sharded, run_stage

STAGE = TOKENIZE


def tokens_header(cfg: Config, tokenizer) -> dict:
    """What the token shards are a function of; pinned in .parts/header.json and the manifest."""
    return {
        "stage": STAGE.tag,
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


def samples(split: str, index: int, sequences: np.ndarray):
    for row, ids in enumerate(sequences):
        yield {"__key__": f"{split}-{index:06d}-{row:06d}", TOKENS_KEY: ids}


def run(cfg: Config, task: tuple[int, int]) -> None:
    out = STAGE.dir(cfg)
    tokenizer = load_tokenizer(cfg.model)
    groups = source_groups(cfg.data)
    specs = plan_shards(cfg.data, groups)
    encode = document_encoder(tokenizer)
    # the groups this task reads: those its shards still to write come from, each read once up front
    reading = sorted({s.group for s in owned_shards(specs, *task) if completed_record(out, s.split, s.index) is None})
    scans = {g: scan_group(cfg, groups[g], specs, encode, tokenizer) for g in reading}

    def write(todo, tracker) -> int:
        wanted = set(todo)
        owned = [s for s in specs if (s.split, s.index) in wanted]
        total = sum(s.sequences for s in owned) * cfg.data.seq_len
        with tqdm(total=total, unit="tok", unit_scale=True, desc=STAGE.name, smoothing=0.1) as bar:
            for g in reading:
                atomic_write(scan_record(out, g), json.dumps({"skipped_records": scans[g].skipped}).encode(), shared=True)
                documents = stream_documents(cfg.data, tokenizer, group=groups[g])
                for spec, sequences in pack_shards(specs, owned, documents, encode, cfg.data, group=g):
                    write_shard(out, spec.split, spec.index, samples(spec.split, spec.index, sequences))
                    bar.update(sequences.size)
        return total

    def summary() -> dict:
        """The bad records left out, over the groups that fill shards (each group's scan is recorded
        before its first shard)."""
        return {"skipped_records": sum(json.loads(scan_record(out, g).read_text())["skipped_records"]
                                       for g in {s.group for s in specs})}

    run_sharded(cfg, STAGE.tag, out, tokens_header(cfg, tokenizer), shard_counts(specs), task, write, summary=summary)


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run)
