"""Benchmark train-exits: tokens/s with cached teacher targets vs an online teacher, and peak memory.

    python bench/train_bench.py [--batch 2] [--seq 512] [--repeats 3]

Same model (the demo backbone with the demo exits), same batches, same optimizer step; each mode
runs in its own process so that its peak memory (max RSS, or CUDA max allocated) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from pipeline.backbone import load_backbone, load_tokenizer
from pipeline.balcony import BalconyModel
from pipeline.config import ModelConfig, TeacherConfig, load_config
from pipeline.losses import exit_losses
from pipeline.targets import TargetFormat
from pipeline.teacher import Teacher

from common import BACKBONE, ROOT, corpus_batch


def measure(mode: str, batch: int, seq: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = ModelConfig(backbone=str(BACKBONE))
    lm, tokenizer = load_backbone(model_cfg, device), load_tokenizer(model_cfg)
    demo = load_config(ROOT / "configs" / "demo.yaml")
    ids = corpus_batch(tokenizer, batch, seq)
    inputs = {"input_ids.npy": ids.to(device)}
    fmt = None
    if mode == "cached":  # targets made by the teacher stage's own code, outside the timing
        teacher_cfg = TeacherConfig(k=demo.teacher.k, fidelity_positions=0)
        fmt = TargetFormat(teacher_cfg, lm.config.vocab_size)
        targets = Teacher(lm, fmt, teacher_cfg).targets(ids.numpy(), [f"b{i}" for i in range(batch)])
        inputs.update({k: torch.as_tensor(np.stack([t[k] for t in targets])).to(device)
                       for k in (fmt.ids_key, fmt.logprobs_key)})
    model = BalconyModel(lm, demo.exits.depths)
    optimizer = torch.optim.AdamW(model.exits.parameters(), lr=1e-4)

    def step():
        kls = exit_losses(model, model.logits, model.depths, inputs, fmt, demo.train.chunk_size)
        kls.mean().backward()
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
    parser.add_argument("--mode", choices=["cached", "online"], help="measure one mode and print JSON (internal)")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.batch, args.seq, args.repeats)))
        return
    results = {}
    for mode in ("cached", "online"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--batch", str(args.batch), "--seq",
                              str(args.seq), "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    cached, online = results["cached"], results["online"]
    print(f"\ntrain-exits step, SmolLM2-135M ({cached['device']}), exits {cached['depths']} of 30, "
          f"batch {args.batch} x {args.seq}, median of {args.repeats}")
    for r in (cached, online):
        print(f"  {r['mode']:7s} teacher: {r['tok_s']:8.0f} tok/s   peak memory {r['peak_bytes'] / 2**30:6.2f} GiB")
    print(f"  ratio cached / online: {cached['tok_s'] / online['tok_s']:.2f}x "
          f"(anchors.md component timings suggest ~1.25x for exits 15/18/21 of 32 on an H200)")


if __name__ == "__main__":
    main()
