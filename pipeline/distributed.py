"""Who am I: array-task index/count for sharded stages, rank/world/device for training, and whether
this process writes its task's files (the only one, or rank 0 of a tensor-parallel group)."""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch

from pipeline.errors import ConfigError, PipelineError


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


def writes_files() -> bool:
    """Whether this process writes its task's files: the only one, or rank 0 of a task's processes."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def rank_zero_view(*values):
    """`values` as rank 0 of a multi-process task sees them (one decision, however the files change)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    shared = list(values)
    dist.broadcast_object_list(shared, src=0)
    return tuple(shared)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) after joining the process group: NCCL on GPUs, gloo on CPU.

    Works under `deepspeed` and `torchrun` (which set RANK/WORLD_SIZE/...), under `srun` with one
    task per process (RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), and
    as plain `python` with one process (DeepSpeed would otherwise look for MPI).
    """
    import deepspeed

    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host()
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))  # same on every task
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        use_the_environment_s_ninja()
        refuse_stale_build_lock("deepspeed_shm_comm")
    # a site that binds one GPU to each task shows every rank a single device 0
    index = int(env.get("LOCAL_RANK", 0)) % torch.cuda.device_count() if cuda else 0
    if cuda:
        torch.cuda.set_device(index)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if not cuda:
        _release_shm_workspace(int(env["RANK"]))
    device = torch.device("cuda", index) if cuda else torch.device("cpu")
    return int(env["RANK"]), int(env["WORLD_SIZE"]), device


def group_device(tensor_parallel: int) -> torch.device:
    """The device of a stage that runs the backbone as one process, or as one tensor-parallel group of
    `tensor_parallel` ranks (teacher-logits' task, evaluate, export: started by torchrun or srun), joined here."""
    if tensor_parallel == 1:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, world, device = init_distributed()
    if world != tensor_parallel:
        raise ConfigError(f"model.tensor_parallel: this stage runs as one group of {tensor_parallel} ranks; it has "
                          f"{world} (torchrun --nproc-per-node {tensor_parallel}, or srun --ntasks {tensor_parallel})")
    return device


def _release_shm_workspace(rank: int) -> None:
    """DeepSpeed's CPU collectives give each rank a 66 MB segment in /dev/shm and never unlink it, so
    every run leaves them behind until the machine runs out of memory. Once every rank has mapped
    every segment (init_distributed maps them; the barrier waits for all ranks), unlink ours: the
    mappings live on, and the memory goes back when the last rank exits, however it exits."""
    env = os.environ
    segment = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                                  f"{env.get('MASTER_PORT', '')}_{rank}")
    if segment.exists():  # only when all ranks are on this machine (DeepSpeed's LOCAL_SIZE rule)
        torch.distributed.barrier()
        segment.unlink(missing_ok=True)


STALE_LOCK_S = 600  # the shared-memory op builds in 1-2 minutes alone, 10-15 on two busy cores


def _build_running(directory: Path) -> bool:
    """Whether a process on this machine works in `directory`: torch runs ninja, and ninja the
    compiler, there."""
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)) == directory:
                return True
        except OSError:  # gone, or not ours to read
            continue
    return False


def use_the_environment_s_ninja() -> None:
    """torch builds DeepSpeed's CPU op with the first `ninja` on PATH. Where a machine has two (the
    one pip installs into the environment, and a system one that PATH finds when the environment is
    not activated) their build logs hash the same command differently, so each rebuilds the op the
    other built, minutes each time. Every process uses the environment's own."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if Path(bin_dir, "ninja").exists() and not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def build_cpu_collectives() -> None:
    """DeepSpeed's shared-memory CPU collectives, JIT-built as a CPU run's first start would build
    them (`make setup` does it once, so that no stage waits on the build); nothing on a GPU machine."""
    if torch.cuda.is_available():
        return
    from deepspeed.comm.torch import build_shm_op

    use_the_environment_s_ninja()
    build_shm_op()


def refuse_stale_build_lock(op: str) -> None:
    """DeepSpeed's CPU collectives JIT-build a torch extension on a machine's first run, under a lock
    file. A build killed mid-way leaves the lock, and every later start then waits on it forever,
    silently: refuse instead, naming the file. A lock is stale when it is old and no build runs
    here (a slow build on a loaded machine holds it for good reason)."""
    from torch.utils.cpp_extension import _get_build_directory

    directory = Path(_get_build_directory(op, verbose=False)).resolve()
    lock = directory / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S and not _build_running(directory):
        raise PipelineError(f"{lock}: left by a build of DeepSpeed's {op} op that was killed "
                            f"{(time.time() - lock.stat().st_mtime) / 60:.0f} min ago; every start would wait on it "
                            "forever: remove the file (the op is rebuilt on the next start)")


def _first_slurm_host() -> str:
    """The address of the job's first node (rank 0 runs there): its NodeAddr in SLURM, which is the
    host name on most clusters and an IP where node names do not resolve (e.g. the local test cluster)."""
    import subprocess

    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True).stdout.split()[0]
        info = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True, text=True).stdout
    except (OSError, IndexError, subprocess.CalledProcessError) as e:
        raise ConfigError(f"MASTER_ADDR: not set, and the SLURM node list {nodes!r} cannot be expanded ({e})") from None
    fields = dict(item.split("=", 1) for item in info.split() if "=" in item)
    return fields.get("NodeAddr", first)


def free_port() -> int:
    """A TCP port nothing listens on now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
