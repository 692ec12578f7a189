"""tokenize: a token budget of the corpus -> RUN/tokens/ (webdataset shards, held-out split, manifest).

    python stages/tokenize_corpus.py --config configs/demo.yaml [key.path=value ...]
                                     [--task-index I --num-tasks N]

Task I of N writes shards I::N of the plan (train shards, then held-out shards); whichever task
completes the set writes manifest.json. A rerun skips committed shards; a finished stage is a no-op.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from pipeline.backbone import load_tokenizer, tokenizer_fingerprint
from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.corpus import document_encoder, pack_shards, plan_shards, shard_counts, source_fingerprint, stream_documents
from pipeline.shards import MANIFEST, TOKENS_KEY, claim_directory, completed_record, finalize_manifest, read_manifest, write_shard
from pipeline.tracking import stage_run

STAGE = "tokenize"


def tokens_header(cfg: Config, tokenizer) -> dict:
    """What the token shards are a function of; pinned in .parts/header.json and the manifest."""
    return {
        "stage": STAGE,
        "config_hash": cfg.hash("data"),
        "input_fingerprint": source_fingerprint(cfg.data),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": cfg.data.seq_len,
    }


def samples(split: str, index: int, sequences: np.ndarray):
    for row, ids in enumerate(sequences):
        yield {"__key__": f"{split}-{index:06d}-{row:06d}", TOKENS_KEY: ids}


def tokenize(cfg: Config, task: tuple[int, int]) -> None:
    out = cfg.run_dir / "tokens"
    tokenizer = load_tokenizer(cfg.model)
    header = tokens_header(cfg, tokenizer)
    claim_directory(out, header)  # refuses a directory written for other data or another tokenizer
    if (out / MANIFEST).exists():
        manifest = read_manifest(out, STAGE, expect=header)
        print(f"tokenize: {out} is complete ({manifest['splits']['train']['tokens']:,} train tokens); nothing to do")
        return

    specs = plan_shards(cfg.data)
    index, count = task
    todo = [s for s in specs[index::count] if completed_record(out, s.split, s.index) is None]
    print(f"tokenize: task {index}/{count}: {len(todo)} of {len(specs)} shards to write into {out}")
    with stage_run(cfg, STAGE, header["config_hash"], task) as tracker:
        start = time.perf_counter()
        written = sum(s.sequences for s in todo) * cfg.data.seq_len
        if todo:
            documents = stream_documents(cfg.data, tokenizer)
            with tqdm(total=written, unit="tok", unit_scale=True, desc="tokenize", smoothing=0.1) as bar:
                for spec, sequences in pack_shards(specs, todo, documents, document_encoder(tokenizer), cfg.data):
                    write_shard(out, spec.split, spec.index, samples(spec.split, spec.index, sequences))
                    bar.update(sequences.size)
        seconds = time.perf_counter() - start
        tracker.metrics({"tokens_written": written, "shards_written": len(todo),
                         "tokens_per_s": written / seconds if seconds > 0 else 0.0})
        manifest = finalize_manifest(out, header, shard_counts(specs))
        if manifest is None:
            print(f"tokenize: task {index}/{count} done; the manifest is written when the other tasks finish")
            return
        train = manifest["splits"]["train"]
        tracker.metrics({"tokens": train["tokens"], "sequences": train["samples"], "shards": len(train["shards"]),
                         "heldout_tokens": manifest["splits"]["heldout"]["tokens"]})
        tracker.artifact(out / MANIFEST)
        print(f"tokenize: wrote {out / MANIFEST}: {train['tokens']:,} train tokens in {len(train['shards'])} shards, "
              f"{manifest['splits']['heldout']['tokens']:,} held-out tokens ({written / max(seconds, 1e-9):,.0f} tok/s)")


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], tokenize)
