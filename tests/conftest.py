"""Shared fixtures: the embedded assets, small configs written to a temp dir, a shared MLflow store."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.distributed import free_port
from pipeline.registry import STAGES

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
BACKBONE = ASSETS / "smollm2-135m-instruct"
CORPUS = ASSETS / "corpus"
ARTIFACTS = Path(os.environ.get("BALCONY_TEST_ARTIFACTS", ROOT / "test-artifacts"))  # kept after the run
STEP = re.compile(r"^step (\d+)/(\d+)  (.*?)  lr", re.M)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def assets() -> Path:
    from embedded.assets import build_assets

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
        "data": {"source": "json", "files": [str(CORPUS / "*.jsonl")], "train_tokens": 8192,
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


def losses_by_step(stdout: str) -> dict[int, list[float]]:
    """train-exits' per-exit losses by step number (printed with a float32's full precision)."""
    return {int(m.group(1)): [float(v) for v in re.findall(r"kl@\d+ (\S+)", m.group(3))] for m in STEP.finditer(stdout)}


# ---------------------------------------------------------------- parallel workers (`make test`)

# Files that share a session fixture (the finished tiny pipeline, the ledger) run on one worker.
SHARED_WORKER = {"test_bad_input.py": "tiny_pipeline", "test_faults.py": "tiny_pipeline"}


def pytest_collection_modifyitems(items):
    """Under `pytest -n N --dist loadgroup`, keep each file on one worker, so its module fixtures
    (a SLURM cluster, a trained run) are built once."""
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(SHARED_WORKER.get(name, name)))


# ---------------------------------------------------------------- fault and bad-input ledger

LEDGER: list[dict] = []


@pytest.fixture(scope="session")
def ledger():
    """Cases of the fault / bad-input suites that passed; written to test-artifacts/fault-report.json."""
    def record(category: str, case: str, outcome: str) -> None:
        LEDGER.append({"category": category, "case": case, "outcome": outcome})

    yield record
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for entry in LEDGER:
        key = f"{entry['category']}: {entry['outcome']}"
        counts[key] = counts.get(key, 0) + 1
    (ARTIFACTS / "fault-report.json").write_text(json.dumps({"summary": counts, "cases": LEDGER}, indent=1))


# ---------------------------------------------------------------- a whole tiny pipeline, for the fault suites

TINY_PIPELINE = {
    "model": {"num_layers": 3},
    "exits": {"depths": [1, 2]},
    "data": {"train_tokens": 16384, "heldout_tokens": 1024, "sequences_per_shard": 4},  # 32 + 2 shards
    "teacher": {"batch_size": 4, "chunk_size": 256, "fidelity_positions": 0},
    "train": {"tokens_per_step": 512, "micro_batch_size": 2, "checkpoint_every": 1, "chunk_size": 256,
              "lr": 1e-3, "max_steps": 10},
    "eval": {"max_sequences": 8, "latency_batches": [1], "prompt_tokens": 8, "new_tokens": 4, "repeats": 1},
}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def config_file(folder: Path, tracking_uri: str, name: str, base: dict, **extra) -> Path:
    """`small_config` updated by the `base` sections, then the `extra` ones; written to folder/NAME.yaml,
    with run.dir folder/NAME."""
    cfg = small_config(folder / name, tracking_uri, **base)
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_config(folder: Path, tracking_uri: str, name: str, **extra) -> Path:
    return config_file(folder, tracking_uri, name, TINY_PIPELINE, **extra)


def stage_command(stage: str, config: Path, *overrides: str, ranks: int = 1) -> list[str]:
    """The stage as a user starts it; train-exits with ranks > 1 under the deepspeed launcher."""
    launcher = ([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
                if ranks > 1 else [sys.executable])
    return [*launcher, str(ROOT / "stages" / STAGES[stage].script), "--config", str(config), *overrides]


def run_command(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    if check and proc.returncode != 0:
        raise AssertionError(f"{command[-3]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tracking_uri, assets):
    """All four stages of the tiny pipeline, uninterrupted (train-exits: 2 ranks under deepspeed).
    Returns (run folder, train-exits stdout, evaluate wall seconds)."""
    import time

    folder = tmp_path_factory.mktemp("finished")
    config = tiny_config(folder, tracking_uri, "run")
    run_command(stage_command("tokenize", config))
    run_command(stage_command("teacher-logits", config))
    train = run_command(stage_command("train-exits", config, ranks=2))
    started = time.perf_counter()
    run_command(stage_command("evaluate", config))
    return folder / "run", train.stdout, time.perf_counter() - started


def stage_module(stage: str):
    """A stage's script imported as a module (its body runs in-process under pipeline.stage.run_stage)."""
    import importlib.util

    script = ROOT / "stages" / STAGES[stage].script
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_function(stage: str):
    """A stage's body, `run(cfg, task)`."""
    return stage_module(stage).run


def perturbed_model(num_layers: int = 6, depths=(2, 4)):
    """The real backbone cut to `num_layers` with exits at `depths`, moved away from their initial
    copies (as training would) by a seeded perturbation."""
    import torch

    from pipeline.backbone import load_backbone
    from pipeline.balcony import BalconyModel
    from pipeline.config import ModelConfig

    model = BalconyModel(load_backbone(ModelConfig(backbone=str(BACKBONE), num_layers=num_layers)), list(depths))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.exits.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
