"""Faults: each stage SIGKILLed (whole process group) at 5 seeded random points, resuming after each,
and shard writes that fail (a real full disk, injected I/O errors). The finished output always equals
an uninterrupted run's, and no partial file is ever visible as complete. Passing cases go to
test-artifacts/fault-report.json."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.registry import STAGES

from conftest import ROOT, losses_by_step, run_command, stage_command, stage_function, tiny_config, tree_bytes

pytestmark = pytest.mark.integration  # runs the stages as processes

KILLS = 5


def receipts(out: Path) -> int:
    """Committed shards of both splits (polled every 10 ms: a recursive glob would take a core)."""
    return sum(len(list(out.glob(f"{split}.parts/shard-*.json"))) for split in ("", "heldout/"))


def nothing_partial_visible(out: Path, finished: dict[str, bytes]) -> None:
    """Every visible file equals its counterpart in the finished run, and there is no manifest yet.
    (Hidden `.name.tmp-*` files are in-flight writes; a rerun removes them.)"""
    assert not (out / "manifest.json").exists()
    for path in out.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            rel = str(path.relative_to(out))
            assert path.read_bytes() == finished[rel], f"{rel} is visible but differs from the finished run"


def kill_repeatedly(command: list[str], progress, total: int, seed: int, jitter_s: float, check, logs: Path) -> list[int]:
    """Start `command`; SIGKILL its process group once progress() reaches a seeded random target plus
    a random delay (so kills also land mid-write); check the invariants; KILLS times over."""
    rng = random.Random(seed)
    landed = []
    for i in range(KILLS):
        done = progress()  # aim within the next 1/(kills left + 1) of the rest, so later kills still land mid-stage
        target = done + rng.randint(1, max(1, (total - done) // (KILLS - i + 1)))
        with open(logs / f"kill{i}.log", "w") as log:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 300
            while progress() < target and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, jitter_s))
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, as a cluster would
            proc.wait()
        now = progress()
        assert now < total, f"kill {i} landed after the stage finished ({now} of {total}): {logs / f'kill{i}.log'}"
        check()
        landed.append(now)
    return landed


@pytest.mark.parametrize("stage,seed", [("tokenize", 11), ("teacher-logits", 12)])
def test_kills_in_sharded_stages(finished_run, tmp_path, tracking_uri, ledger, stage, seed):
    run_dir, _, _ = finished_run
    if stage == "tokenize":  # ~300 small shards: enough work for the kills to land mid-stage
        many = {"data": {"train_tokens": 150_000, "seq_len": 64, "sequences_per_shard": 8}}
        run_command(stage_command("tokenize", tiny_config(tmp_path, tracking_uri, "whole", **many)))
        finished = tree_bytes(tmp_path / "whole" / "tokens")
        config = tiny_config(tmp_path, tracking_uri, "killed", **many)
        out = tmp_path / "killed" / "tokens"
    else:
        finished = tree_bytes(run_dir / "teacher")
        config = tiny_config(tmp_path, tracking_uri, "killed")
        shutil.copytree(run_dir / "tokens", tmp_path / "killed" / "tokens")
        out = tmp_path / "killed" / "teacher"
    total = sum(1 for name in finished if name.endswith(".tar"))
    landed = kill_repeatedly(stage_command(stage, config), lambda: receipts(out), total, seed, 0.005,
                             lambda: nothing_partial_visible(out, finished), tmp_path)
    rerun = run_command(stage_command(stage, config))
    assert f"{total - landed[-1]} of {total} shards" in rerun.stdout  # only the missing shards are redone
    assert tree_bytes(out) == finished
    for n in landed:
        ledger("kill", f"{stage}: SIGKILL with {n}/{total} shards committed", "survived")


def test_kills_in_train_exits(finished_run, tmp_path, tracking_uri, ledger):
    """Killed mid-step five times (2 ranks under deepspeed): the same loss at every step and
    byte-identical exported exits."""
    run_dir, stdout, _ = finished_run
    config = tiny_config(tmp_path, tracking_uri, "killed")
    for stage in ("tokens", "teacher"):
        shutil.copytree(run_dir / stage, tmp_path / "killed" / stage)
    exits = tmp_path / "killed" / "exits"

    def step() -> int:  # `latest` is replaced atomically: it always names a complete checkpoint
        latest = exits / "checkpoints" / "latest"
        return int(latest.read_text().removeprefix("step")) if latest.exists() else 0

    def not_exported():
        assert not (exits / "balcony_config.json").exists() and not (exits / "exits.safetensors").exists()

    total = max(losses_by_step(stdout))
    # (not torchrun: its workers run in a session of their own, so killing its group leaves them training)
    command = stage_command("train-exits", config, ranks=2)
    landed = kill_repeatedly(command, step, total, 13, 1.0, not_exported, tmp_path)
    final = run_command(command)
    assert f"at step {landed[-1]}" in final.stdout
    seen: dict[int, list[float]] = {}
    for output in [*((tmp_path / f"kill{i}.log").read_text() for i in range(KILLS)), final.stdout]:
        for s, loss in losses_by_step(output).items():
            assert seen.setdefault(s, loss) == loss, f"step {s} gave two different losses across restarts"
    assert seen == losses_by_step(stdout)
    assert (exits / "exits.safetensors").read_bytes() == (run_dir / "exits" / "exits.safetensors").read_bytes()
    for n in landed:
        ledger("kill", f"train-exits: SIGKILL after the checkpoint of step {n}/{total}", "survived")


def test_kills_in_evaluate(finished_run, tmp_path, tracking_uri, ledger):
    """Killed at random times: never a partial metrics.json; the rerun's quality rows are the
    uninterrupted run's."""
    run_dir, _, seconds = finished_run
    config = tiny_config(tmp_path, tracking_uri, "killed")
    for stage in ("tokens", "exits"):
        shutil.copytree(run_dir / stage, tmp_path / "killed" / stage, ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "killed" / "eval"
    quality = ("name", "perplexity", "kl_to_full", "top1_agreement")
    rows = lambda d: [{k: r[k] for k in quality} for r in json.loads((d / "metrics.json").read_text())["rows"]]
    rng = random.Random(14)
    for _ in range(KILLS):
        delay = rng.uniform(0.3, 0.75) * seconds
        for _ in range(4):  # `seconds` was timed under another load: a run that ends before its kill goes again, sooner
            # each kill lands in a fresh evaluation: once a killed run left a complete metrics.json, the
            # next would only say "nothing to do"
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.Popen(stage_command("evaluate", config), cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(delay)
            if proc.poll() is None:
                break
            delay /= 2
        else:
            pytest.fail(f"evaluate finished before the kill four times (last at {delay * 2:.1f} s)")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # metrics.json is written last, whole: absent, or (killed while logging to MLflow) complete
        done = (out / "metrics.json").exists()
        if done:
            assert rows(out) == rows(run_dir / "eval")
        ledger("kill", f"evaluate: SIGKILL at {delay:.1f} s of {seconds:.1f} s" + (" (after metrics.json)" if done else ""),
               "survived")
    run_command(stage_command("evaluate", config))
    assert rows(out) == rows(run_dir / "eval")


# ---------------------------------------------------------------- write failures


@pytest.mark.system  # mounts a tmpfs: root
def test_full_disk_then_rerun(finished_run, tmp_path, tracking_uri, ledger):
    """A real full disk: a 128 KiB tmpfs holds run.dir. One clear error, committed shards intact;
    once the disk grows, the rerun completes with the uninterrupted run's bytes."""
    run_dir, _, _ = finished_run
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.fail("cannot mount a tmpfs here (needs root; `make test-unit` leaves this test out)")
    try:
        config = tiny_config(tmp_path, tracking_uri, "full", run={"dir": str(disk / "run")})
        proc = run_command(stage_command("tokenize", config), check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith("error: ") and "write failed (No space left on device)" in error, error
        out, finished = disk / "run" / "tokens", tree_bytes(run_dir / "tokens")
        assert 0 < receipts(out) < 34
        nothing_partial_visible(out, finished)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        run_command(stage_command("tokenize", config))
        assert tree_bytes(out) == finished
    finally:
        subprocess.run(["umount", "-l", str(disk)])
    ledger("write failure", "tokenize on a full disk (tmpfs), then the disk grows", "survived")


@pytest.mark.parametrize("stage,shard", [("tokenize", 3), ("tokenize", 20), ("teacher-logits", 5), ("teacher-logits", 30)])
def test_injected_write_error_then_rerun(finished_run, tmp_path, tracking_uri, monkeypatch, capsys, ledger, stage, shard):
    """In-process: fsync of train shard N's file raises EIO. A one-line error naming the file, the
    shards committed before it intact, and the rerun completes with the uninterrupted run's bytes."""
    from pipeline.stage import run_stage

    run_dir, _, _ = finished_run
    config = tiny_config(tmp_path, tracking_uri, "inject")
    folder = STAGES[stage].output
    if stage == "teacher-logits":
        shutil.copytree(run_dir / "tokens", tmp_path / "inject" / "tokens")
    body = stage_function(stage)
    real_fsync = os.fsync

    def failing_fsync(fd):
        if f".shard-{shard:06d}.tar.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SystemExit) as exited:
        run_stage("", body, ["--config", str(config)])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and f"shard-{shard:06d}.tar: write failed (Input/output error)" in error, error
    out, finished = tmp_path / "inject" / folder, tree_bytes(run_dir / folder)
    assert receipts(out) > 0 and not (out / ".parts" / f"shard-{shard:06d}.tar.json").exists()
    nothing_partial_visible(out, finished)
    monkeypatch.setattr(os, "fsync", real_fsync)
    run_stage("", body, ["--config", str(config)])
    assert tree_bytes(out) == finished
    ledger("write failure", f"{stage}: EIO while writing train shard {shard}", "survived")


def test_a_killed_first_build_of_deepspeeds_cpu_op_is_named_not_waited_on(tmp_path, monkeypatch):
    """The lock a killed JIT build of DeepSpeed's shared-memory op leaves would make every later start
    wait forever: an old one is refused in one line naming it; a build under way (a fresh lock, or an
    old one with a process working in the build folder) is not."""
    from pipeline.distributed import STALE_LOCK_S, refuse_stale_build_lock
    from pipeline.errors import PipelineError

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    refuse_stale_build_lock("deepspeed_shm_comm")  # another process is building it now
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(PipelineError, match=f"{lock}: left by a build of DeepSpeed's deepspeed_shm_comm op"):
        refuse_stale_build_lock("deepspeed_shm_comm")
    compiler = subprocess.Popen(["sleep", "60"], cwd=lock.parent)  # a slow build on a loaded machine, as ninja runs it
    try:
        refuse_stale_build_lock("deepspeed_shm_comm")
    finally:
        compiler.kill()
        compiler.wait()
