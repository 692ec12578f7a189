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
SHARED_WORKER = {name: "tiny_pipeline" for name in ("test_bad_input.py", "test_faults.py", "test_mlflow_ui.py",
                                                    "test_train_exits.py")}


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
    "data": {"train_tokens": 8192, "heldout_tokens": 512, "sequences_per_shard": 2},  # 32 + 2 shards
    "teacher": {"batch_size": 4, "chunk_size": 256, "fidelity_positions": 0},
    "train": {"tokens_per_step": 256, "micro_batch_size": 1, "checkpoint_every": 1, "chunk_size": 256,
              "lr": 1e-3, "max_steps": 10},
    "eval": {"max_sequences": 4, "latency_batches": [1], "prompt_tokens": 8, "new_tokens": 4, "repeats": 1},
}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for processes that share the cores with others


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


def stage_command(stage: str, config: Path, *overrides: str, ranks: int = 1, launcher: str = "deepspeed") -> list[str]:
    """The stage as a user starts it: one process with the machine's threads, or ranks > 1 under a
    launcher (`deepspeed` or `torchrun`) with one thread each (`OMP_NUM_THREADS=1 deepspeed ...`)."""
    script = [str(ROOT / "stages" / STAGES[stage].script), "--config", str(config), *overrides]
    if ranks == 1:
        return [sys.executable, *script]
    ranks_flags = (["--num_gpus", str(ranks), "--master_port", str(free_port())] if launcher == "deepspeed"
                   else ["--standalone", "--nproc_per_node", str(ranks)])
    return ["env", "OMP_NUM_THREADS=1", str(Path(sys.executable).parent / launcher), *ranks_flags, *script]


def pipeline_command(config: Path, *args: str) -> list[str]:
    """The whole chain in place, as `make pipeline` starts it."""
    return [sys.executable, str(ROOT / "stages" / "run_pipeline.py"), "--config", str(config), *args]


def run_command(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{command[-3]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


PIPELINES = "pipelines"  # the MLflow experiment of the tests' whole-pipeline runs (test_mlflow_ui compares them)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tracking_uri, assets):
    """The whole tiny pipeline, uninterrupted, as `make pipeline` runs it: tokenize, teacher-logits,
    train-exits (2 ranks under deepspeed), evaluate, export-exits (export.after_evaluate). The reference
    of the fault and bad-input suites, and the run train-exits', export's and MLflow's tests read.
    Returns (run folder, the pipeline's output, evaluate's wall seconds); the config is RUN.yaml."""
    folder = tmp_path_factory.mktemp("finished")
    config = tiny_config(folder, tracking_uri, "run", run={"experiment": PIPELINES}, export={"after_evaluate": True})
    proc = run_command(pipeline_command(config, "--nproc", "2"))
    seconds = float(re.search(r"^==> evaluate done in ([\d,]+) s", proc.stdout, re.M)[1].replace(",", ""))
    return folder / "run", proc.stdout + proc.stderr, seconds


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


def run_in_process(stage: str, config: Path, *overrides: str) -> tuple[int, str, str]:
    """The stage's body run in this process through the entry point a user's command goes through
    (`run_stage`: the command line, the config, the one-line errors): (exit code, stdout, stderr).
    For refusals and task splits, where the stage's logic is under test and not its command: it spares
    a new interpreter's ~6 s of imports. The environment a stage sets up is undone after it."""
    import contextlib
    import io

    from pipeline.stage import run_stage

    environ, out, err, code = dict(os.environ), io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_stage("", stage_function(stage), ["--config", str(config), *overrides])
    except SystemExit as e:
        code = e.code
    finally:  # the one-process group stays (DeepSpeed keeps a handle on it); the variables go
        os.environ.clear()
        os.environ.update(environ)
    return code, out.getvalue(), err.getvalue()


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
