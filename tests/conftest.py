"""Shared fixtures: the embedded assets, small configs written to a temp dir, a shared MLflow store."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
BACKBONE = ASSETS / "smollm2-135m-instruct"
CORPUS = ASSETS / "corpus"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def assets() -> Path:
    from pipeline.assets import build_assets

    build_assets(ASSETS)  # instant when `make assets` already ran
    return ASSETS


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the whole session: creating a store costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def small_config(run_dir: Path, tracking_uri: str, **sections) -> dict:
    """A tiny recipe on the real corpus and tokenizer; `sections` update the defaults per section."""
    cfg = {
        "run": {"dir": str(run_dir), "experiment": "tests", "tracking_uri": tracking_uri},
        "model": {"backbone": str(BACKBONE)},
        "data": {"source": "json", "files": [str(CORPUS / "*.jsonl")], "budget_tokens": 8192,
                 "heldout_fraction": 0.05, "heldout_tokens": 1024, "seq_len": 128, "sequences_per_shard": 16},
        "exits": {"depths": [2, 3]},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture
def write_config(tmp_path, tracking_uri, assets):
    def write(name: str = "config.yaml", run_dir: Path | None = None, **sections) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(small_config(run_dir or tmp_path / "run", tracking_uri, **sections)))
        return path

    return write


def run_stage(script: str, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run `stages/SCRIPT` in a fresh interpreter, as a user would."""
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (receipts and header included), for byte-identity checks."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_mid_stage(script: str, config: Path, out: Path, after_shards: int, total: int) -> int:
    """Start a stage, SIGKILL it once `after_shards` shards are committed; return how many were.

    Fails unless the kill really landed mid-stage: some shards done, not all, no manifest.
    """
    import signal
    import time

    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / script), "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.rglob(".parts/shard-*.json"))) < after_shards:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = len(list(out.rglob(".parts/shard-*.json")))
    assert 0 < done < total and not (out / "manifest.json").exists(), f"the kill should land mid-stage ({done} of {total} done)"
    return done
