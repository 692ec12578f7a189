"""Benchmark train-exits: tokens/s with cached teacher targets vs an online teacher, and peak memory.

    python bench/train_bench.py [--batch 2] [--seq 512] [--repeats 3]

Same model (the demo backbone with the demo exits), same batches, same optimizer step; each mode
runs in its own process so that its peak memory (max RSS, or CUDA max allocated) is its own, and
the cached mode's targets are made beforehand by a third process (the teacher stage's own code),
so that its peak does not include the teacher's forward.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from pipeline.backbone import load_backbone, load_tokenizer
from pipeline.balcony import BalconyModel
from pipeline.config import ModelConfig, load_config
from pipeline.losses import exit_losses
from pipeline.targets import TARGET_IDS, TARGET_LOGPROBS, TARGETS_KEY, TargetFormat
from pipeline.teacher import Teacher

from common import BACKBONE, DEMO, corpus_batch


TEACHER = dataclasses.replace(load_config(DEMO).teacher, fidelity_positions=0)  # the demo's target format


def make_targets(batch: int, seq: int, out: str) -> None:
    """The cached mode's targets, by the teacher stage's own code, saved to `out` (.npz)."""
    model_cfg = ModelConfig(backbone=str(BACKBONE))
    backbone, tokenizer = load_backbone(model_cfg), load_tokenizer(model_cfg)
    ids = corpus_batch(tokenizer, batch, seq)
    fmt = TargetFormat(TEACHER, backbone.config.vocab_size)
    targets = Teacher(backbone, fmt, TEACHER).targets(ids.numpy(), [f"b{i}" for i in range(batch)])
    np.savez(out, **{k: v.numpy() for k, v in fmt.decode_batch([t[TARGETS_KEY] for t in targets], seq).items()})


def measure(mode: str, batch: int, seq: int, repeats: int, targets: str | None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = ModelConfig(backbone=str(BACKBONE))
    backbone, tokenizer = load_backbone(model_cfg, device), load_tokenizer(model_cfg)
    demo = load_config(DEMO)
    ids = corpus_batch(tokenizer, batch, seq)
    inputs = {"input_ids.npy": ids.to(device)}
    fmt = None
    if mode == "cached":
        fmt = TargetFormat(TEACHER, backbone.config.vocab_size)
        with np.load(targets) as arrays:
            inputs.update({k: torch.as_tensor(arrays[k]).to(device) for k in (TARGET_IDS, TARGET_LOGPROBS)})
    model = BalconyModel(backbone, demo.exits.depths)
    optimizer = torch.optim.AdamW(model.exits.parameters(), lr=1e-4)

    def step():
        losses = exit_losses(model, model.logits, model.depths, inputs, fmt, demo.train.chunk_size)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "tok_s": ids.numel() / sorted(times)[len(times) // 2], "peak_bytes": peak,
            "depths": model.depths, "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=["targets", "cached", "online"], help="one step of the bench (internal)")
    parser.add_argument("--targets", help="the cached mode's targets (.npz; internal)")
    args = parser.parse_args()
    if args.mode == "targets":
        make_targets(args.batch, args.seq, args.targets)
        return
    if args.mode:
        print(json.dumps(measure(args.mode, args.batch, args.seq, args.repeats, args.targets)))
        return
    results = {}
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        targets = ["--targets", f"{tmp}/targets.npz"]
        subprocess.run([sys.executable, __file__, "--mode", "targets", *shape, *targets], check=True)
        for mode in ("cached", "online"):
            out = subprocess.run([sys.executable, __file__, "--mode", mode, *shape, *targets],
                                 capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    cached, online = results["cached"], results["online"]
    print(f"\ntrain-exits step, SmolLM2-135M ({cached['device']}), exits {cached['depths']} of 30, "
          f"batch {args.batch} x {args.seq}, median of {args.repeats}")
    for r in (cached, online):
        print(f"  {r['mode']:7s} teacher: {r['tok_s']:8.0f} tok/s   peak memory {r['peak_bytes'] / 2**30:6.2f} GiB")
    print(f"  ratio cached / online: {cached['tok_s'] / online['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
