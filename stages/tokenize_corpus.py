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

from tqdm import tqdm

from pipeline.backbone import load_tokenizer
from pipeline.config import Config
from pipeline.corpus import (document_encoder, pack_shards, plan_shards, scan_group, scan_record, shard_counts,
                             shard_samples, tokens_header)
from pipeline.registry import TOKENIZE
from pipeline.shards import atomic_write, completed_record, write_shard
from pipeline.sources import source_groups, stream_documents
from pipeline.stage import owned_shards, run_sharded, run_stage, stop_at_time_limit

STAGE = TOKENIZE


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
                    stop_at_time_limit(f"before shard {spec.split} {spec.index}")
                    write_shard(out, spec.split, spec.index, shard_samples(spec.split, spec.index, sequences))
                    bar.update(sequences.size)
        return total

    def summary(splits: dict) -> dict:
        """The bad records left out, over the groups that fill shards (each group's scan is recorded
        before its first shard)."""
        return {"skipped_records": sum(json.loads(scan_record(out, g).read_text())["skipped_records"]
                                       for g in {s.group for s in specs})}

    run_sharded(cfg, STAGE.tag, out, tokens_header(cfg, tokenizer), shard_counts(specs), task, write, summary=summary)


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run)
