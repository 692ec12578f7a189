"""train-exits: train the Balcony exits by self-distillation under DeepSpeed ZeRO.

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 stages/train_exits.py --config configs/demo.yaml
    torchrun --nproc_per_node 2 stages/train_exits.py --config configs/demo.yaml
    python stages/train_exits.py --config configs/demo.yaml            # one process

Reads RUN/teacher/ (or RUN/tokens/ with train.online_teacher), writes RUN/exits/checkpoints/
(resumable) and, at the end, RUN/exits/exits.safetensors + balcony_config.json.
Loss: forward KL(teacher || exit), temperature 1, averaged over exits (or, with train.objective=ce,
next-token cross-entropy: the EE-Tuning baseline). Only exits are trained.
"""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # deepspeed imports mlflow when present
# DeepSpeed 0.19 calls collectives that torch 2.13 renamed; one warning per call drowns the log
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

from pipeline.backbone import backbone_fingerprint, load_backbone
from pipeline.config import AUTO, Config
from pipeline.distributed import init_distributed
from pipeline.registry import SEARCH_EXITS
from pipeline.search import CANDIDATES, resolve_depths, search_steps
from pipeline.stage import run_stage
from pipeline.training import accumulation_steps, train_exits


def run(cfg: Config, task: tuple[int, int]) -> None:
    """The Balcony exits into RUN/exits, then each of train.baselines into RUN/baselines/NAME.
    With exits.depths auto: at the depths search-exits chose, on the tokens it did not read, each
    exit starting from its candidate."""
    searched = cfg.exits.depths == AUTO
    cfg = resolve_depths(cfg)
    rank, world, device = init_distributed()
    for _, recipe, _ in cfg.exit_runs():
        accumulation_steps(recipe, world)  # a config error: before any work
    backbone = load_backbone(cfg.model, device)
    fingerprint = backbone_fingerprint(cfg.model, backbone)
    for name, recipe, out in cfg.exit_runs():
        initial = SEARCH_EXITS.dir(cfg) / CANDIDATES if searched and name == "exits" else None
        train_exits(recipe, out, name, backbone, fingerprint, rank, world, device,
                  search_steps=search_steps(cfg) if searched else 0, initial=initial)


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run)
