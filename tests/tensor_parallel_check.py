"""Tensor parallelism against one whole copy, on tiny random-weight families (tests/families.py).
Run under torchrun (gloo on CPU, NCCL on GPUs: one per rank) with a world of groups x TENSOR_PARALLEL ranks; each rank feeds its
own inputs. Prints, on rank 0's last line, JSON {family: {check: max abs difference}} over all ranks:

- exits: BalconyModel's exit logits (perturbed exits, as training leaves them) and the full model's;
- teacher: the teacher's stored log-probs of the same top-k ids (the ids must be equal);
- training: the relative difference of the exits' loss at each of STEPS steps between the world's
  ranks in their groups (DeepSpeed ZeRO-2 over all ranks, each rank its own micro-batch, exact KL to
  the full model) and one process training on all their micro-batches at once (plain AdamW).
"""
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from families import perturb_exits, tiny  # noqa: E402
from pipeline.backbone import load_backbone  # noqa: E402
from pipeline.balcony import BalconyModel  # noqa: E402
from pipeline.config import ModelConfig, TeacherConfig  # noqa: E402
from pipeline.distributed import init_distributed  # noqa: E402
from pipeline.losses import exit_losses  # noqa: E402
from pipeline.targets import TARGETS_KEY, TargetFormat  # noqa: E402
from pipeline.teacher import Teacher  # noqa: E402

DEPTHS = [1, 2]
STEPS = 10
MICRO = 2  # sequences per rank and step


def training(whole, split, rank: int, world: int) -> float:
    """The largest relative difference of the per-step loss, split in groups vs one whole process."""
    import deepspeed

    reference = BalconyModel(whole, DEPTHS)
    ours = BalconyModel(split, DEPTHS, inputs_per_rank=True)
    optimizer = torch.optim.AdamW(reference.exits.parameters(), lr=1e-3)
    params = list(ours.exits.parameters())
    engine, *_ = deepspeed.initialize(model=ours, optimizer=torch.optim.AdamW(params, lr=1e-3), model_parameters=params,
                                      config={"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
                                              "zero_optimization": {"stage": 2}})
    worst = 0.0
    for step in range(STEPS):
        ids = torch.randint(3, 256, (world * MICRO, 20), generator=torch.Generator().manual_seed(step))
        ids = ids.to(next(whole.parameters()).device)
        expected = exit_losses(reference, reference.logits, DEPTHS, {"input_ids.npy": ids}, None, chunk=64).mean()
        optimizer.zero_grad()
        expected.backward()
        optimizer.step()
        mine = {"input_ids.npy": ids[rank * MICRO:(rank + 1) * MICRO]}
        loss = exit_losses(engine, ours.logits, DEPTHS, mine, None, chunk=64).mean()
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        worst = max(worst, abs(float(mean) / world - expected.item()) / expected.item())
    return worst


def differences(name: str, folder: Path, size: int, rank: int, device: torch.device) -> dict[str, float]:
    whole = load_backbone(ModelConfig(backbone=str(folder)), device)
    split = load_backbone(ModelConfig(backbone=str(folder), tensor_parallel=size), device)
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(rank)).to(device)  # this rank's own
    out = {}
    with torch.no_grad():
        models = [BalconyModel(backbone, DEPTHS, inputs_per_rank=True) for backbone in (whole, split)]
        for model in models:
            perturb_exits(model)
        (exits_a, final_a), (exits_b, final_b) = (model(ids, full=True) for model in models)
        out["exits"] = max(float((models[0].logits(exits_a[d]) - models[1].logits(exits_b[d])).abs().max())
                           for d in DEPTHS)
        out["full"] = float((models[0].logits(final_a) - models[1].logits(final_b)).abs().max())
    # the teacher: every rank of a group runs the same batch (its task's)
    shared = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(100 + rank // size))
    fmt = TargetFormat(TeacherConfig(format="topk", k=8), 256)
    config = TeacherConfig(format="topk", k=8, fidelity_positions=0)
    a, b = (Teacher(backbone, fmt, config).targets(shared.numpy(), ["x", "y"]) for backbone in (whole, split))
    decoded = [[fmt.decode(sample[TARGETS_KEY], 20) for sample in samples] for samples in (a, b)]
    for (ids_a, _), (ids_b, _) in zip(*decoded):
        assert (ids_a == ids_b).all(), f"{name}: top-k ids differ"
    out["training"] = training(whole, split, rank, dist.get_world_size())
    out["teacher"] = max(float((logprobs_a - logprobs_b).abs().max()) for (_, logprobs_a), (_, logprobs_b) in zip(*decoded))
    return out


def main(names: list[str]) -> dict:
    rank, world, device = init_distributed()
    size = int(os.environ["TENSOR_PARALLEL"])
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        shared_folder = [scratch]
        dist.broadcast_object_list(shared_folder, src=0)  # one folder of weights for every rank
        for name in names:
            folder = Path(shared_folder[0]) / name
            if rank == 0:
                tiny(name).save_pretrained(folder)
            dist.barrier()
            mine = differences(name, folder, size, rank, device)
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            results[name] = {key: max(r[key] for r in gathered) for key in mine}
        dist.barrier()
    return results


if __name__ == "__main__":
    result = main(sys.argv[1:])
    if dist.get_rank() == 0:
        print(json.dumps(result))
