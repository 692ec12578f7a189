"""The SLURM path on a real local cluster (cluster/local/, 2 emulated nodes): array jobs, 2-node
search-exits and train-exits jobs, the whole chain through `make pipeline CLUSTER=slurm`, failures,
resubmission and a requeue at the time limit."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, config_file, tree_bytes

pytestmark = [pytest.mark.system, pytest.mark.integration]  # a local SLURM cluster (slurmctld, slurmd, munge: Debian packages, root)

TINY = {
    "model": {"num_layers": 3},
    "data": {"train_tokens": 4096, "sequences_per_shard": 8},  # 4 train shards and 1 held-out
    "exits": {"depths": [1, 2]},
    "teacher": {"batch_size": 4, "chunk_size": 256, "fidelity_positions": 0},
    "train": {"tokens_per_step": 1024, "micro_batch_size": 4, "chunk_size": 256, "max_steps": 3},
    "eval": {"max_sequences": 4, "latency_batches": [1], "prompt_tokens": 8, "new_tokens": 4, "repeats": 1,
             "speculative_prompts": 2, "speculative_batches": [1, 2], "max_drafts": [2], "draft_taus": [0.5]},
}
PORT = 26817  # not the default 16817, so a user's own local cluster is left alone


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Start the local cluster (installing SLURM if missing); yield a site config for it; stop it."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_PORT": str(PORT)}
    started = time.perf_counter()
    proc = subprocess.run([str(ROOT / "cluster/local/start.sh"), "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"local SLURM cluster up in {time.perf_counter() - started:.1f} s: {proc.stdout.strip()}")
    site = state / "site.yaml"
    site.write_text(yaml.safe_dump({
        "partition": "local", "env_setup": f"source {ROOT}/.venv/bin/activate" if (ROOT / ".venv").exists() else "",
        "slurm_conf": str(state / "slurm.conf"), "array_tasks": 2, "hub_offline": True,
        "tokenize": {"mem": "2G"}, "teacher": {"mem": "2G"}, "train": {"nodes": 2, "tasks_per_node": 1, "mem": "2G"}, "evaluate": {"mem": "2G"}}))
    yield site
    subprocess.run([str(ROOT / "cluster/local/stop.sh")], env=env, capture_output=True, text=True, timeout=120)


def _config(folder: Path, tracking_uri: str, name: str, **extra) -> Path:
    return config_file(folder, tracking_uri, name, TINY, **extra)


def launch(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "stages/run_pipeline.py"), "--config", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"run_pipeline {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# exits.depths auto: search-exits is one more job of the chain, on the training resources
AUTO = {"model": {"num_layers": 6}, "exits": {"depths": "auto", "count": 1},  # of the candidates 2 and 4
        "search": {"stride": 2, "tokens": 1024, "heldout_tokens": 512, "cost": "layers"},
        "train": {"max_steps": 0}}  # an epoch is 4 steps: 1 for the search, 3 for train-exits


def test_make_pipeline_on_slurm(cluster, tmp_path, tracking_uri):
    """`make pipeline CLUSTER=slurm` with exits.depths auto: array tokenize/teacher, search-exits and
    train-exits on 2 nodes (2 ranks), evaluate; train-exits and evaluate use the depths the search
    chose; one parent run."""
    import mlflow

    config = _config(tmp_path, tracking_uri, "slurm", run={"experiment": "slurm-chain"}, **AUTO)
    started = time.perf_counter()
    proc = subprocess.run(["make", "--no-print-directory", "pipeline", f"CONFIG={config}", "CLUSTER=slurm",
                           f"CLUSTER_CONFIG={cluster}", "WAIT=1"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"chained pipeline on the local cluster: {time.perf_counter() - started:.0f} s wall")
    run = tmp_path / "slurm"
    assert re.search(r"submitted tokenize as job \d+ \(array tasks 0,1\)", proc.stdout)
    assert re.search(r"submitted evaluate as job \d+, after \d+", proc.stdout)

    jobs = json.loads((run / "logs/jobs.json").read_text())["jobs"]
    assert [j["stage"] for j in jobs] == ["tokenize", "teacher-logits", "search-exits", "train-exits", "evaluate"]
    for stage in ("tokenize", "teacher-logits"):  # one log per array task, offline as the site asks
        logs = list((run / "logs").glob(f"{stage}-*_[01].log"))
        assert len(logs) == 2 and all("(hub offline: 1)" in log.read_text() for log in logs)
    search_log = Path(jobs[2]["log"]).read_text()
    assert "search-exits (candidates): 2 ranks" in search_log and "exits [" in search_log, search_log[-2000:]
    train_log = Path(jobs[3]["log"]).read_text()
    assert "on n[1-2]: 2 processes" in train_log and "train-exits (exits): 2 ranks" in train_log, train_log[-2000:]
    assert len(re.findall(r"^step \d+/3 ", train_log, re.M)) == 3
    chosen = json.loads((run / "search/result.json").read_text())["chosen"]
    assert json.loads((run / "eval/metrics.json").read_text())["depths"] == chosen

    # array output is byte-identical to the same stages run in place by one process
    reference = _config(tmp_path, tracking_uri, "inplace", **AUTO)
    launch(reference, "--stages", "tokenize,teacher-logits")
    for stage in ("tokens", "teacher"):
        assert tree_bytes(run / stage) == tree_bytes(tmp_path / "inplace" / stage), stage

    status = subprocess.run(["make", "--no-print-directory", "-s", "status", f"CONFIG={config}", "CLUSTER=slurm",
                             f"CLUSTER_CONFIG={cluster}"], capture_output=True, text=True, cwd=ROOT)
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 7, status.stdout + status.stderr

    # lineage: one FINISHED parent, every stage nested under it, in the same store as in-place runs
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["slurm-chain"])
    parent = runs[runs["tags.stage"] == "pipeline"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    children = runs[runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]]
    assert sorted(children["tags.stage"]) == ["evaluate", "search-exits", "search-exits", "teacher", "teacher",
                                              "tokenize", "tokenize", "train-exits"]  # search: training, scoring
    assert (children["tags.pipeline_id"] == parent.iloc[0]["run_id"]).all()
    assert parent.iloc[0]["metrics.exit1_kl"] > 0  # metrics go by the exit's ordinal

    rerun = launch(config, "--cluster", str(cluster))
    assert rerun.stdout.count("is complete") == 5 and "(none: all complete)" in rerun.stdout


def test_resubmits_only_missing_tasks(cluster, tmp_path, tracking_uri):
    """A lost shard of task 1 (of 2): the rerun submits array task 1 alone and restores the bytes."""
    config = _config(tmp_path, tracking_uri, "resubmit")
    launch(config, "--stages", "tokenize", "--cluster", str(cluster), "--wait")
    out = tmp_path / "resubmit" / "tokens"
    complete = tree_bytes(out)
    (out / "manifest.json").unlink()
    (out / "shard-000003.tar").unlink()  # task 1 of 2 owns the second block: train shards 2 and 3, held-out 0
    proc = launch(config, "--stages", "tokenize", "--cluster", str(cluster), "--wait")
    assert "(array tasks 1)" in proc.stdout, proc.stdout
    assert tree_bytes(out) == complete


def test_failed_task_reported_with_log(cluster, tmp_path, tracking_uri):
    """A failing array task: --wait fails, status names the task's log, the next stage never runs."""
    config = _config(tmp_path, tracking_uri, "failing", data={"files": [str(tmp_path / "missing-*.jsonl")]})
    proc = launch(config, "--stages", "tokenize,teacher-logits", "--cluster", str(cluster), "--wait", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [line for line in proc.stdout.splitlines() if " FAILED " in line]
    assert len(failed) == 2, proc.stdout
    log = Path(failed[0].split(" log ")[1].strip())
    assert log.exists() and "error: data.files" in log.read_text(), log.read_text()[-2000:]
    assert re.search(r"teacher-logits .* CANCELLED", proc.stdout), proc.stdout


def daemon_log_lines(cluster: Path, job_id: str) -> str:
    """What slurmctld and the slurmd nodes logged about a job: why a launch failed is only there."""
    lines = []
    for log in sorted((cluster.parent / "log").glob("slurm*.log")):
        lines += [f"{log.name}: {line}" for line in log.read_text().splitlines() if re.search(rf"\b{job_id}\b", line)]
    return "\n" + "\n".join(lines[-40:])


def test_time_limit_requeue(cluster, tmp_path, tracking_uri):
    """A teacher-logits task stopped by its time limit (SLURM signals it requeue_grace_s before) is
    requeued, resumes from its committed shards and finishes; the dependent train-exits job waits for
    it, then runs; the shards are byte-identical to an uninterrupted run's. To keep the test short, it
    lifts the requeued task's time limit and SLURM's start delay for requeued jobs (~2 minutes)."""
    from pipeline.config import load_cluster_config, load_config
    from pipeline.launch import load_jobs, slurm, wait

    site = yaml.safe_load(cluster.read_text())
    site.update(array_tasks=1, requeue_grace_s=90, teacher={"mem": "2G", "time": "10"})
    limited = tmp_path / "limited.yaml"
    limited.write_text(yaml.safe_dump(site))
    data = {"train_tokens": 49152, "sequences_per_shard": 16}  # ~60-80 s of teacher work here, 25 shards
    config = _config(tmp_path, tracking_uri, "requeue", data=data, teacher={"k": 8})
    reference = _config(tmp_path, tracking_uri, "uninterrupted", data=data, teacher={"k": 8})
    launch(config, "--stages", "tokenize")
    launch(config, "--stages", "teacher-logits,train-exits", "--cluster", str(limited))
    # the uninterrupted run, in place, while the cluster's job works and waits for its signal
    reference_log = tmp_path / "uninterrupted.log"
    with open(reference_log, "w") as log_file:
        uninterrupted = subprocess.Popen([sys.executable, str(ROOT / "stages/run_pipeline.py"), "--config", str(reference),
                                          "--stages", "tokenize,teacher-logits"], cwd=ROOT, stdout=log_file,
                                         stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    sites = load_cluster_config(limited)
    teacher, train = load_jobs(load_config(config))
    task = f"{teacher.job_id}_0"
    # once the task has committed a shard, a 2-minute limit makes the warning (90 s before it) due at
    # once: it comes at SLURM's next check (~30 s), with most of the work still to do, however loaded
    # the machine is
    deadline = time.monotonic() + 300
    while not list((tmp_path / "requeue" / "teacher" / ".parts").glob("shard-*.json")):
        assert time.monotonic() < deadline, slurm(sites, "scontrol", "show", "job", "-o", task)
        time.sleep(0.5)
    slurm(sites, "scontrol", "update", f"JobId={task}", "TimeLimit=2")
    deadline = time.monotonic() + 300
    while "Restarts=0" in (state := slurm(sites, "scontrol", "show", "job", "-o", task)) or "JobState=PENDING" not in state:
        assert "JobState=COMPLETED" not in state and time.monotonic() < deadline, state
        time.sleep(1)
    # lifted only once the requeue has finished (PENDING, no longer COMPLETING): a start granted earlier is
    # either overridden by the requeue's own delay or races the old batch step still on the node
    slurm(sites, "scontrol", "update", f"JobId={task}", "TimeLimit=10", "StartTime=now")
    finished = wait(sites, [teacher, train])
    log = Path(teacher.log.replace("%a", "0")).read_text()
    assert finished, log[-3000:] + daemon_log_lines(cluster, teacher.job_id)
    assert "stopped before the time limit" in log and "requeued (restart 1)" in log, log[-3000:]
    resumed = re.search(r"task 0/1: (\d+) of 25 shards to write", log.split("requeued (restart 1)")[1])
    assert resumed and int(resumed[1]) < 25, log[-3000:]  # the shards committed before the signal were kept
    assert "step 3/3" in Path(train.log).read_text()

    assert uninterrupted.wait(timeout=600) == 0, reference_log.read_text()[-3000:]
    assert tree_bytes(tmp_path / "requeue" / "teacher") == tree_bytes(tmp_path / "uninterrupted" / "teacher")


def test_tensor_parallel_on_slurm(cluster, tmp_path, tracking_uri):
    """model.tensor_parallel 2 on the cluster (a tiny Llama over the real vocabulary: 4 heads): each
    teacher-logits array task is a group of 2 processes on one node, whose rank 0 writes; train-exits
    is 2 nodes x 2 ranks, 2 groups of 2, ZeRO-2 over all 4."""
    from test_tensor_parallel import tiny_llama_with_the_real_vocabulary

    from conftest import BACKBONE

    backbone = tiny_llama_with_the_real_vocabulary(tmp_path / "llama")
    config = _config(tmp_path, tracking_uri, "split", model={"backbone": str(backbone), "tokenizer": str(BACKBONE),
                                                             "tensor_parallel": 2, "num_layers": 0},
                     train={"micro_batch_size": 2})
    launch(config, "--stages", "tokenize")
    site = yaml.safe_load(cluster.read_text())
    site["train"].update(tasks_per_node=2)
    two_per_node = tmp_path / "two-per-node.yaml"
    two_per_node.write_text(yaml.safe_dump(site))
    launch(config, "--stages", "teacher-logits,train-exits", "--cluster", str(two_per_node), "--wait")
    run = tmp_path / "split"
    logs = sorted((run / "logs").glob("teacher-logits-*_[01].log"))
    assert len(logs) == 2 and all(", 2 processes" in log.read_text() for log in logs), [l.read_text()[-1500:] for l in logs]
    manifest = json.loads((run / "teacher" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 4
    jobs = json.loads((run / "logs/jobs.json").read_text())["jobs"]
    train_log = Path(jobs[1]["log"]).read_text()
    assert "on n[1-2]: 4 processes" in train_log, train_log[-2000:]
    assert "4 ranks (tensor-parallel groups of 2), ZeRO-2" in train_log, train_log[-2000:]
    assert len(re.findall(r"^step \d+/3 ", train_log, re.M)) == 3 and (run / "exits" / "exits.safetensors").exists()
