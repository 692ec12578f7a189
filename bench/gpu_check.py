"""`make gpu-check`: the teacher's work and exits training on a LLaMA-3-8B-shaped model with random
weights (bf16, seq 4096, vocabulary 128,256, exits 15/18/21) on whatever GPU is present; skips
cleanly without one.

Prints, each measured here in one run:
- teacher-stage ÷ bare-forward throughput: the teacher's per-batch work (forward, head, chunked
  log-softmax, top-k, encoding, copy to the host) against the forward's hidden states alone;
- cached-targets ÷ online-teacher training throughput: `--steps` exits steps (prefix forward, exit
  layers, chunked KL, backward, AdamW) against cached top-k targets, and against the backbone's own
  full forward in the same pass;
- with 2 GPUs or more, model.tensor_parallel 2 against a whole backbone (tests/tensor_parallel_check.py
  on tiny Llama, Qwen3 and Gemma 3 models): the largest logit and target difference per family;
- peak GPU memory of each phase beside `make plan`'s estimate of it (the plan's training estimate
  assumes DeepSpeed's fp32 master weights and states, 16 bytes per trained parameter; this step's plain
  AdamW on bf16 weights keeps 8, which the line states).
Writes results/gpu-check/gpu_check.json. `--cpu --shape assets/smollm2-135m-instruct --layers 4 ...`
runs the same code on a small shape without a GPU (the test suite's smoke test).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from pipeline.calibrate import exits_step, random_ids, teacher_of, timed
from pipeline.config import load_config
from pipeline.plan import architecture, memory_per_device, size, teacher_memory


def shown(peak_bytes: float) -> str:
    return size(peak_bytes) if peak_bytes else "not measured on a CPU"


def peak(step, calls: int) -> tuple[float, float]:
    """(seconds per call, peak bytes allocated) of `step` on the GPU; (seconds, 0) on the CPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, calls=calls)
    return seconds, torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0.0


def tensor_parallel_check(cpu: bool) -> dict | None:
    """model.tensor_parallel on this machine's GPUs (2 groups of 2 with 4, one group of 2 with 2 or 3):
    tests/tensor_parallel_check.py's largest difference from a whole backbone per family; None (skipped)
    with fewer than 2 GPUs."""
    import os
    import subprocess

    gpus = 0 if cpu else torch.cuda.device_count()
    if gpus < 2:
        print(f"tensor parallel: skipped ({gpus} GPU{'s' if gpus != 1 else ''}; it needs 2)")
        return None
    ranks = 4 if gpus >= 4 else 2
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(ranks),
               str(ROOT / "tests" / "tensor_parallel_check.py"), "llama", "qwen3", "gemma3"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TENSOR_PARALLEL": "2"})
    if proc.returncode != 0:
        print(f"tensor parallel: FAILED on {ranks} ranks:\n{proc.stderr[-3000:]}")
        return {"ranks": ranks, "error": proc.stderr[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"tensor parallel: {ranks} ranks in groups of 2 against a whole backbone, largest |difference| per family: "
          + ", ".join(f"{name} {max(d.values()):.2e}" for name, d in result.items()))
    return {"ranks": ranks, "max_abs_difference": result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=str(ROOT / "configs/shapes/llama3-8b"), help="folder with the config.json")
    parser.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0: all)")
    parser.add_argument("--exits", default="15,18,21")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="teacher sequences per forward")
    parser.add_argument("--micro", type=int, default=4, help="training sequences per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test of this script)")
    parser.add_argument("--out", type=Path, default=ROOT / "results/gpu-check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("gpu-check: no GPU on this machine; skipped")
        return 0
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.balcony import BalconyModel

    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = "float32" if args.cpu else "bfloat16"
    cfg = load_config(ROOT / "configs/llama3-8b.yaml", [
        f"model.backbone={args.shape}", f"model.num_layers={args.layers}", f"model.dtype={dtype}",
        f"exits.depths=[{args.exits}]", f"data.seq_len={args.seq}", f"teacher.batch_size={args.batch}",
        f"train.micro_batch_size={args.micro}", f"train.tokens_per_step={args.micro * args.seq}"])
    arch = architecture(cfg, gpu=not args.cpu)
    config = AutoConfig.from_pretrained(args.shape)
    if args.layers:
        config.num_hidden_layers = args.layers
    started = time.perf_counter()
    with torch.device(device):
        backbone = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
    name = torch.cuda.get_device_name() if not args.cpu else "CPU"
    print(f"gpu-check on {name}: {arch.layers} layers, vocabulary {arch.vocab:,}, {dtype}, seq {args.seq}, "
          f"random weights made in {time.perf_counter() - started:.0f} s", flush=True)

    teacher = teacher_of(backbone, cfg)
    ids = random_ids(args.batch, args.seq, arch.vocab)
    keys = [f"sample-{i}" for i in range(len(ids))]
    bare_s, bare_peak = peak(lambda: torch.inference_mode()(teacher.decoder.final_hidden)(
        torch.as_tensor(ids, device=device)), calls=3)
    teacher_s, teacher_peak = peak(lambda: teacher.targets(ids, keys), calls=3)
    planned_teacher = sum(teacher_memory(arch, cfg, gpu=not args.cpu).values())
    tokens = ids.size
    report = {"device": name, "layers": arch.layers, "seq_len": args.seq, "teacher_batch": args.batch,
              "bare_forward_tokens_per_s": tokens / bare_s, "teacher_tokens_per_s": tokens / teacher_s,
              "teacher_peak_bytes": teacher_peak, "teacher_plan_bytes": planned_teacher}
    print(f"teacher: {tokens / teacher_s:,.0f} tok/s against a bare forward's {tokens / bare_s:,.0f}: "
          f"ratio {bare_s / teacher_s:.2f}; peak {shown(teacher_peak)} (plan {size(planned_teacher)})", flush=True)

    model = BalconyModel(backbone, cfg.exits.depths, cfg.exits.kind, cfg.exits.init).to(device)
    cached_s, cached_peak = peak(exits_step(model, teacher, cfg, online=False), calls=args.steps)
    online_s, online_peak = peak(exits_step(model, teacher, cfg, online=True), calls=args.steps)
    parts = memory_per_device(arch, cfg, cfg.exits.depths, world=1, gpu=not args.cpu)
    trained = parts["exit states"] / 16  # parameters: the plan counts 16 bytes each (fp32 master + AdamW)
    planned_train = sum(parts.values()) - parts["exit states"] + 8 * trained  # this step's plain AdamW on bf16: 8
    tokens = args.micro * args.seq
    report.update({"train_steps": args.steps, "train_micro_batch": args.micro,
                   "cached_tokens_per_s": tokens / cached_s, "online_tokens_per_s": tokens / online_s,
                   "cached_peak_bytes": cached_peak, "online_peak_bytes": online_peak,
                   "train_plan_bytes": planned_train})
    print(f"train-exits: {args.steps} steps of {args.micro} x {args.seq}: cached targets {tokens / cached_s:,.0f} tok/s, "
          f"online teacher {tokens / online_s:,.0f} tok/s: ratio {online_s / cached_s:.2f}; peak {shown(cached_peak)} "
          f"cached / {shown(online_peak)} online (plan {size(planned_train)} with 8 bytes per trained parameter)")
    report["tensor_parallel"] = tensor_parallel_check(args.cpu)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"command": " ".join(sys.argv), **report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
