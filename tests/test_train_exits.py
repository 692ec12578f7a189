"""train-exits under real DeepSpeed (2 processes, gloo) on a truncated real backbone (3 layers): the
finished tiny pipeline's run (conftest.finished_run), and runs on copies of its inputs."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.backbone import backbone_fingerprint, load_backbone
from pipeline.balcony import BalconyModel
from pipeline.config import load_config

from conftest import ROOT, losses_by_step, run_command, run_in_process, stage_command, tiny_config

pytestmark = pytest.mark.integration  # runs the stages as processes

def _clone_inputs(src: Path, dst: Path, stages=("tokens", "teacher")) -> None:
    for stage in stages:
        shutil.copytree(src / stage, dst / stage, ignore=shutil.ignore_patterns("checkpoints"))


def test_zero2_two_processes_kl_falls_and_exports(finished_run):
    """The finished tiny pipeline's train-exits: 2 ranks under the deepspeed launcher."""
    run, output, _ = finished_run
    steps = losses_by_step(output)
    assert sorted(steps) == list(range(1, 11)) and "2 ranks, ZeRO-2, fp32" in output
    first, last = steps[1], steps[10]
    assert all(b < a for a, b in zip(first, last)), (first, last)
    port = re.search(r"--master_port[= ](\d+)", output)[1]  # DeepSpeed would leave 66 MB per rank here
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    cfg = load_config(run.with_suffix(".yaml"))
    backbone = load_backbone(cfg.model)
    model = BalconyModel.from_pretrained(backbone, run / "exits", backbone_fingerprint(cfg.model, backbone))
    assert model.depths == [1, 2]
    assert not torch.equal(model.exits["1"].layer.mlp.up_proj.weight, backbone.model.layers[-1].mlp.up_proj.weight)
    assert "nothing to do" in run_command(stage_command("train-exits", run.with_suffix(".yaml"), ranks=2)).stdout


def test_zero3_under_torchrun_gives_the_same_losses(finished_run, tmp_path, tracking_uri):
    run, output, _ = finished_run
    config = tiny_config(tmp_path, tracking_uri, "z3", train={"zero_stage": 3, "keep_checkpoints": 10})
    _clone_inputs(run, tmp_path / "z3")
    torchrun = stage_command("train-exits", config, ranks=2, launcher="torchrun")
    proc = run_command(torchrun)
    assert "2 ranks, ZeRO-3, fp32" in proc.stdout
    ours, reference = losses_by_step(proc.stdout), losses_by_step(output)
    for step in reference:
        assert ours[step] == pytest.approx(reference[step], rel=1e-4), step
    # resume from ZeRO-3's step-6 checkpoint (partitioned states, loaded with weights_only=True)
    exits = tmp_path / "z3" / "exits"
    weights = (exits / "exits.safetensors").read_bytes()
    for name in ("exits.safetensors", "balcony_config.json"):
        (exits / name).unlink()
    (exits / "checkpoints" / "latest").write_text("step00000006")
    resumed = run_command(torchrun)
    assert "at step 6" in resumed.stdout and losses_by_step(resumed.stdout) == {s: ours[s] for s in range(7, 11)}
    assert (exits / "exits.safetensors").read_bytes() == weights


def test_single_process_online_teacher_with_a_snapshot(finished_run, tmp_path, tracking_uri):
    run, _, _ = finished_run
    config = tiny_config(tmp_path, tracking_uri, "online", train={"online_teacher": True, "max_steps": 2, "snapshots": [1]})
    _clone_inputs(run, tmp_path / "online", ["tokens"])  # no teacher cache at all
    code, _, stderr = run_in_process("train-exits", config, "train.snapshots=[3]")
    assert code == 2 and "train.snapshots: step 3 is past the run's 2 steps" in stderr
    proc = run_command(stage_command("train-exits", config))
    assert "1 ranks, ZeRO-2, fp32" in proc.stdout and sorted(losses_by_step(proc.stdout)) == [1, 2]
    exits = tmp_path / "online" / "exits"
    snapshot = exits / "snapshots" / "step00000001"
    assert json.loads((snapshot / "balcony_config.json").read_text())["tokens"] == 256
    assert json.loads((exits / "balcony_config.json").read_text())["steps"] == 2
    assert (snapshot / "exits.safetensors").read_bytes() != (exits / "exits.safetensors").read_bytes()


