"""Benchmark the exit search's training step: what the head costs a candidate, and what
`search.loss_positions` saves.

    python bench/search_bench.py [--batch 1] [--seq 512] [--repeats 5]

One process, one batch of real text with the teacher stage's own top-64 targets, the demo's recipe
(bf16 autocast, next_layer exits). Steps (forward, backward, AdamW) timed alternately, medians:
- the demo's 3 exits, loss on every position (what train-exits runs);
- the search's candidates (every 2nd depth from 25% to 90% of the layers), loss on every position;
- the same candidates, loss on `search.loss_positions` of the positions (what search-exits runs).
From the two candidate timings, the head's share of a full-position step: the head and loss scale
with the positions they read; the prefix and the exit layers do not.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from pipeline.backbone import load_backbone, load_tokenizer
from pipeline.balcony import BalconyModel
from pipeline.config import AUTO, ModelConfig, load_config
from pipeline.decoder import Decoder
from pipeline.losses import exit_losses
from pipeline.search import candidate_depths
from pipeline.targets import TARGETS_KEY, TargetFormat
from pipeline.teacher import Teacher

from common import BACKBONE, DEMO, corpus_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    demo = load_config(DEMO)
    searched = dataclasses.replace(demo, exits=dataclasses.replace(demo.exits, depths=AUTO, count=3))
    backbone = load_backbone(ModelConfig(backbone=str(BACKBONE)))
    ids = corpus_batch(load_tokenizer(ModelConfig(backbone=str(BACKBONE))), args.batch, args.seq)
    teacher = dataclasses.replace(demo.teacher, fidelity_positions=0)
    fmt = TargetFormat(teacher, backbone.config.vocab_size)
    targets = Teacher(backbone, fmt, teacher).targets(ids.numpy(), [f"b{i}" for i in range(args.batch)])
    batch = {"input_ids.npy": ids, **fmt.decode_batch([t[TARGETS_KEY] for t in targets], ids.shape[1])}
    candidates = candidate_depths(searched, Decoder(backbone).num_layers)
    loss_positions = searched.search.loss_positions

    def stepper(depths: list[int], positions: float):
        model = BalconyModel(backbone, depths, init=demo.exits.init)
        optimizer = torch.optim.AdamW(model.exits.parameters(), lr=1e-5)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=demo.train.autocast_bf16):
                losses = exit_losses(model, model.logits, model.depths, batch, fmt, demo.train.chunk_size, loss_positions=positions)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    runs = {"demo exits": stepper(demo.exits.depths, 1.0), "candidates, every position": stepper(candidates, 1.0),
            f"candidates, {loss_positions:.0%} of positions": stepper(candidates, loss_positions)}
    times = {name: [] for name in runs}
    for step in runs.values():
        step()  # warm-up
    for _ in range(args.repeats):
        for name, step in runs.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    tokens = ids.numel()
    print(f"\nsearch step, SmolLM2-135M (cpu, {torch.get_num_threads()} threads), batch {args.batch} x {args.seq}, "
          f"median of {args.repeats}; demo exits {demo.exits.depths}, candidates {candidates}")
    for name, seconds in median.items():
        print(f"  {name:32s} {seconds:6.2f} s/step  {tokens / seconds:7.0f} tok/s  "
              f"{seconds / median['demo exits']:.2f}x the demo's step")
    full, sampled = median["candidates, every position"], median[f"candidates, {loss_positions:.0%} of positions"]
    head = (full - sampled) / (1 - loss_positions)  # the head and loss at every position
    print(f"  head + loss: {head:.2f} s of the candidates' {full:.2f} s step ({head / full:.0%}); "
          f"{loss_positions:.0%} of positions saves {1 - sampled / full:.0%} of it")


if __name__ == "__main__":
    main()
