"""search-exits: candidate exits at many depths, trained at once and scored; where the exits go.

    python stages/search_exits.py --config configs/demo.yaml exits.depths=auto exits.count=3
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 stages/search_exits.py --config C exits.depths=auto exits.budgets=[0.5,0.7]

Runs with exits.depths auto, after teacher-logits and before train-exits (pipeline/search.py says
how it chooses). Writes RUN/search/candidates/ (trained by train-exits' own loop: resumable),
RUN/search/scores.json (each candidate's held-out quality and relative decode cost), then
table.md, plot.png and RUN/search/result.json (the chosen depths; written last). Asked again with
another exits.count or exits.budgets, it chooses again from the scores in a moment.
"""
from __future__ import annotations

import json
import time

import torch.distributed as dist

from pipeline.backbone import backbone_fingerprint, load_backbone
from pipeline.config import AUTO, Config
from pipeline.decoder import Decoder
from pipeline.distributed import init_distributed
from pipeline.errors import ConfigError
from pipeline.registry import SEARCH_EXITS
from pipeline.search import (CANDIDATES, SCORES, candidate_depths, candidates_config, candidates_hash, choose_depths,
                             score_candidates, search_steps)
from pipeline.shards import FORMAT_VERSION, atomic_write, claim_directory
from pipeline.stage import run_stage
from pipeline.training import train_exits

STAGE = SEARCH_EXITS


def run(cfg: Config, task: tuple[int, int]) -> None:
    if cfg.exits.depths != AUTO:
        raise ConfigError(f"exits.depths: {cfg.exits.depths} is given; search-exits chooses them when it is auto")
    rank, world, device = init_distributed()
    backbone = load_backbone(cfg.model, device)
    fingerprint = backbone_fingerprint(cfg.model, backbone)
    depths = candidate_depths(cfg, Decoder(backbone).num_layers)
    out = STAGE.dir(cfg)
    header = {"stage": STAGE.tag, "candidates_hash": candidates_hash(cfg), "backbone_fingerprint": fingerprint,
              "candidates": depths}
    claim_directory(out, header, write=rank == 0)
    dist.barrier()
    if not (out / SCORES).exists():
        started = time.perf_counter()
        train_exits(candidates_config(cfg, depths), out / CANDIDATES, "candidates", backbone, fingerprint, rank, world,
                    device, stage=STAGE, search_steps=search_steps(cfg))
        if rank < cfg.model.tensor_parallel:  # rank 0's group scores (a split backbone runs on all its ranks)
            scores = score_candidates(cfg, backbone, fingerprint, device)
            scores.update(header, format_version=FORMAT_VERSION, seconds=time.perf_counter() - started)
            if rank == 0:
                atomic_write(out / SCORES, json.dumps(scores, indent=1).encode())
    dist.barrier()
    if rank == 0:
        choose_depths(cfg, out, header)


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run)