def test_two_epochs_over_the_cached_targets(finished_run, tmp_path, tracking_uri):
    """train.epochs with max_steps 0 (the demo's 2): the steps of two passes, with a quarter of the positions."""
    run, _, _ = finished_run
    config = tiny_config(tmp_path, tracking_uri, "epochs",
                         train={"epochs": 2, "max_steps": 0, "loss_positions": 0.25, "tokens_per_step": 2048})
    _clone_inputs(run, tmp_path / "epochs")
    proc = run_command(stage_command("train-exits", config))
    assert "8 steps x 2048 tokens" in proc.stdout and sorted(losses_by_step(proc.stdout)) == list(range(1, 9))
    assert json.loads((tmp_path / "epochs" / "exits" / "balcony_config.json").read_text())["steps"] == 8


def test_a_bf16_backbone_is_not_trained_in_fp32(finished_run):
    """(The other refusals of train-exits, of inputs from another backbone or depth list and of a step
    size that does not divide, are test_bad_input's.)"""
    run, _, _ = finished_run
    code, _, stderr = run_in_process("train-exits", run.with_suffix(".yaml"), "model.dtype=bfloat16")  # fp32 on CPU
    assert code == 2 and "train.precision: auto trains in fp32 here, but the backbone is torch.bfloat16" in stderr


def test_baselines_and_evaluate_stage_write_metrics_table_and_plot(finished_run, tmp_path, tracking_uri):
    run, _, _ = finished_run
    config = tiny_config(tmp_path, tracking_uri, "run")
    _clone_inputs(run, tmp_path / "run", ["tokens", "teacher", "exits"])
    # the baselines, same data and recipe, one process: only they are trained (the exits exist)
    baselines = ["train.baselines=[tuned_lens, ce]"]
    out = run_command(stage_command("train-exits", config, *baselines)).stdout
    assert "exits.safetensors exists" not in out and "exists for this configuration; nothing to do" in out
    assert "(tuned_lens)" in out and "(ce)" in out
    for name, kind, objective in (("tuned_lens", "tuned_lens", "kl"), ("ce", "balcony", "ce")):
        meta = json.loads((tmp_path / "run" / "baselines" / name / "balcony_config.json").read_text())
        assert (meta["kind"], meta["objective"]) == (kind, objective)
    # text no stage trained on, scored beside the held-out tokens
    ood = tmp_path / "ood.txt"
    ood.write_text("A version control system records changes to a set of files over time, so that you can "
                   "recall specific versions later. " * 40)
    overrides = [*baselines, "eval.latency_batches=[1, 2]", "eval.new_tokens=4", "eval.repeats=1",
                 "eval.max_sequences=4", f"eval.data=[{ood}]", "eval.data_tokens=256"]
    run_command(stage_command("evaluate", config, *overrides))
    out = tmp_path / "run" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    names = [row["name"] for row in metrics["rows"]]
    assert names == ["full", "exit@1", "exit@2", "lens@1", "lens@2", "tuned@1", "tuned@2", "ce@1", "ce@2"]
    assert metrics["heldout_tokens"] == 4 * 128
    exit1, tuned1 = metrics["rows"][1], metrics["rows"][5]
    assert exit1["relative_cost"] == pytest.approx(2 / 3) and set(exit1["speedup"]) == {"1", "2"}
    assert exit1["ideal_speedup"] == pytest.approx(1.5) and exit1["kl_to_full"] > 0
    assert set(metrics["cost_line"]) == {"1", "2"}  # a line per batch size, None where noise hides the slope
    for line in filter(None, metrics["cost_line"].values()):
        assert line["per_layer_ms"] > 0 and 0 <= line["fixed_share"] < 1 and line["layers"] == 3
    assert "Decode cost at batch 1, fitted on the latencies above:" in (out / "table.md").read_text()
    assert 0 <= exit1["assisted"]["acceptance_rate"] <= 1 and exit1["assisted"]["speedup"] > 0
    speculative = metrics["speculative"]  # 2 prompts measured, 2 others choose the confidence-stopped drafts
    assert (speculative["prompts"], speculative["selection_prompts"]) == (2, 2) and set(speculative["exits"]) == {"1", "2"}
    for entry in speculative["exits"].values():
        assert entry["policy"]["max_draft"] == 2 and entry["policy"]["tau"] == 0.5
        measured = {(m["decoding"], m["drafts"], m["batch"]): m for m in entry["measurements"]}
        assert set(measured) == {(decoding, drafts, batch) for drafts in ("fixed", "confident")
                                 for decoding, batch in (("greedy", 1), ("greedy", 2), ("sampled", 1))}
        for m in measured.values():
            assert 1 <= m["tokens_per_round"] <= m["max_draft"] + 1 and 0 <= m["acceptance_rate"] <= 1
            assert m["draft_length"] <= m["max_draft"] and m["speedup_min"] <= m["speedup"] <= m["speedup_max"]
    assert metrics["speculative_choice"]["depth"] in (1, 2)
    assert "Self-speculative decoding: 2 held-out prompts of 8 tokens" in (out / "table.md").read_text()
    assert tuned1["relative_cost"] == pytest.approx(1 / 3) and "speedup" not in tuned1
    [other] = metrics["other_data"]
    assert other["data"] == str(ood) and other["tokens"] == 256 and [r["name"] for r in other["rows"]] == names
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| exit@1 |" in table and "| tuned@2 |" in table and "| ce@2 |" in table
    assert f"Quality on {ood} (256 tokens)" in table
    # reruns in this process: what they decide is under test, not the command line
    assert "nothing to do" in run_in_process("evaluate", config, *overrides)[1]
    # other inputs: scored again, not refused; also after a run killed before its metrics were written
    rescored = run_in_process("evaluate", config, *overrides[:-2], "eval.speed=false")[1]
    assert "scoring again" in rescored and not json.loads((out / "metrics.json").read_text())["other_data"]
    (out / "metrics.json").unlink()
    assert "scoring again" in run_in_process("evaluate", config, *overrides, "eval.speed=false")[1]
    code, _, stderr = run_in_process("evaluate", config, "model.num_layers=4", *overrides)
    assert code == 2 and "backbone_fingerprint is" in stderr  # exits from another backbone


