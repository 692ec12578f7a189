"""Shared fixtures: the embedded assets, small configs written to a temp dir, an MLflow store per
worker, the finished tiny pipeline; and how `make test`'s parallel workers share them."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

if "PYTEST_XDIST_WORKER" in os.environ:
    # Under `pytest -n N` several tests share the cores: every process a test starts (and this one)
    # computes on one thread, as `OMP_NUM_THREADS=1 deepspeed ...` ranks do, instead of spinning
    # threads against each other. Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import yaml
from filelock import FileLock

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
    """One MLflow store per pytest process (each worker has its own): creating a store costs seconds."""
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

# Files whose tests share a module fixture that is not built_once (a local SLURM cluster, an MLflow UI
# server) run on one worker; every other test goes to whichever worker is free.
ONE_WORKER = ("test_slurm.py", "test_mlflow_ui.py")
# Fixtures made by built_once (one per session, whichever worker asks first builds it; the others wait).
BUILT_ONCE = ("finished_run", "foreign", "searched_run", "reference", "grouped", "whole_and_split")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Order the tests for `pytest -n N --dist loadgroup --no-loadscope-reorder` (a plain `pytest`
    runs them in the same order) and group those that must share a worker. First the longest chain
    (SLURM); then one reader of each built_once fixture, so that the fixtures are built side by side;
    then the integration tests that need none, which keep the other workers busy meanwhile; then the
    fixtures' other readers, which now find them built; the fast unit tests fill the end."""
    first_readers = set()
    def phase(item) -> int:
        if item.path.name == "test_slurm.py":
            return 0
        shared = {name if name == "finished_run" else f"{item.path.name}:{name}"  # module fixtures share names
                  for name in item.fixturenames if name in BUILT_ONCE}
        if shared - first_readers:
            first_readers.update(shared)
            return 1
        if shared:  # the kills and training runs before the many short refusals
            return 3 if item.path.name in ("test_faults.py", "test_train_exits.py", "test_mlflow_ui.py") else 4
        return 2 if item.get_closest_marker("integration") else 5

    phases = {item.nodeid: phase(item) for item in items}
    items.sort(key=lambda item: phases[item.nodeid])
    for item in items:
        if item.path.name in ONE_WORKER:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


def built_once(tmp_path_factory, name: str, build):
    """`build(folder)` once per test session however many workers ask for it: the first holds a file
    lock while it builds and leaves the pickled result; the others wait for it and read it. A build
    that failed fails every test that asks, without building again."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # the session's folder, above each worker's
    result = shared / f"{name}.pickle"
    with FileLock(shared / f"{name}.lock"):
        if not result.exists():
            folder = shared / name
            folder.mkdir()
            try:
                value = build(folder)
            except BaseException as e:  # pytest's own failures are BaseExceptions
                result.write_bytes(pickle.dumps((False, f"{type(e).__name__}: {str(e)[-3000:]}")))
                raise
            result.write_bytes(pickle.dumps((True, value)))
    built, value = pickle.loads(result.read_bytes())
    if not built:
        pytest.fail(f"building {name} failed on another worker: {value}")
    return value


# ---------------------------------------------------------------- fault and bad-input ledger

LEDGER: list[dict] = []


@pytest.fixture(scope="session")
def ledger():
    """Cases of the fault / bad-input suites that passed; written to test-artifacts/fault-report.json."""
    def record(category: str, case: str, outcome: str) -> None:
        LEDGER.append({"category": category, "case": case, "outcome": outcome})

    return record


def pytest_testnodedown(node, error):
    """(xdist's controller) a worker's ledger joins this process's."""
    LEDGER.extend(json.loads(node.workeroutput.get("ledger", "[]")))


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a worker: the controller writes the report
        workeroutput["ledger"] = json.dumps(LEDGER)
        return
    if not LEDGER:
        return
    counts: dict[str, int] = {}
    for entry in LEDGER:
        key = f"{entry['category']}: {entry['outcome']}"
        counts[key] = counts.get(key, 0) + 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "fault-report.json").write_text(json.dumps({"summary": counts, "cases": LEDGER}, indent=1))


# ---------------------------------------------------------------- a whole tiny pipeline, for the fault suites

TINY_PIPELINE = {
    "model": {"num_layers": 3},
    "exits": {"depths": [1, 2]},
    "data": {"train_tokens": 8192, "heldout_tokens": 512, "sequences_per_shard": 2},  # 32 + 2 shards
    "teacher": {"batch_size": 4, "chunk_size": 256, "fidelity_positions": 0},
    "train": {"tokens_per_step": 256, "micro_batch_size": 1, "checkpoint_every": 1, "chunk_size": 256,
              "lr": 1e-3, "max_steps": 10},
    "eval": {"max_sequences": 4, "latency_batches": [1], "prompt_tokens": 8, "new_tokens": 4, "repeats": 1,
             "speculative_prompts": 2, "speculative_batches": [1, 2], "max_drafts": [2], "draft_taus": [0.5]},
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
    """The stage as a user starts it: one process (with the machine's threads, or one under parallel
    test workers), or ranks > 1 under a launcher (`deepspeed` or `torchrun`) with one thread each
    (`OMP_NUM_THREADS=1 deepspeed ...`)."""
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
def finished_run(tmp_path_factory, assets):
    """The whole tiny pipeline, uninterrupted, as `make pipeline` runs it: tokenize, teacher-logits,
    train-exits (2 ranks under deepspeed), evaluate, export-exits (export.after_evaluate). The reference
    of the fault and bad-input suites, and the run train-exits', export's and MLflow's tests read.
    Returns (run folder, the pipeline's output, evaluate's wall seconds); the config is RUN.yaml, and
    its MLflow store (experiment PIPELINES) is the folder's own."""
    def build(folder: Path):
        config = tiny_config(folder, f"sqlite:///{folder / 'mlflow.db'}", "run", run={"experiment": PIPELINES},
                             export={"after_evaluate": True})
        proc = run_command(pipeline_command(config, "--nproc", "2"))
        seconds = float(re.search(r"^==> evaluate done in ([\d,]+) s", proc.stdout, re.M)[1].replace(",", ""))
        return folder / "run", proc.stdout + proc.stderr, seconds

    return built_once(tmp_path_factory, "finished", build)


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
