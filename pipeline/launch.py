"""Run stages in place, or submit them to SLURM as a chain of jobs, under one MLflow parent run.

In place, each stage is a child process, under the deepspeed launcher when it has more than one:
search-exits and train-exits with --nproc ranks, and every stage that runs the backbone with
model.tensor_parallel > 1 (a group of that many). On SLURM, tokenize and teacher-logits are array
jobs (task i of N writes block i of the shards; with model.tensor_parallel N, a task is a group of N
processes on one node), search-exits and train-exits multi-node jobs (cluster.train), evaluate one
job, each `afterok` on the one before. A stage already complete is skipped, and of an array
stage only the tasks with missing shards are submitted, so resubmitting after a failure or a cancel
redoes only what is missing. Submitted job ids go to RUN/logs/jobs.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import AUTO, ClusterConfig, Config, ConfigError, JobConfig
from pipeline.corpus import plan_shards
from pipeline.distributed import free_port
from pipeline.errors import InputError, PipelineError
from pipeline.shards import atomic_write, completed_record
from pipeline.registry import EXPORT_EXITS, SEARCH_EXITS, STAGES, TOKENIZE, TRAIN_EXITS, export_folder
from pipeline.plan import group_job
from pipeline.search import resolve_depths
from pipeline.stage import owned_shards
from pipeline.tracking import PIPELINE_RUN, fail_pipeline, open_pipeline

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED_STAGES = (SEARCH_EXITS.name, TRAIN_EXITS.name)  # multi-process training: the deepspeed launcher, or srun


def chain(cfg: Config) -> list[str]:
    """The recipe's whole chain, in order: every stage, search-exits only with exits.depths auto,
    export-exits only with export.after_evaluate (else it runs on request: `make stage-export-exits`)."""
    optional = {SEARCH_EXITS.name: cfg.exits.depths == AUTO, EXPORT_EXITS.name: cfg.export.after_evaluate}
    return [name for name in STAGES if optional.get(name, True)]


def needed(cfg: Config, stage: str) -> bool:
    """teacher-logits only runs when something reads its targets (not with train.online_teacher)."""
    if stage == "teacher-logits" and not cfg.reads_cached_targets():
        print("==> teacher-logits skipped: the exits train against the backbone's own forward "
              "(train.online_teacher), so nothing reads cached targets", flush=True)
        return False
    return True


def is_done(cfg: Config, stage: str) -> bool:
    """What a finished stage leaves behind exists (train-exits: the exits and every baseline)."""
    if stage == "train-exits":
        marker = Path(TRAIN_EXITS.done).name  # in RUN/exits and in each RUN/baselines/NAME
        return all((folder / marker).exists() for _, _, folder in cfg.exit_runs())
    if stage == SEARCH_EXITS.name:  # a choice made for other settings is not done: the stage chooses again
        try:
            resolve_depths(cfg)
            return True
        except InputError:
            return False
    if stage == EXPORT_EXITS.name:  # a folder per exported exit, each renamed into place when complete
        if not cfg.export.depths and cfg.exits.depths == AUTO and not is_done(cfg, SEARCH_EXITS.name):
            return False  # which exits there will be is not known yet
        return all(export_folder(cfg, d).exists() for d in cfg.export.depths or resolve_depths(cfg).exits.depths)
    return (cfg.run_dir / STAGES[stage].done).exists()


JOBS_FILE = "logs/jobs.json"


def banner(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def stage_command(stage: str, config: Path, overrides: list[str]) -> list[str]:
    return [str(ROOT / "stages" / STAGES[stage].script), "--config", str(config), *overrides]


def open_parent(cfg: Config) -> None:
    """A run of the whole chain is one pipeline execution: a parent MLflow run its stage runs nest
    under (the evaluate stage closes it)."""
    if PIPELINE_RUN not in os.environ:
        parent = open_pipeline(cfg)  # None when the store cannot be reached: the stages run untracked
        if parent:
            os.environ[PIPELINE_RUN] = parent
            print(f"pipeline: MLflow parent run {parent} in experiment {cfg.run.experiment!r}")


# ---------------------------------------------------------------- in place


def stage_processes(cfg: Config, stage: str, nproc: int) -> int:
    """Processes of a stage run in place: `nproc` ranks for training (a multiple of model.tensor_parallel,
    which is the least), one tensor-parallel group for the other stages that run the backbone."""
    split = cfg.model.tensor_parallel
    if stage in DEEPSPEED_STAGES:
        if nproc % split and nproc > split:
            raise ConfigError(f"--nproc: {nproc} ranks are not whole groups of model.tensor_parallel {split}")
        return max(nproc, split)
    return 1 if stage == TOKENIZE.name else split


def run_in_place(cfg: Config, config: Path, overrides: list[str], stages: list[str], nproc: int) -> None:
    if stages == chain(cfg):
        open_parent(cfg)
    for i, stage in enumerate(stages, 1):
        banner(f"[{i}/{len(stages)}] {stage}")
        if not needed(cfg, stage):
            continue
        started = time.perf_counter()
        processes = stage_processes(cfg, stage, nproc)
        if processes > 1:  # one process per GPU, or gloo ranks sharing the CPU cores
            # a free rendezvous port: DeepSpeed's default 29500 collides with any other run on this machine
            command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(processes),
                       "--master_port", str(free_port()), *stage_command(stage, config, overrides)]
            threads = str(max(1, (os.cpu_count() or 1) // processes))  # more threads than cores: 25-100x slower
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        else:  # one process needs no launcher (its ~10 s of start-up)
            command, env = [sys.executable, *stage_command(stage, config, overrides)], None
        if subprocess.run(command, cwd=os.getcwd(), env=env).returncode != 0:
            fail_pipeline(cfg)  # also when the stage refused its input before opening its own run
            raise PipelineError(f"stage {stage} failed; fix the cause and rerun: finished shards are kept")
        print(f"==> {stage} done in {time.perf_counter() - started:,.0f} s", flush=True)


# ---------------------------------------------------------------- SLURM


@dataclass
class Job:
    stage: str
    job_id: str
    tasks: str  # array indices ("0-3", "1,3") or "" for a single job
    log: str


def pending_tasks(cfg: Config, stage: str, count: int) -> list[int]:
    """Array tasks that still have a shard to write (each owns a block of shards: owned_shards)."""
    shards = [(s.split, s.index) for s in plan_shards(cfg.data)]  # teacher shards are 1:1 with these
    out = STAGES[stage].dir(cfg)
    todo = [i for i in range(count)
            if any(completed_record(out, *s) is None for s in owned_shards(shards, i, count))]
    return todo or [0]  # all shards in but no manifest (a task died finishing it): one task writes it


def sbatch_resources(cluster: ClusterConfig, job: JobConfig) -> list[str]:
    args = [f"--nodes={job.nodes}", f"--ntasks-per-node={job.tasks_per_node}", f"--cpus-per-task={job.cpus_per_task}",
            f"--mem={job.mem}", f"--time={job.time}"]
    if job.gpus_per_node:
        args.append(f"--gpus-per-node={job.gpus_per_node}")
    if cluster.partition:
        args.append(f"--partition={cluster.partition}")
    if cluster.account:
        args.append(f"--account={cluster.account}")
    return args + list(cluster.sbatch_args)


def slurm(cluster: ClusterConfig, *args: str) -> str:
    env = {**os.environ, **({"SLURM_CONF": cluster.slurm_conf} if cluster.slurm_conf else {})}
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    except FileNotFoundError:
        raise PipelineError(f"{args[0]}: not found; is this a SLURM login node? (local test cluster: "
                            "cluster/local/start.sh)") from None
    if proc.returncode != 0:
        raise PipelineError(f"{' '.join(args[:1])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def submit(cfg: Config, cluster: ClusterConfig, config: Path, overrides: list[str], stages: list[str],
           array_tasks: dict[str, int]) -> list[Job]:
    """Submit the stages that are not complete, each `afterok` on the previous one submitted;
    `array_tasks`: the task count of each array stage (the plan's)."""
    logs = cfg.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    whole_chain = stages == chain(cfg)
    for stage in stages:
        if is_done(cfg, stage):
            print(f"pipeline: {stage} is complete ({cfg.run_dir / STAGES[stage].done}); not submitted")
    stages = [stage for stage in stages if not is_done(cfg, stage) and needed(cfg, stage)]
    if not stages:
        return []
    if cluster.tracking_uri:  # the site's MLflow server, for the parent run here and every job's runs
        os.environ["MLFLOW_TRACKING_URI"] = cluster.tracking_uri
    if whole_chain:
        open_parent(cfg)
    # sbatch exports the submitter's environment to the job: the parent run id, and these; the hub is
    # offline in the jobs only where the site says so (`make` sets it offline for this machine's runs)
    offline = "1" if cluster.hub_offline else "0"
    os.environ.update(BALCONY_ENV_SETUP=cluster.env_setup, BALCONY_ROOT=str(ROOT), HF_HUB_OFFLINE=offline,
                      HF_DATASETS_OFFLINE=offline)
    jobs, previous = [], None
    for stage in stages:
        name = f"balcony-{stage}"
        args = ["sbatch", "--parsable", f"--job-name={name}", f"--chdir={os.getcwd()}", "--kill-on-invalid-dep=yes"]
        if cluster.requeue_grace_s:  # the job's processes are told before the time limit; the script requeues
            args += [f"--signal=USR1@{cluster.requeue_grace_s}", "--requeue", "--open-mode=append"]  # one log per task
        if previous:
            args.append(f"--dependency=afterok:{previous}")
        tasks = ""
        if stage in ("tokenize", "teacher-logits"):
            count = array_tasks[stage]
            tasks = ",".join(map(str, pending_tasks(cfg, stage, count)))
            log = logs / f"{stage}-%A_%a.log"
            resources = cluster.tokenize if stage == "tokenize" else group_job(cluster.teacher, cfg.model.tensor_parallel)
            # only the missing tasks may be resubmitted: the task count travels with the job
            args += [f"--array={tasks}", f"--output={log}", f"--export=ALL,BALCONY_NUM_TASKS={count}",
                     *sbatch_resources(cluster, resources)]
            script = "stage.sbatch"
        elif stage in DEEPSPEED_STAGES:
            log = logs / f"{stage}-%j.log"
            args += [f"--output={log}", *sbatch_resources(cluster, cluster.train)]
            script = "train_exits.sbatch"
        else:
            log = logs / f"{stage}-%j.log"
            args += [f"--output={log}", *sbatch_resources(cluster, group_job(cluster.evaluate, cfg.model.tensor_parallel))]
            script = "stage.sbatch"
        job_id = slurm(cluster, *args, str(ROOT / "cluster" / script), *stage_command(stage, config, overrides)).strip()
        job_id = job_id.split(";")[0]  # --parsable prints "id[;cluster]"
        jobs.append(Job(stage, job_id, tasks, str(log).replace("%A", job_id).replace("%j", job_id)))
        print(f"pipeline: submitted {stage} as job {job_id}" + (f" (array tasks {tasks})" if tasks else "")
              + (f", after {previous}" if previous else ""))
        previous = job_id
    record = {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "pipeline_run": os.environ.get(PIPELINE_RUN, ""),
              "slurm_conf": cluster.slurm_conf, "jobs": [asdict(j) for j in jobs]}
    atomic_write(cfg.run_dir / JOBS_FILE, json.dumps(record, indent=1).encode())
    return jobs


def job_states(cluster: ClusterConfig, job: Job) -> list[dict]:
    """One entry per task: id, state, exit code, log path (`scontrol show job` lists array tasks)."""
    out = slurm(cluster, "scontrol", "show", "job", "-o", job.job_id)
    states = []
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        task = fields.get("ArrayTaskId", "")
        log = job.log.replace("%a", task) if task else job.log
        states.append({"id": fields.get("JobId", job.job_id) if not task else f"{job.job_id}_{task}",
                       "state": fields.get("JobState", "?"), "exit": fields.get("ExitCode", "?"),
                       "reason": fields.get("Reason", ""), "log": log})
    return states


FINAL_OK = {"COMPLETED"}
FINAL_BAD = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def status(cluster: ClusterConfig, jobs: list[Job]) -> tuple[list[str], bool, bool]:
    """(report lines, all finished, any failed); a failed task's line names its log file."""
    lines, finished, failed = [], True, False
    for job in jobs:
        for task in job_states(cluster, job):
            state = task["state"]
            finished &= state in FINAL_OK | FINAL_BAD
            failed |= state in FINAL_BAD
            detail = f"  log {task['log']}" if state in FINAL_BAD or state == "RUNNING" else ""
            if state == "PENDING" and task["reason"] not in ("", "None"):
                detail = f"  ({task['reason']})"
            lines.append(f"{job.stage:15s} {task['id']:12s} {state:11s} exit {task['exit']:5s}{detail}")
    return lines, finished, failed


def load_jobs(cfg: Config) -> list[Job]:
    path = cfg.run_dir / JOBS_FILE
    if not path.exists():
        raise PipelineError(f"{path}: no submitted jobs for run.dir {cfg.run_dir}; submit with CLUSTER=slurm first")
    return [Job(**j) for j in json.loads(path.read_text())["jobs"]]


def wait(cluster: ClusterConfig, jobs: list[Job], poll_s: float = 2.0) -> bool:
    """Poll until every job is in a final state (after a failure the dependent jobs are cancelled by
    --kill-on-invalid-dep); True if all completed."""
    while True:
        lines, finished, failed = status(cluster, jobs)
        if finished:
            print("\n".join(lines))
            return not failed
        time.sleep(poll_s)
