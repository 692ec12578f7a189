"""How much of trained exits' KL lies where cached top-k targets cannot see: inside the tail.

    python experiments/tail_kl.py --run runs/study/rows/lr4e-3 [--sequences 8]

On held-out sequences of RUN's teacher shards, per exit: the exact full-vocabulary KL(full || exit),
and the KL between the top-k + rest coarse-grainings (what a top-k target trains). Their
difference is the KL inside the rest bucket: how the exit spreads the teacher's tail mass, which
no top-k loss constrains.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.backbone import load_backbone
from pipeline.balcony import BalconyModel
from pipeline.config import load_config
from pipeline.losses import full_kl, sparse_kl
from pipeline.shards import MANIFEST, TOKENS_KEY, read_shard
from pipeline.targets import TARGET_IDS, TARGET_LOGPROBS, TARGETS_KEY, TargetFormat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory with teacher/ and exits/")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "study.yaml")
    parser.add_argument("--sequences", type=int, default=8)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"run.dir={args.run}"])
    backbone = load_backbone(cfg.model)
    model = BalconyModel.from_pretrained(backbone, args.run / "exits").eval()
    teacher_dir = args.run / "teacher"
    manifest = json.loads((teacher_dir / MANIFEST).read_text())
    fmt = TargetFormat.from_manifest(manifest, teacher_dir / MANIFEST)
    samples = [s for record in manifest["splits"]["heldout"]["shards"] for s in read_shard(teacher_dir, record)]
    samples = samples[: args.sequences]
    ids = torch.as_tensor(np.stack([s[TOKENS_KEY] for s in samples])).long()
    decoded = fmt.decode_batch([s[TARGETS_KEY] for s in samples], ids.shape[1])
    target = fmt.target(decoded[TARGET_IDS].flatten(0, 1), decoded[TARGET_LOGPROBS].flatten(0, 1))
    print(f"{args.run}: {ids.numel():,} held-out positions, top-{fmt.entries} targets, "
          f"teacher mass outside them {float(target.rest.mean()):.3f}")
    with torch.no_grad():
        exits, final = model(ids, full=True)
        chunk = 512
        for depth, hidden in exits.items():
            exact = coarse = 0.0
            flat, full = hidden.flatten(0, 1), final.flatten(0, 1)
            for start in range(0, len(flat), chunk):
                stop = min(start + chunk, len(flat))
                logits = model.logits(flat[start:stop])
                exact += float(full_kl(logits, model.logits(full[start:stop]).float().log_softmax(-1))[0].sum())
                coarse += float(sparse_kl(logits, target.rows(start, stop))[0].sum())
            n = len(flat)
            print(f"exit@{depth}: exact KL {exact / n:.3f}, top-{fmt.entries} + rest KL {coarse / n:.3f}, "
                  f"inside the tail {(exact - coarse) / n:.3f} nats")


if __name__ == "__main__":
    main()
