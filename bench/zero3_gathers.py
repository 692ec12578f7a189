"""ZeRO-3 with a frozen backbone: the bytes each rank gathers per micro-batch, measured, against
`make plan`'s model of them (plan.zero3_gathered_bytes).

Run under the deepspeed launcher (2 ranks share the CPU cores here; on a GPU node, GPUs):

    deepspeed --num_gpus 2 bench/zero3_gathers.py [--layers 12 --exits 4,6,8 --steps 3]

Builds the real training pieces (BalconyModel on the truncated embedded backbone, the engine with
configs/deepspeed/zero3.json as train-exits builds it, exit_losses on cached top-k targets) and
counts, on rank 0, the bytes that torch.distributed's all-gathers return during each measured
micro-batch, for the shipped settings and for variants of them. Writes
results/zero3-gathers/gathers.json and prints one line per variant.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent

from pipeline.calibrate import random_ids, teacher_of
from pipeline.config import load_config

VARIANTS = {
    "shipped": {},
    # parameters released as soon as a module is done with them: what reuse across loss chunks saves
    "no reuse": {"stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 0},
    # every parameter below the persistence threshold: kept whole on every rank
    "all persistent": {"stage3_param_persistence_threshold": 10**9},
}


class GatherCounter:
    """Bytes of the tensors torch.distributed all-gathers into, while `counting`."""

    def __init__(self):
        self.bytes, self.calls, self.counting = 0, 0, False
        for name in ("all_gather_into_tensor", "all_gather"):
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(original))

    def _wrap(self, original):
        def gather(*args, **kwargs):
            if self.counting:  # the output: the first argument, by position or by name
                output = args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list"))
                tensors = output if isinstance(output, list) else [output]
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
                self.calls += 1
            return original(*args, **kwargs)
        return gather


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--exits", default="4,6,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results/zero3-gathers")
    args = parser.parse_args()
    counter = GatherCounter()  # before DeepSpeed binds the functions

    import deepspeed

    from pipeline.backbone import load_backbone
    from pipeline.balcony import BalconyModel
    from pipeline.distributed import init_distributed
    from pipeline.losses import exit_losses
    from pipeline.plan import architecture, zero3_gathered_bytes
    from pipeline.training import deepspeed_config

    rank, world, device = init_distributed()
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"model.num_layers={args.layers}", f"exits.depths=[{args.exits}]", "exits.init=last_layer",
        f"data.seq_len={args.seq}", f"train.micro_batch_size={args.micro}", "train.zero_stage=3", "train.baselines=[]",
        f"train.tokens_per_step={args.micro * args.seq * world}", "train.autocast_bf16=false"])
    arch = architecture(cfg, gpu=device.type == "cuda")
    predicted = zero3_gathered_bytes(arch, cfg, cfg.exits.depths)  # make plan's figure
    ids = random_ids(args.micro, args.seq, arch.vocab, seed=rank)
    rows = []
    for name, settings in VARIANTS.items():
        backbone = load_backbone(cfg.model, device)
        teacher = teacher_of(backbone, cfg)  # targets from the whole backbone, before ZeRO-3 partitions it
        targets = teacher.targets(ids, [f"s{i}" for i in range(len(ids))])
        batch = {"input_ids.npy": torch.as_tensor(ids, device=device),
                 **{k: torch.as_tensor(np.stack([t[k] for t in targets]), device=device) for k in targets[0]}}
        model = BalconyModel(backbone, cfg.exits.depths, cfg.exits.kind, cfg.exits.init)
        params = [p for p in model.exits.parameters() if p.requires_grad]
        ds = deepspeed_config(cfg, 1, bf16=False)
        ds["zero_optimization"].update(settings)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-6),
                                               model_parameters=params, config=ds)

        def step():
            losses = exit_losses(engine, model.logits, model.depths, batch, teacher.fmt, cfg.train.chunk_size)
            engine.backward(losses.mean())
            engine.step()

        step()  # warm-up: ZeRO-3 records its parameter trace on the first pass
        counter.bytes = counter.calls = 0
        counter.counting, started = True, time.perf_counter()
        for _ in range(args.steps):
            step()
        counter.counting, seconds = False, (time.perf_counter() - started) / args.steps
        rows.append({"variant": name, "settings": settings, "gathered_bytes_per_micro_batch": counter.bytes / args.steps,
                     "gathers_per_micro_batch": counter.calls / args.steps, "seconds_per_step": seconds})
        if rank == 0:
            print(f"{name:20s} gathered {counter.bytes / args.steps / 2**20:8.1f} MiB in "
                  f"{counter.calls / args.steps:5.0f} all-gathers per micro-batch; {seconds:.2f} s per step", flush=True)
        engine.destroy()  # its hooks leave the model; the next variant builds its own
    if rank == 0:
        print(f"make plan's model: the prefix to exit {max(cfg.exits.depths)}, the embedding and head, the exits: "
              f"{predicted / 2**20:.1f} MiB per micro-batch")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gathers.json").write_text(json.dumps({
            "command": f"deepspeed --num_gpus {world} bench/zero3_gathers.py "
                       + " ".join(a for a in sys.argv[1:] if not a.startswith("--local_rank")),
            "ranks": world, "layers": args.layers, "exits": cfg.exits.depths, "seq_len": args.seq,
            "micro_batch": args.micro, "plan_bytes_per_micro_batch": predicted, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
