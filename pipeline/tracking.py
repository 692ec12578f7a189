"""MLflow: one run per stage (per task), in a store under the run root unless the config names one.

Params are the flattened config, tags the lineage (stage, config hash, git commit, task), so runs
compare side by side in the UI. A run that raises is marked FAILED (MLflow's atexit hook would
otherwise mark it FINISHED). Only the process that should log (rank 0) gets a live tracker.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import Config

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(cfg: Config) -> str:
    return cfg.run.tracking_uri or f"sqlite:///{cfg.run_dir / 'mlflow.db'}"


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


class Tracker:
    """Logs to the active MLflow run; a disabled tracker (non-zero rank) does nothing."""

    def __init__(self, mlflow=None):
        self._mlflow = mlflow

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_artifact(str(path), artifact_path=folder)


@contextmanager
def stage_run(cfg: Config, stage: str, config_hash: str, task: tuple[int, int] = (0, 1), enabled: bool = True):
    if not enabled:
        yield Tracker()
        return
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.run.experiment) is None:
        mlflow.create_experiment(cfg.run.experiment, artifact_location=_artifact_root(uri))
    mlflow.set_experiment(cfg.run.experiment)
    index, count = task
    name = stage if count == 1 else f"{stage}[{index}/{count}]"
    tags = {"stage": stage, "config_hash": config_hash, "git_commit": git_commit(),
            "task": f"{index}/{count}", "run_dir": str(cfg.run_dir)}
    with mlflow.start_run(run_name=name, tags=tags, log_system_metrics=True):
        mlflow.log_params(_flatten(cfg.to_dict()))
        try:
            yield Tracker(mlflow)
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
