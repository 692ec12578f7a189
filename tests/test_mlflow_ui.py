"""Two in-place pipeline runs (sampled vs top-k targets) in one store, then the real MLflow server
(`make mlflow-ui`) and headless Chromium on its compare page: both runs and their per-exit metrics
must be on the rendered page. The screenshot stays in test-artifacts/."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ARTIFACTS, PIPELINES, ROOT, tiny_config

pytestmark = pytest.mark.integration  # runs the stages as processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_pipelines(finished_run, tmp_path_factory):
    """Two finished pipeline executions in one store: the tests' finished tiny run (sampled targets)
    and one `make pipeline` with top-k targets and a smaller budget, in its store; returns (store path,
    experiment)."""
    folder = tmp_path_factory.mktemp("ui")
    store = finished_run[0].parent / "mlflow.db"
    tracking_uri = f"sqlite:///{store}"
    config = tiny_config(folder, tracking_uri, "topk", run={"experiment": PIPELINES}, teacher={"format": "topk"},
                         data={"train_tokens": 2048}, train={"max_steps": 2})
    # one rank: the ranks are train-exits' tests; these are about what reaches MLflow
    proc = subprocess.run(["make", "--no-print-directory", "pipeline", f"CONFIG={config}", "CLUSTER=", "NPROC=1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one clear line per stage transition
    assert [line for line in proc.stdout.splitlines() if line.startswith("==> [")] == [
        "==> [1/4] tokenize", "==> [2/4] teacher-logits", "==> [3/4] train-exits", "==> [4/4] evaluate"]
    return store, PIPELINES


def test_pipeline_lineage(two_pipelines):
    import mlflow

    store, experiment = two_pipelines
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(experiment_names=[experiment])
    parents = runs[runs["tags.stage"] == "pipeline"]
    assert len(parents) == 2 and (parents["status"] == "FINISHED").all()
    for _, parent in parents.iterrows():
        children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
        stages = ["evaluate", "teacher", "tokenize", "train-exits"]  # and export-exits where the config asks
        assert sorted(children["tags.stage"]) in (stages, sorted([*stages, "export-exits"]))
        assert (children["tags.pipeline_id"] == parent["run_id"]).all()
        assert children["tags.git_commit"].str.fullmatch(r"[0-9a-f]{40}|unknown").all()
        assert children["tags.config_hash"].str.fullmatch(r"[0-9a-f]{16}").all()
        client = mlflow.MlflowClient()
        assert "config.yaml" in [a.path for a in client.list_artifacts(parent["run_id"])]
        assert {"metrics.json", "plot.png"} <= {a.path for a in client.list_artifacts(parent["run_id"])}
        evaluate = children[children["tags.stage"] == "evaluate"].iloc[0]
        assert {"metrics.json", "plot.png", "table.md"} <= {a.path for a in client.list_artifacts(evaluate["run_id"])}
        tokenize = children[children["tags.stage"] == "tokenize"].iloc[0]
        assert "manifest.json" in [a.path for a in client.list_artifacts(tokenize["run_id"])]
    # the same metric names in both pipelines, so the compare view lines them up
    assert parents["metrics.exit1_kl"].notna().all() and parents["metrics.lens2_kl"].notna().all()


@pytest.fixture(scope="module")
def mlflow_ui(two_pipelines):
    """`make mlflow-ui` on a free port; yields its base URL; stops the server's process group."""
    store, _ = two_pipelines
    port = _free_port()
    server = subprocess.Popen(["make", "--no-print-directory", "mlflow-ui", f"MLFLOW_STORE={store}", f"MLFLOW_PORT={port}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        assert server.poll() is None, server.stdout.read()
    else:
        pytest.fail("the MLflow server did not answer /health within 120 s")
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def test_server_binds_localhost_only(mlflow_ui):
    """The kernel's listening sockets on the server's port: 127.0.0.1 only, no wildcard, no IPv6."""
    port = f"{int(mlflow_ui.rsplit(':', 1)[1]):04X}"
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and local.endswith(f":{port}"):  # 0A = LISTEN
                listening.append(local)
    assert listening == [f"0100007F:{port}"], listening


@pytest.mark.system  # Chromium (a Debian package)
def test_compare_page_in_chromium(mlflow_ui, two_pipelines, tmp_path):
    import mlflow

    store, experiment = two_pipelines
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs it (make system-deps)")
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.stage = 'pipeline'")
    ids, names = list(runs["run_id"]), list(runs["tags.mlflow.runName"])
    experiment_id = runs["experiment_id"].iloc[0]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment_id])})
    page = f"{mlflow_ui}/#/compare-runs?{query}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "mlflow-compare.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,2400",
             "--virtual-time-budget=15000"]
    dom = subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom", page],
                         capture_output=True, text=True, timeout=180).stdout
    shot = subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'shot'}", f"--screenshot={screenshot}", page],
                          capture_output=True, text=True, timeout=180)
    (ARTIFACTS / "mlflow-compare.html").write_text(dom)
    print(f"screenshot: {screenshot}")
    assert screenshot.exists() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    for name in names:  # both pipeline runs
        assert name in dom, f"run {name!r} is not on the compare page"
    # the UI renders the first rows of its (virtualised) metrics table: the per-exit ones come first
    for metric in ("exit1_kl", "exit1_perplexity", "exit1_top1", "exit1_speedup_b1", "exit2_kl", "exit2_perplexity"):
        assert metric in dom, f"metric {metric} is not on the compare page"
    # the params that differ are shown too (the first rows of their table: the data budget, not the format)
    assert "data.train_tokens" in dom and "2048" in dom and "8192" in dom
    for artifact in ("config.yaml", "metrics.json", "plot.png"):
        assert artifact in dom, f"artifact {artifact} is not listed on the compare page"
