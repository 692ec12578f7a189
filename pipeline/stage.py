"""The skeleton every stage shares: its command line, and the loop of a sharded stage.

    python stages/SCRIPT --config C [key.path=value ...] [--task-index I --num-tasks N]

A sharded stage pins its output directory to a header (what the output is a function of), skips
when the manifest already exists, writes its share (block I of N) of the shards not committed yet,
and writes the manifest when the last shard of the set is in.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, load_config, reference_text
from pipeline.distributed import rank_zero_view, resolve_task, writes_files
from pipeline.errors import REQUEUE_EXIT, PipelineError, TimeLimit
from pipeline.shards import MANIFEST, claim_directory, completed_record, finalize_manifest, read_manifest
from pipeline.tracking import Tracker, stage_run


_time_limit_signalled = False


def watch_time_limit() -> None:
    """SLURM sends SIGUSR1 `requeue_grace_s` before the time limit (sbatch --signal). The handler only
    records it; the stage stops at its next safe point (`stop_at_time_limit`: between batches, shards or
    training steps). An exception raised by the handler itself would land wherever the process is: inside
    a library call that swallows or rewraps it (the tracker's), or between two collectives of a
    multi-rank job, leaving the other ranks waiting."""

    def handler(signum, frame):
        global _time_limit_signalled
        _time_limit_signalled = True

    signal.signal(signal.SIGUSR1, handler)


def time_limit_signalled(group=None) -> bool:
    """Whether SLURM's warning has reached this process or, given the process `group` that does the next
    piece of work together (a tensor-parallel group, training's ranks), any of its ranks: every rank of
    the group gets the same answer at the same point (a collective), so all of them stop there together."""
    import torch
    import torch.distributed as dist

    if group is None:
        return _time_limit_signalled
    cuda = dist.get_backend(group) == "nccl"
    signalled = torch.tensor([float(_time_limit_signalled)],
                             device=torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
    dist.all_reduce(signalled, op=dist.ReduceOp.MAX, group=group)
    return bool(signalled.item())


def stop_at_time_limit(where: str, group=None) -> None:
    """A safe point of a stage whose work is committed piece by piece (shards) or cheap to redo (scores):
    after SLURM's warning, stop here (with every rank of `group`, see time_limit_signalled); the requeued
    job redoes what was under way."""
    if time_limit_signalled(group):
        raise TimeLimit(where)


def run_stage(description: str, body: Callable[[Config, tuple[int, int]], None], argv=None) -> None:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="config keys (YAML sections, or key.path=value overrides):\n" + reference_text())
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument("--task-index", type=int, default=None, help="this task's index (default: SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--num-tasks", type=int, default=None, help="number of tasks (default: SLURM_ARRAY_TASK_COUNT)")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    watch_time_limit()
    try:
        cfg = load_config(args.config, args.overrides)
        body(cfg, resolve_task(args.task_index, args.num_tasks))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TimeLimit as e:
        print(f"{Path(sys.argv[0]).stem}: stopped before the time limit ({e}); what was committed stays and the "
              "requeued job resumes from it", file=sys.stderr, flush=True)
        sys.exit(REQUEUE_EXIT)


Shard = tuple[str, int]  # (split, index)


def owned_shards(shards: list, index: int, count: int) -> list:
    """Task `index` of `count` owns a contiguous block of the shard list (train, then held-out): with
    read groups, a task's block touches only a few groups, so it reads only those."""
    return shards[index * len(shards) // count:(index + 1) * len(shards) // count]


def run_sharded(
    cfg: Config,
    stage: str,
    out: Path,
    header: dict,
    counts: dict[str, int],
    task: tuple[int, int],
    write: Callable[[list[Shard], Tracker], int],
    summary: Callable[[dict], dict] | None = None,
) -> dict | None:
    """Drive a sharded stage; `write(todo, tracker)` commits the given shards and returns tokens written.
    `summary(splits)`: fields the manifest adds when the set is complete (from the splits' shard records;
    the numeric ones are logged too). A task of several processes (the ranks of a tensor-parallel group)
    runs `write` on each, on rank 0's view of what is to do; only rank 0 writes files (`writes_files`)
    and tracks.

    Returns the manifest once the set is complete (now or earlier), else None.
    """
    lead = writes_files()
    claim_directory(out, header, write=lead)  # refuses a directory written from other inputs
    shards = [(split, index) for split, count in counts.items() for index in range(count)]
    index, count = task
    complete = (out / MANIFEST).exists()
    todo = [s for s in owned_shards(shards, index, count) if completed_record(out, *s) is None]
    complete, todo = rank_zero_view(complete, todo)
    if complete:
        manifest = read_manifest(out, stage, expect=header)
        print(f"{stage}: {out} is complete ({manifest['splits']['train']['tokens']:,} train tokens); nothing to do")
        return manifest
    if not lead:  # computes beside rank 0, which writes
        write(todo, Tracker())
        return None
    print(f"{stage}: task {index}/{count}: {len(todo)} of {len(shards)} shards to write into {out}")
    with stage_run(cfg, stage, header["config_hash"], task) as tracker:
        start = time.perf_counter()
        tokens = write(todo, tracker) if todo else 0
        seconds = time.perf_counter() - start
        tracker.metrics({"tokens_written": tokens, "shards_written": len(todo),
                         "tokens_per_s": tokens / seconds if seconds > 0 else 0.0})
        added = {}  # the summary's fields, logged beside the manifest's own figures

        def summarise(splits: dict) -> dict:
            added.update(summary(splits) if summary else {})
            return added

        manifest = finalize_manifest(out, header, counts, summarise)
        if manifest is None:
            print(f"{stage}: task {index}/{count} done; the manifest is written when the other tasks finish")
            return None
        train, heldout = manifest["splits"]["train"], manifest["splits"]["heldout"]
        tracker.metrics({"tokens": train["tokens"], "sequences": train["samples"], "shards": len(train["shards"]),
                         "heldout_tokens": heldout["tokens"],
                         "bytes_per_token": (train["bytes"] + heldout["bytes"]) / (train["tokens"] + heldout["tokens"]),
                         **{k: v for k, v in added.items() if isinstance(v, (int, float))}})
        tracker.artifact(out / MANIFEST)
        print(f"{stage}: wrote {out / MANIFEST}: {train['tokens']:,} train tokens in {len(train['shards'])} shards, "
              f"{heldout['tokens']:,} held-out tokens ({tokens / max(seconds, 1e-9):,.0f} tok/s)")
        return manifest
