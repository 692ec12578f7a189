"""MLflow: one parent run per pipeline execution, one child run per stage (per task).

The store is the config's `run.tracking_uri`, else MLFLOW_TRACKING_URI (a site config's
`tracking_uri`, exported to its jobs: an MLflow server, `make mlflow-server`), else a SQLite file in
the run root (one machine). `open_pipeline` creates
the parent (params = the flattened config, artifact = the resolved config) and its id travels to
every stage in the environment variable BALCONY_PIPELINE_RUN, across processes and SLURM jobs; each
stage run is nested under it and tagged with stage, pipeline id, config hash and git commit.
The evaluate stage closes the parent with its summary metrics, so parents compare side by side.
A run that raises is marked FAILED, and so is its parent (MLflow's atexit hook would otherwise
mark it FINISHED). Only the process that should log (rank 0) gets a live tracker.

Tracking never fails a stage: a store that cannot be reached (after MLflow's own HTTP retries,
shortened here) is reported once, the stage goes on without it, and what was not logged is
summarised when the stage ends.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline.config import Config
from pipeline.errors import TimeLimit

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A server that is down costs each call ~7 s of retries (1 + 2 + 4), not MLflow's default minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
PIPELINE_RUN = "BALCONY_PIPELINE_RUN"  # the parent run's id, set by stages/run_pipeline.py
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by


def tracking_uri(cfg: Config) -> str:
    """The config's store, else MLFLOW_TRACKING_URI, else one SQLite file in the run root
    (runs/mlflow.db for runs/demo), so sibling runs land in one store and line up in the UI."""
    return (cfg.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{cfg.run_dir.parent / 'mlflow.db'}")


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a sqlite store (MLflow's default is relative to the first client's cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _unreachable(what: str, error: Exception) -> None:
    print(f"warning: tracking: {what} failed ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
          "the stage goes on without MLflow", file=sys.stderr, flush=True)


class Tracker:
    """Logs to the active MLflow run; a disabled tracker (non-zero rank) does nothing. After a call
    fails, it stops calling MLflow and counts what it could not log (`summary`)."""

    def __init__(self, mlflow=None, failed: bool = False):
        self._mlflow, self.failed, self.lost = mlflow, failed, 0

    def _call(self, what: str, call) -> None:
        """`call()` against MLflow, unless an earlier call failed (then it is only counted)."""
        if self._mlflow is None:
            self.lost += self.failed
            return
        try:
            call()
        except Exception as e:  # an unreachable or failing store: never the stage's failure
            _unreachable(what, e)
            self._mlflow, self.failed, self.lost = None, True, self.lost + 1

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", lambda: self._mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step))

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self._call("log_artifact", lambda: self._mlflow.log_artifact(str(path), artifact_path=folder))

    def end(self, status: str) -> None:
        self._call("end_run", lambda: self._mlflow.end_run(status=status))

    def summary(self, name: str) -> None:
        if self.failed:
            print(f"warning: tracking: {name} ran without MLflow after a failure; {self.lost} logging calls were "
                  "dropped (its outputs are complete)", file=sys.stderr, flush=True)


def _connect(cfg: Config):
    """mlflow, pointed at the config's store and experiment (created with artifacts beside the store)."""
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.run.experiment) is None:
        try:
            mlflow.create_experiment(cfg.run.experiment, artifact_location=_artifact_root(uri))
        except mlflow.exceptions.MlflowException:
            # An array's tasks start together: another one may have created it since we looked.
            if mlflow.get_experiment_by_name(cfg.run.experiment) is None:
                raise
    mlflow.set_experiment(cfg.run.experiment)
    return mlflow


def _lineage(cfg: Config, stage: str, config_hash: str) -> dict[str, str]:
    return {"stage": stage, "config_hash": config_hash, "git_commit": git_commit(), "run_dir": str(cfg.run_dir)}


def tolerant(what: str):
    """Decorator: a tracking call that fails warns and returns None instead of failing the caller."""
    def wrap(function):
        def call(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as e:
                _unreachable(what, e)
                return None
        return call
    return wrap


@tolerant("opening the pipeline's parent run")
def open_pipeline(cfg: Config) -> str | None:
    """Create the parent run of one pipeline execution; returns its id (= the pipeline id)."""
    mlflow = _connect(cfg)
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(cfg.run.experiment).experiment_id
    name = f"{cfg.run_dir.name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    run = client.create_run(experiment, run_name=name, tags=_lineage(cfg, "pipeline", cfg.hash()))
    run_id = run.info.run_id
    client.set_tag(run_id, "pipeline_id", run_id)
    params = list(_flatten(cfg.to_dict()).items())
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in params[i:i + 100]])
    client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    return run_id


@tolerant("closing the pipeline's parent run")
def close_pipeline(cfg: Config, metrics: dict[str, float], artifacts: list[Path]) -> None:
    """Give the parent run (if this process belongs to one) the summary metrics, and mark it FINISHED."""
    parent = os.environ.get(PIPELINE_RUN)
    if not parent:
        return
    mlflow = _connect(cfg)
    client = mlflow.MlflowClient()
    stamp = int(time.time() * 1000)
    items = [mlflow.entities.Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(parent, metrics=items[i:i + 1000])
    for path in artifacts:
        client.log_artifact(parent, str(path))
    client.set_terminated(parent, "FINISHED")


@tolerant("marking the pipeline's parent run failed")
def fail_pipeline(cfg: Config) -> None:
    """Mark the parent run (if this process belongs to one) FAILED."""
    parent = os.environ.get(PIPELINE_RUN)
    if parent:
        _connect(cfg).MlflowClient().set_terminated(parent, "FAILED")


@tolerant("starting the stage's run")
def _start_run(cfg: Config, name: str, tags: dict[str, str]):
    mlflow = _connect(cfg)
    mlflow.start_run(run_name=name, tags=tags, log_system_metrics=True)
    try:
        mlflow.log_params(_flatten(cfg.to_dict()))
    except Exception:
        mlflow.end_run(status="FAILED")
        raise
    return mlflow


@contextmanager
def stage_run(cfg: Config, stage: str, config_hash: str, task: tuple[int, int] = (0, 1), enabled: bool = True,
              label: str = ""):
    """A stage's MLflow run; `label` names one of several runs a stage makes (train-exits' baselines)."""
    if not enabled:
        yield Tracker()
        return
    index, count = task
    name = stage if count == 1 else f"{stage}[{index}/{count}]"
    if label:
        name += f" ({label})"
    tags = {**_lineage(cfg, stage, config_hash), "task": f"{index}/{count}", "label": label}
    parent = os.environ.get(PIPELINE_RUN)
    if parent:
        tags.update({"pipeline_id": parent, PARENT_TAG: parent})
    mlflow = _start_run(cfg, name, tags)
    tracker = Tracker(mlflow, failed=mlflow is None)
    try:
        yield tracker
    except TimeLimit:  # requeued: the pipeline goes on
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        fail_pipeline(cfg)  # the pipeline failed with its stage
        raise
    else:
        tracker.end("FINISHED")
    finally:
        tracker.summary(name)