def test_export_stage_writes_each_exit_with_its_evaluation_in_the_card(finished_run):
    """The finished pipeline ran export-exits last (export.after_evaluate)."""
    run, output, _ = finished_run
    assert "[5/5] export-exits" in output
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    rows, choice = {r["name"]: r for r in metrics["rows"]}, metrics["speculative_choice"]
    for depth in (1, 2):
        card = (run / "export" / f"exit-{depth}" / "README.md").read_text()
        assert f"exit {depth} -> " in output and f"| this exit | {rows[f'exit@{depth}']['perplexity']:.2f} |" in card
        assert "model.generate(ids, speculative=True" in card and f"measured exit {choice['depth']} drafting" in card
    code, _, stderr = run_in_process("export-exits", run.with_suffix(".yaml"), "export.depths=[5]")
    assert code == 2 and stderr.startswith("error: export.depths: no exit at depth 5")


def test_one_process_per_srun_task(finished_run, tmp_path, tracking_uri):
    """What `srun --ntasks=2 python stages/train_exits.py` gives each process: SLURM's variables only."""
    run, _, _ = finished_run
    config = tiny_config(tmp_path, tracking_uri, "srun", train={"max_steps": 2})
    _clone_inputs(run, tmp_path / "srun")
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "stages" / "train_exits.py"), "--config", str(config)],
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "OMP_NUM_THREADS": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank),
                                   "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "4242", "MASTER_ADDR": "127.0.0.1"})
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "2 ranks, ZeRO-2" in outputs[0][0] and sorted(losses_by_step(outputs[0][0])) == [1, 2]
    assert outputs[1][0].count("step ") == 0  # only rank 0 reports
