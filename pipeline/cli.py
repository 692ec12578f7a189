"""The shared command line of every stage: `--config C [key.path=value ...] [--task-index I --num-tasks N]`."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline.config import Config, load_config
from pipeline.distributed import resolve_task
from pipeline.errors import PipelineError


def run_stage(description: str, body: Callable[[Config, tuple[int, int]], None], argv=None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument("--task-index", type=int, default=None, help="this task's index (default: SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--num-tasks", type=int, default=None, help="number of tasks (default: SLURM_ARRAY_TASK_COUNT)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        body(cfg, resolve_task(args.task_index, args.num_tasks))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
