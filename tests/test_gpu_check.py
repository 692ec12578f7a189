"""`make gpu-check`: its code on a small real shape on the CPU (so it is known to run before a GPU is
lent), the clean skip without a GPU, and the real check where a GPU is present."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import BACKBONE, ONE_THREAD, ROOT

SCRIPT = str(ROOT / "bench/gpu_check.py")


@pytest.mark.integration
def test_smoke_on_cpu(tmp_path, assets):
    small = ["--cpu", "--shape", str(BACKBONE), "--layers", "4", "--exits", "2,3", "--seq", "64", "--batch", "2",
             "--micro", "2", "--steps", "2", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, SCRIPT, *small], capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher: " in proc.stdout and "ratio" in proc.stdout and "online teacher" in proc.stdout, proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["layers"] == 4 and report["teacher_tokens_per_s"] > 0 and report["online_tokens_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check runs instead")
def test_skips_cleanly_without_a_gpu():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "no GPU on this machine; skipped" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_the_gpu(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--steps", "3", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["teacher_peak_bytes"] > 0 and report["cached_tokens_per_s"] > 0
