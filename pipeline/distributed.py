"""Who am I: array-task index/count for sharded stages (from flags or SLURM's array variables)."""
from __future__ import annotations

import os

from pipeline.errors import ConfigError


def resolve_task(index: int | None, count: int | None) -> tuple[int, int]:
    """`--task-index/--num-tasks`, defaulting to SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.

    SLURM numbers array tasks from SLURM_ARRAY_TASK_MIN (usually 0); the offset is removed so
    an array `--array=1-4` still yields tasks 0..3.
    """
    env = os.environ
    if index is None and "SLURM_ARRAY_TASK_ID" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if count is None and "SLURM_ARRAY_TASK_COUNT" in env:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    index, count = index or 0, count or 1
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--task-index: must be in [0, {count}) with --num-tasks {count}, got {index}")
    return index, count
