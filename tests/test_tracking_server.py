"""Tracking as a cluster does it: a real MLflow server (`make mlflow-server`) taking eight stage
processes that log at once, and a stage that finishes while the server is down."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ONE_THREAD, ROOT, tiny_config

pytestmark = pytest.mark.integration  # runs the stages as processes

TASKS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, assets):
    """`make mlflow-server` on a free port; yields (url, stop)."""
    port = _free_port()
    proc = subprocess.Popen(["make", "--no-print-directory", "mlflow-server", f"MLFLOW_STORE={tmp_path / 'server/mlflow.db'}",
                             f"MLFLOW_PORT={port}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.5)

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)

    yield url, stop
    stop()


def test_concurrent_stage_runs_and_a_server_that_goes_away(server, tmp_path):
    import mlflow

    url, stop = server
    config = tiny_config(tmp_path, url, "tracked", run={"experiment": "concurrent"})
    script = str(ROOT / "stages/tokenize_corpus.py")
    tasks = [subprocess.Popen([sys.executable, script, "--config", str(config), "--task-index", str(i),
                               "--num-tasks", str(TASKS)], cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(TASKS)]
    for task in tasks:
        out, err = task.communicate(timeout=600)
        assert task.returncode == 0 and "tracking" not in err, err[-2000:]

    mlflow.set_tracking_uri(url)
    runs = mlflow.search_runs(experiment_names=["concurrent"])
    assert sorted(runs["tags.mlflow.runName"]) == sorted(f"tokenize[{i}/{TASKS}]" for i in range(TASKS))
    assert (runs["status"] == "FINISHED").all()
    assert runs["metrics.shards_written"].sum() == 34 and runs["metrics.tokens_written"].notna().all()
    client = mlflow.MlflowClient()
    with_manifest = [r for r in runs["run_id"] if "manifest.json" in [a.path for a in client.list_artifacts(r)]]
    # Logged through the server's artifact proxy by the task that saw the last shard in (tasks finishing
    # together may both write the same manifest, see shards.atomic_write), not by every task.
    assert 1 <= len(with_manifest) < TASKS

    stop()
    started = time.perf_counter()
    alone = subprocess.run([sys.executable, script, "--config", str(config), f"run.dir={tmp_path / 'untracked'}"],
                           cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "warning: tracking: starting the stage's run failed" in alone.stderr
    assert "ran without MLflow after a failure" in alone.stderr
    assert (tmp_path / "untracked/tokens/manifest.json").exists()
    print(f"tokenize without its tracking server: {time.perf_counter() - started:.0f} s")
