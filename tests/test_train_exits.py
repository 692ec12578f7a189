"""train-exits under real DeepSpeed (2 processes, gloo) on a truncated real backbone (3 layers)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.backbone import backbone_fingerprint, load_backbone
from pipeline.balcony import BalconyModel
from pipeline.config import load_config
from pipeline.distributed import free_port

from conftest import ROOT, config_file, losses_by_step, run_stage

BIN = Path(sys.executable).parent
SCRIPT = str(ROOT / "stages" / "train_exits.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {
    "model": {"num_layers": 3},
    "exits": {"depths": [1, 2]},
    "teacher": {"batch_size": 4, "chunk_size": 256, "fidelity_positions": 0},
    "train": {"tokens_per_step": 1024, "micro_batch_size": 4, "checkpoint_every": 2, "chunk_size": 256, "lr": 1e-3},
}


def _write(folder: Path, tracking_uri: str, name: str, **extra) -> Path:
    return config_file(folder, tracking_uri, name, TINY, **extra)


def _clone_inputs(src: Path, dst: Path) -> None:
    for stage in ("tokens", "teacher"):
        shutil.copytree(src / stage, dst / stage)


def deepspeed(config: Path, *overrides: str, launcher: str = "deepspeed", check: bool = True):
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", SCRIPT]
    proc = subprocess.run([*cmd, "--config", str(config), *overrides], capture_output=True, text=True, env=ENV, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{launcher} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc



@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tracking_uri, assets):
    folder = tmp_path_factory.mktemp("train")
    config = _write(folder, tracking_uri, "run")
    run_stage("tokenize_corpus.py", "--config", config)
    run_stage("teacher_logits.py", "--config", config)
    return folder, config


@pytest.fixture(scope="module")
def zero2(prepared):
    folder, config = prepared
    return deepspeed(config)


def test_zero2_two_processes_kl_falls_and_exports(prepared, zero2):
    folder, config = prepared
    steps = losses_by_step(zero2.stdout)
    assert sorted(steps) == list(range(1, 9)) and "2 ranks, ZeRO-2, fp32" in zero2.stdout
    first, last = steps[1], steps[8]
    assert all(b < a for a, b in zip(first, last)), (first, last)
    port = zero2.args[zero2.args.index("--master_port") + 1]  # DeepSpeed would leave 66 MB per rank here
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    cfg = load_config(config)
    backbone = load_backbone(cfg.model)
    model = BalconyModel.from_pretrained(backbone, folder / "run" / "exits", backbone_fingerprint(cfg.model, backbone))
    assert model.depths == [1, 2]
    assert not torch.equal(model.exits["1"].layer.mlp.up_proj.weight, backbone.model.layers[-1].mlp.up_proj.weight)
    assert "nothing to do" in deepspeed(config).stdout


def test_zero3_under_torchrun_gives_the_same_losses(prepared, zero2, tmp_path, tracking_uri):
    folder, _ = prepared
    config = _write(tmp_path, tracking_uri, "z3", train={"zero_stage": 3})
    _clone_inputs(folder / "run", tmp_path / "z3")
    proc = deepspeed(config, launcher="torchrun")
    assert "2 ranks, ZeRO-3, fp32" in proc.stdout
    ours, reference = losses_by_step(proc.stdout), losses_by_step(zero2.stdout)
    for step in reference:
        assert ours[step] == pytest.approx(reference[step], rel=1e-4), step
    # resume from ZeRO-3's step-6 checkpoint (partitioned states, loaded with weights_only=True)
    exits = tmp_path / "z3" / "exits"
    weights = (exits / "exits.safetensors").read_bytes()
    for name in ("exits.safetensors", "balcony_config.json"):
        (exits / name).unlink()
    (exits / "checkpoints" / "latest").write_text("step00000006")
    resumed = deepspeed(config, launcher="torchrun")
    assert "at step 6" in resumed.stdout and losses_by_step(resumed.stdout) == {s: ours[s] for s in (7, 8)}
    assert (exits / "exits.safetensors").read_bytes() == weights


def test_single_process_online_teacher_with_a_snapshot(prepared, tmp_path, tracking_uri):
    folder, _ = prepared
    config = _write(tmp_path, tracking_uri, "online", train={"online_teacher": True, "max_steps": 2, "snapshots": [1]})
    shutil.copytree(folder / "run" / "tokens", tmp_path / "online" / "tokens")  # no teacher cache at all
    proc = run_stage("train_exits.py", "--config", config, "train.snapshots=[3]", check=False)
    assert proc.returncode == 2 and "train.snapshots: step 3 is past the run's 2 steps" in proc.stderr
    proc = run_stage("train_exits.py", "--config", config)
    assert "1 ranks, ZeRO-2, fp32" in proc.stdout and sorted(losses_by_step(proc.stdout)) == [1, 2]
    exits = tmp_path / "online" / "exits"
    snapshot = exits / "snapshots" / "step00000001"
    assert json.loads((snapshot / "balcony_config.json").read_text())["tokens"] == 1024
    assert json.loads((exits / "balcony_config.json").read_text())["steps"] == 2
    assert (snapshot / "exits.safetensors").read_bytes() != (exits / "exits.safetensors").read_bytes()


def test_two_epochs_over_the_cached_targets(prepared, tmp_path, tracking_uri):
    """train.epochs with max_steps 0 (the demo's 2): the steps of two passes, with a quarter of the positions."""
    folder, _ = prepared
    config = _write(tmp_path, tracking_uri, "epochs", train={"epochs": 2, "loss_positions": 0.25})
    _clone_inputs(folder / "run", tmp_path / "epochs")
    proc = run_stage("train_exits.py", "--config", config)
    assert "16 steps x 1024 tokens" in proc.stdout and sorted(losses_by_step(proc.stdout)) == list(range(1, 17))
    assert json.loads((tmp_path / "epochs" / "exits" / "balcony_config.json").read_text())["steps"] == 16


def test_refusals(prepared, zero2):
    folder, config = prepared
    proc = run_stage("train_exits.py", "--config", config, "model.num_layers=4", check=False)
    assert proc.returncode == 2 and "backbone_fingerprint is" in proc.stderr  # targets from another backbone
    proc = run_stage("train_exits.py", "--config", config, "exits.depths=[1, 3]", check=False)
    assert proc.returncode == 2 and "exits.depths: 3 is out of range" in proc.stderr
    proc = run_stage("train_exits.py", "--config", config, "exits.depths=[2]", check=False)
    assert proc.returncode == 2 and "depths=[1, 2]" in proc.stderr and "this run has depths=[2]" in proc.stderr
    proc = run_stage("train_exits.py", "--config", config, "train.tokens_per_step=1000", check=False)
    assert proc.returncode == 2 and "train.tokens_per_step: 1000 is not a multiple" in proc.stderr
    proc = run_stage("train_exits.py", "--config", config, "model.dtype=bfloat16", check=False)  # fp32 on CPU
    assert proc.returncode == 2 and "train.precision: auto trains in fp32 here, but the backbone is torch.bfloat16" in proc.stderr


def test_baselines_and_evaluate_stage_write_metrics_table_and_plot(prepared, zero2, tmp_path):
    folder, config = prepared
    # the baselines, same data and recipe, one process: only they are trained (the exits exist)
    baselines = ["train.baselines=[tuned_lens, ce]"]
    out = run_stage("train_exits.py", "--config", config, *baselines).stdout
    assert "exits.safetensors exists" not in out and "exists for this configuration; nothing to do" in out
    assert "(tuned_lens)" in out and "(ce)" in out
    for name, kind, objective in (("tuned_lens", "tuned_lens", "kl"), ("ce", "balcony", "ce")):
        meta = json.loads((folder / "run" / "baselines" / name / "balcony_config.json").read_text())
        assert (meta["kind"], meta["objective"]) == (kind, objective)
    # text no stage trained on, scored beside the held-out tokens
    ood = tmp_path / "ood.txt"
    ood.write_text("A version control system records changes to a set of files over time, so that you can "
                   "recall specific versions later. " * 40)
    overrides = [*baselines, "eval.latency_batches=[1, 2]", "eval.new_tokens=4", "eval.repeats=1",
                 "eval.max_sequences=4", f"eval.data=[{ood}]", "eval.data_tokens=256"]
    run_stage("evaluate_exits.py", "--config", config, *overrides)
    out = folder / "run" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    names = [row["name"] for row in metrics["rows"]]
    assert names == ["full", "exit@1", "exit@2", "lens@1", "lens@2", "tuned@1", "tuned@2", "ce@1", "ce@2"]
    assert metrics["heldout_tokens"] == 4 * 128
    exit1, tuned1 = metrics["rows"][1], metrics["rows"][5]
    assert exit1["relative_cost"] == pytest.approx(2 / 3) and set(exit1["speedup"]) == {"1", "2"}
    assert exit1["ideal_speedup"] == pytest.approx(1.5) and exit1["kl_to_full"] > 0
    for key in ("speculative", "assisted"):
        assert 0 <= exit1[key]["acceptance_rate"] <= 1 and exit1[key]["speedup"] > 0
    assert tuned1["relative_cost"] == pytest.approx(1 / 3) and "speedup" not in tuned1
    [other] = metrics["other_data"]
    assert other["data"] == str(ood) and other["tokens"] == 256 and [r["name"] for r in other["rows"]] == names
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| exit@1 |" in table and "| tuned@2 |" in table and "| ce@2 |" in table
    assert f"Quality on {ood} (256 tokens)" in table
    assert "nothing to do" in run_stage("evaluate_exits.py", "--config", config, *overrides).stdout
    # other inputs: scored again, not refused; also after a run killed before its metrics were written
    rescored = run_stage("evaluate_exits.py", "--config", config, *overrides[:-2]).stdout
    assert "scoring again" in rescored and not json.loads((out / "metrics.json").read_text())["other_data"]
    (out / "metrics.json").unlink()
    assert "scoring again" in run_stage("evaluate_exits.py", "--config", config, *overrides, "eval.speed=false").stdout
    proc = run_stage("evaluate_exits.py", "--config", config, "model.num_layers=4", *overrides, check=False)
    assert proc.returncode == 2 and "backbone_fingerprint is" in proc.stderr  # exits from another backbone


def test_export_stage_writes_each_exit_with_its_evaluation_in_the_card(prepared, zero2):
    folder, config = prepared
    # the whole chain with export.after_evaluate: the finished stages are no-ops, export-exits runs last
    out = run_stage("run_pipeline.py", "--config", config, "--nproc", "1", "eval.speed=false", "eval.max_sequences=4",
                    "export.after_evaluate=true").stdout
    assert "[5/5] export-exits" in out
    rows = {r["name"]: r for r in json.loads((folder / "run" / "eval" / "metrics.json").read_text())["rows"]}
    for depth in (1, 2):
        card = (folder / "run" / "export" / f"exit-{depth}" / "README.md").read_text()
        assert f"exit {depth} -> " in out and f"| this exit | {rows[f'exit@{depth}']['perplexity']:.2f} |" in card
    proc = run_stage("export_exits.py", "--config", config, "export.depths=[5]", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: export.depths: no exit at depth 5")


def test_one_process_per_srun_task(prepared, tmp_path, tracking_uri):
    """What `srun --ntasks=2 python stages/train_exits.py` gives each process: SLURM's variables only."""
    folder, _ = prepared
    config = _write(tmp_path, tracking_uri, "srun", train={"max_steps": 2})
    _clone_inputs(folder / "run", tmp_path / "srun")
    base = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, SCRIPT, "--config", str(config)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                                   "SLURM_JOB_ID": "4242", "MASTER_ADDR": "127.0.0.1"})
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "2 ranks, ZeRO-2" in outputs[0][0] and sorted(losses_by_step(outputs[0][0])) == [1, 2]
    assert outputs[1][0].count("step ") == 0  # only rank 0 reports
