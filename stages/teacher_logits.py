"""teacher-logits: RUN/tokens/ + the frozen backbone -> RUN/teacher/ (compact teacher targets).

    python stages/teacher_logits.py --config configs/demo.yaml [key.path=value ...]
                                    [--task-index I --num-tasks N]
    torchrun --nproc-per-node 2 stages/teacher_logits.py ... model.tensor_parallel=2   # one task, split

Teacher shards are 1:1 with token shards (same keys, same order) and add the target arrays of
`teacher.format`. Token shards are checked (tokenizer, seq_len, checksums) before any compute.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from pipeline.backbone import backbone_fingerprint, load_backbone, load_tokenizer, resolve_dtype, tokenizer_fingerprint
from pipeline.config import Config
from pipeline.decoder import tensor_parallel_group
from pipeline.distributed import group_device, writes_files
from pipeline.shards import TOKENS_KEY, manifest_hash, read_manifest, read_shard, write_shard
from pipeline.registry import TEACHER_LOGITS, TOKENIZE
from pipeline.stage import run_sharded, run_stage, stop_at_time_limit
from pipeline.targets import TARGETS_KEY, TargetFormat
from pipeline.teacher import Teacher

STAGE = TEACHER_LOGITS


def run(cfg: Config, task: tuple[int, int]) -> None:
    tokens_dir, out = TOKENIZE.dir(cfg), STAGE.dir(cfg)
    tokenizer = load_tokenizer(cfg.model)
    tokens = read_manifest(tokens_dir, TOKENIZE.tag, expect={
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "seq_len": cfg.data.seq_len})
    device = group_device(cfg.model.tensor_parallel)  # a task is one process, or one group whose rank 0 writes
    backbone = load_backbone(cfg.model, device)
    fmt = TargetFormat(cfg.teacher, backbone.config.vocab_size)
    header = {
        "stage": STAGE.tag,
        "config_hash": cfg.hash("teacher"),
        "input_manifest_hash": manifest_hash(tokens_dir),
        "tokenizer_fingerprint": tokens["tokenizer_fingerprint"],
        "backbone_fingerprint": backbone_fingerprint(cfg.model, backbone),
        "dtype": str(resolve_dtype(cfg.model, device)).removeprefix("torch."),
        "seq_len": cfg.data.seq_len,
        "target_format": fmt.describe(),
    }
    records = {split: info["shards"] for split, info in tokens["splits"].items()}
    teacher = Teacher(backbone, fmt, cfg.teacher)
    group = tensor_parallel_group(backbone)  # the ranks that run each batch together: they stop together

    def write(todo, tracker) -> int:
        total = sum(records[split][index]["tokens"] for split, index in todo)
        with tqdm(total=total, unit="tok", unit_scale=True, desc=STAGE.name, smoothing=0.1,
                  disable=not writes_files()) as bar:
            for split, index in todo:
                samples = list(read_shard(tokens_dir, records[split][index]))  # verifies the checksum first
                targets = []
                for start in range(0, len(samples), cfg.teacher.batch_size):
                    stop_at_time_limit(f"in shard {split} {index}, written again after the requeue", group)
                    batch = samples[start : start + cfg.teacher.batch_size]
                    keys = [s["__key__"] for s in batch]
                    targets += teacher.targets(np.stack([s[TOKENS_KEY] for s in batch]), keys)
                    bar.update(sum(s[TOKENS_KEY].size for s in batch))
                encoded = [(t[TARGETS_KEY], s[TOKENS_KEY].size) for s, t in zip(samples, targets)]
                totals = {"target_bytes": sum(data.nbytes for data, _ in encoded),
                          "target_entries": sum(fmt.stored_entries(data, positions) for data, positions in encoded)}
                if writes_files():
                    write_shard(out, split, index, ({"__key__": s["__key__"], TOKENS_KEY: s[TOKENS_KEY], **t}
                                                    for s, t in zip(samples, targets)), totals)
                tracker.metrics(teacher.fidelity.summary())
        return total

    def summary(splits: dict) -> dict:
        """What the targets cost: bytes and stored (id, log-prob) entries per token (a sampled position
        stores its distinct draws), over both splits."""
        tokens = sum(s["tokens"] for s in splits.values())
        return {"target_bytes_per_token": sum(s["totals"]["target_bytes"] for s in splits.values()) / tokens,
                "target_entries_per_token": sum(s["totals"]["target_entries"] for s in splits.values()) / tokens}

    counts = {split: len(shards) for split, shards in records.items()}
    run_sharded(cfg, STAGE.tag, out, header, counts, task, write, summary)


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run)
