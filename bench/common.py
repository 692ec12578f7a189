"""What the benchmarks share: the demo backbone, real text batches, and A/B timing."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = ROOT / "assets" / "smollm2-135m-instruct"
DEMO = ROOT / "configs" / "demo.yaml"


def corpus_batch(tokenizer, batch: int, seq: int) -> torch.Tensor:
    """Real text: documents taken in turn from each collection, joined by EOS, cut to [batch, seq]."""
    files = [path.open() for path in sorted((ROOT / "assets" / "corpus").glob("*.jsonl"))]
    ids: list[int] = []
    while len(ids) < batch * seq:
        for f in files:
            ids += tokenizer(json.loads(f.readline())["text"])["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids[: batch * seq]).view(batch, seq)


def compare(baseline, candidate, repeats: int) -> tuple[float, float]:
    """Median wall times of two callables, run alternately after a warm-up of each, so that
    drift in the machine's speed hits both alike."""
    baseline(), candidate()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((baseline, times[0]), (candidate, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])
