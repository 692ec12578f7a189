"""tokenize: a token budget of the corpus -> RUN/tokens/ (webdataset shards, held-out split, manifest).

    python stages/tokenize_corpus.py --config configs/demo.yaml [key.path=value ...]
                                     [--task-index I --num-tasks N]

Task I of N writes shards I::N of the plan (train shards, then held-out shards); whichever task
completes the set writes manifest.json. A rerun skips committed shards; a finished stage is a no-op.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from pipeline.backbone import load_tokenizer, tokenizer_fingerprint
from pipeline.config import Config
from pipeline.corpus import check_budget, document_encoder, pack_shards, plan_shards, shard_counts
from pipeline.sources import scan_sources, source_fingerprint, stream_documents
from pipeline.shards import TOKENS_KEY, write_shard
from pipeline.registry import TOKENIZE
from pipeline.stage import run_sharded, run_stage

STAGE = TOKENIZE


def tokens_header(cfg: Config, tokenizer) -> dict:
    """What the token shards are a function of; pinned in .parts/header.json and the manifest.
    Reads every record first: a bad one is refused (or counted), and a budget the files cannot fill
    refused, before anything is written."""
    scan = scan_sources(cfg.data)
    check_budget(cfg.data, scan, document_encoder(tokenizer), tokenizer)
    return {
        "stage": STAGE.tag,
        "config_hash": cfg.hash("data"),
        "input_fingerprint": source_fingerprint(cfg.data),
        "skipped_records": scan.skipped,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": cfg.data.seq_len,
    }


def samples(split: str, index: int, sequences: np.ndarray):
    for row, ids in enumerate(sequences):
        yield {"__key__": f"{split}-{index:06d}-{row:06d}", TOKENS_KEY: ids}


def run(cfg: Config, task: tuple[int, int]) -> None:
    out = STAGE.dir(cfg)
    tokenizer = load_tokenizer(cfg.model)
    specs = plan_shards(cfg.data)

    def write(todo, tracker) -> int:
        wanted = set(todo)
        owned = [s for s in specs if (s.split, s.index) in wanted]
        total = sum(s.sequences for s in owned) * cfg.data.seq_len
        documents = stream_documents(cfg.data, tokenizer)
        with tqdm(total=total, unit="tok", unit_scale=True, desc=STAGE.name, smoothing=0.1) as bar:
            for spec, sequences in pack_shards(specs, owned, documents, document_encoder(tokenizer), cfg.data):
                write_shard(out, spec.split, spec.index, samples(spec.split, spec.index, sequences))
                bar.update(sequences.size)
        return total

    header = tokens_header(cfg, tokenizer)
    # directories of earlier versions hold no skipped_records: they skipped none
    also = {"skipped_records": None} if header["skipped_records"] == 0 else None
    run_sharded(cfg, STAGE.tag, out, header, shard_counts(specs), task, write, also=also)


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run)
