"""The exit training loop under DeepSpeed ZeRO, shared by train-exits and search-exits.

One call of `train_exits` trains one set of exits into a folder: checkpoints every
train.checkpoint_every steps (weights, optimizer, scheduler, RNG; the data position is the step),
resumes from the last one, and at the end exports exits.safetensors + balcony_config.json.
Only exit parameters reach the optimizer; the backbone is frozen and shared.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # deepspeed imports mlflow when present
# DeepSpeed 0.19 calls collectives that torch 2.13 renamed; one warning per call drowns the log
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.backbone import load_tokenizer, tokenizer_fingerprint
from pipeline.balcony import CONFIG as EXITS_CONFIG
from pipeline.balcony import WEIGHTS, BalconyModel
from pipeline.config import Config, ConfigError
from pipeline.errors import PipelineError, TimeLimit
from pipeline.losses import exit_losses
from pipeline.registry import SEARCH_EXITS, TEACHER_LOGITS, TOKENIZE, TRAIN_EXITS, Stage
from pipeline.shards import MANIFEST, atomic_write, claim_directory, file_sha256, manifest_hash, read_manifest
from pipeline.stage import time_limit_signalled
from pipeline.targets import TargetFormat
from pipeline.tracking import stage_run
from pipeline.train_data import TrainBatches

DEEPSPEED_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    """DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights in the optimizer)."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def accumulation_steps(cfg: Config, world: int) -> int:
    """Micro-batches per rank per step; refuses a recipe the ranks cannot run (before any work)."""
    if cfg.model.tensor_parallel > 1 and cfg.train.zero_stage == 3:
        raise ConfigError(f"train.zero_stage: 3 partitions the backbone, which model.tensor_parallel "
                          f"{cfg.model.tensor_parallel} already splits; use ZeRO-1 or 2 (they partition the exits' "
                          "optimizer states and gradients over every rank)")
    per_micro_step = cfg.data.seq_len * cfg.train.micro_batch_size * world
    if cfg.train.tokens_per_step % per_micro_step:
        raise ConfigError(
            f"train.tokens_per_step: {cfg.train.tokens_per_step} is not a multiple of data.seq_len x "
            f"train.micro_batch_size x ranks = {cfg.data.seq_len} x {cfg.train.micro_batch_size} x {world}")
    return cfg.train.tokens_per_step // per_micro_step


def deepspeed_config(cfg: Config, accumulation: int, bf16: bool) -> dict:
    """The ZeRO settings from configs/deepspeed/zeroN.json; batch, precision and clipping from the recipe."""
    ds = json.loads((DEEPSPEED_CONFIGS / f"zero{cfg.train.zero_stage}.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=cfg.train.micro_batch_size, gradient_accumulation_steps=accumulation,
              gradient_clipping=cfg.train.grad_clip, bf16={"enabled": bf16})
    return ds


def lr_lambda(cfg: Config, total_steps: int):
    """Linear warmup, then cosine decay to min_lr_ratio, warmup-stable-decay, or constant."""
    warmup = math.ceil(cfg.train.warmup_fraction * total_steps)
    decay_start = total_steps - math.ceil(cfg.train.decay_fraction * total_steps)
    floor = cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.schedule == "constant":
            return 1.0
        if cfg.train.schedule == "wsd":
            if step < decay_start:
                return 1.0
            return floor + (1 - floor) * (total_steps - step) / max(1, total_steps - decay_start)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class ExitTraining:
    """One set of exits under way: what set_up made, what the loop reads and advances."""

    cfg: Config
    name: str  # "exits", a baseline's name, or "candidates"
    stage: Stage
    out: Path
    model: BalconyModel
    engine: object  # the DeepSpeed engine around `model`
    fmt: TargetFormat | None  # the cached targets' format; None: the online teacher (kl) or the tokens (ce)
    stream: Iterator[dict]  # micro-batches from where the run is
    step: int  # optimizer steps done
    total_steps: int
    accumulation: int  # micro-batches per rank per step
    rank: int
    world: int
    device: torch.device
    fingerprint: str  # the backbone's
    config_hash: str


def train_exits(cfg: Config, out: Path, name: str, backbone, fingerprint: str, rank: int, world: int,
                device: torch.device, stage: Stage = TRAIN_EXITS, search_steps: int = 0,
                initial: Path | None = None) -> None:
    """One set of exits into `out`. `search_steps`: the last that many steps of the epoch's order belong
    to the exit search: its candidates (`stage` SEARCH_EXITS) train on exactly them, exits after a search
    on the steps before them. `initial`: exported exits the new ones start from (at the same depths)."""
    run = set_up(cfg, out, name, backbone, fingerprint, rank, world, device, stage, search_steps, initial)
    if run is not None:
        train(run)


def set_up(cfg: Config, out: Path, name: str, backbone, fingerprint: str, rank: int, world: int, device: torch.device,
           stage: Stage, search_steps: int, initial: Path | None) -> ExitTraining | None:
    """Inputs checked, the directory claimed, the engine built and resumed; None when the exits exist."""
    import deepspeed

    accumulation = accumulation_steps(cfg, world)
    bf16 = uses_bf16(cfg, device)
    dtype = next(backbone.parameters()).dtype
    if not bf16 and dtype != torch.float32:  # fp32 exits would be copies of bf16 layers
        raise ConfigError(f"train.precision: {cfg.train.precision} trains in fp32 here, but the backbone is {dtype} "
                          f"(model.dtype {cfg.model.dtype}); set train.precision bf16 (DeepSpeed keeps fp32 master "
                          "weights of the exits) or model.dtype float32")
    torch.manual_seed(cfg.train.seed)

    # --- inputs: the shards the earlier stages must have produced
    if not cfg.train.reads_cached_targets:
        source = TOKENIZE.dir(cfg)
        manifest = read_manifest(source, TOKENIZE.tag, expect={
            "tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer(cfg.model)), "seq_len": cfg.data.seq_len})
        fmt = None
    else:
        source = TEACHER_LOGITS.dir(cfg)
        manifest = read_manifest(source, TEACHER_LOGITS.tag, expect={"backbone_fingerprint": fingerprint,
                                                                     "seq_len": cfg.data.seq_len})
        fmt = TargetFormat.from_manifest(manifest, source / MANIFEST)
    model = BalconyModel(backbone, cfg.exits.depths, cfg.exits.kind, cfg.exits.init, inputs_per_rank=True)
    header = {"stage": stage.tag, "config_hash": cfg.hash("exits", "train"), "input_manifest_hash": manifest_hash(source),
              "backbone_fingerprint": fingerprint, "depths": model.depths, "world_size": world,
              "precision": "bf16" if bf16 else "fp32", "search_steps": search_steps}
    if initial is not None:
        model.load_exits(initial, subset=True)
        header["initial_exits_sha256"] = file_sha256(initial / WEIGHTS)
    # refuses checkpoints of another exit configuration or input; every rank checks, rank 0 writes.
    # Finished exits are the same whatever the world size that made them; a resume needs the same.
    finished = (out / EXITS_CONFIG).exists()
    if finished:
        del header["world_size"]
    claim_directory(out, header, write=rank == 0)
    dist.barrier()
    if finished:
        if rank == 0:
            print(f"{stage.name}: {out / EXITS_CONFIG} exists for this configuration; nothing to do")
        return None

    # --- data and schedule
    batches = TrainBatches(source, manifest, fmt,
                           cfg.train.micro_batch_size, rank, world, cfg.train.seed, cfg.train.num_workers)
    epoch_steps = batches.batches_per_epoch // accumulation
    if epoch_steps < 1:
        raise ConfigError(f"train.tokens_per_step: one step needs {accumulation} micro-batches per rank, "
                          f"the data gives {batches.batches_per_epoch}; lower it or add data")
    if search_steps >= epoch_steps:
        raise ConfigError(f"search.tokens: {search_steps} steps of the epoch's {epoch_steps} leave train-exits "
                          "nothing to train on; lower it or add data")
    searching = stage is SEARCH_EXITS
    first_step = epoch_steps - search_steps if searching else 0  # where this run's data starts in the epoch
    total_steps = search_steps if searching else cfg.train.max_steps or cfg.train.epochs * epoch_steps - search_steps
    late = [s for s in cfg.train.snapshots if s > total_steps]
    if late:
        raise ConfigError(f"train.snapshots: step {late[0]} is past the run's {total_steps} steps")

    # --- engine: only exit parameters reach the optimizer
    params = [p for p in model.exits.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(0.9, cfg.train.adam_beta2),
                                  weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=params, config=deepspeed_config(cfg, accumulation, bf16))
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine._config)
    cast = model.decoder.low_precision_rotary()
    if cast:
        raise PipelineError(f"deepspeed: {deepspeed.__version__} cast the rotary buffers {cast} to low precision "
                            "(positions would be wrong); install deepspeed >= 0.19.2")
    step = 0
    checkpoints = out / "checkpoints"
    if (checkpoints / "latest").exists():
        _, state = engine.load_checkpoint(str(checkpoints), load_module_strict=False)
        step = state["step"]
        torch.set_rng_state(state["rng"])
        if rank == 0:
            print(f"{stage.name}: resumed from {checkpoints / (checkpoints / 'latest').read_text().strip()} at step {step}")

    if rank == 0:
        unused = batches.dropped + (batches.batches_per_epoch - epoch_steps * accumulation) * world * batches.micro_batch
        if not cfg.train.max_steps and unused:
            print(f"{stage.name} ({name}): {unused} of {batches.samples} train sequences unused per epoch "
                  f"({batches.dropped} do not fill {world} equal blocks of whole micro-batches, the rest a whole step)")
        split = f" (tensor-parallel groups of {cfg.model.tensor_parallel})" if cfg.model.tensor_parallel > 1 else ""
        print(f"{stage.name} ({name}): {world} ranks{split}, ZeRO-{cfg.train.zero_stage}, {'bf16' if bf16 else 'fp32'}"
              f"{' + bf16 autocast' if cfg.train.autocast_bf16 else ''}, {cfg.exits.kind} exits {model.depths}, "
              f"{total_steps} steps x {cfg.train.tokens_per_step} tokens ({accumulation} micro-batches per rank per step)"
              + (f" from step {first_step} of the epoch's {epoch_steps}" if first_step else ""))
    stream = batches.stream(start=(first_step + step) * accumulation)
    return ExitTraining(cfg, name, stage, out, model, engine, fmt, stream, step, total_steps, accumulation, rank, world,
                        device, fingerprint, header["config_hash"])


def train(run: ExitTraining) -> None:
    """The steps from where `run` is to its last, checkpointed as the recipe says, then the export."""
    cfg, model, engine, device = run.cfg, run.model, run.engine, run.device
    bar = tqdm(total=run.total_steps, initial=run.step, unit="step", desc=run.stage.name, disable=run.rank != 0,
               dynamic_ncols=True)
    with stage_run(cfg, run.stage.tag, run.config_hash, enabled=run.rank == 0, label=run.name) as tracker, bar:
        while run.step < run.total_steps:
            started = time.perf_counter()
            step_losses = torch.zeros(len(model.depths), device=device)
            for micro in range(run.accumulation):
                batch = {k: v.to(device) for k, v in next(run.stream).items()}
                # train.loss_positions: which positions, a function of where the run is (so a resume draws the same)
                positions = torch.Generator().manual_seed(hash((cfg.train.seed, run.rank, run.step, micro)))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.autocast_bf16):
                    losses = exit_losses(engine, model.logits, model.depths, batch, run.fmt, cfg.train.chunk_size,
                                         cfg.train.objective, cfg.train.loss_positions, positions)
                engine.backward(losses.mean())
                # on every micro-step, as DeepSpeed wants: it steps the optimizer (and the scheduler)
                # only at the gradient-accumulation boundary, and merely counts the others
                engine.step()
                step_losses += losses.detach() / run.accumulation
            dist.all_reduce(step_losses)
            step_losses /= run.world
            run.step += 1
            seconds = time.perf_counter() - started
            if run.rank == 0:
                lr = engine.lr_scheduler.get_last_lr()[0]
                # 9 significant digits: a float32 exactly, so that runs compare by value (resume, ZeRO stages)
                per_exit = "  ".join(f"kl@{d} {v:.9g}" for d, v in zip(model.depths, step_losses.tolist()))
                bar.write(f"step {run.step}/{run.total_steps}  {per_exit}  lr {lr:.3e}  "
                          f"{cfg.train.tokens_per_step / seconds:,.0f} tok/s")
                sys.stdout.flush()  # a log file (SLURM) sees each step as it ends
                bar.update()
                tracker.metrics({**{f"kl_exit_{d}": v for d, v in zip(model.depths, step_losses.tolist())},
                                 "kl_mean": float(step_losses.mean()), "lr": lr,
                                 "tokens_per_s": cfg.train.tokens_per_step / seconds}, step=run.step)
            if run.step in cfg.train.snapshots:
                export(run, snapshot_dir(run.out, run.step))
            # SLURM's warning before the time limit (on any rank): checkpoint, and stop for the requeue
            stopping = time_limit_signalled(dist.group.WORLD)
            if run.step % cfg.train.checkpoint_every == 0 or run.step == run.total_steps or stopping:
                save_checkpoint(engine, run.out / "checkpoints", run.step, cfg.train.keep_checkpoints, run.rank)
            if stopping and run.step < run.total_steps:
                dist.barrier()  # rank 0 has moved `latest`: no rank exits (and srun stops the others) before
                raise TimeLimit(f"{run.stage.name} ({run.name}) at step {run.step} of {run.total_steps}, "
                                "checkpointed")
        export(run, run.out)
        if run.rank == 0:
            tracker.artifact(run.out / EXITS_CONFIG)
            print(f"{run.stage.name}: wrote {run.out / WEIGHTS} and {run.out / EXITS_CONFIG}")


def weights_only_checkpoint_engine(ds_config):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True: tensors, plain containers
    and the few DeepSpeed classes its checkpoints hold, never an arbitrary pickle (DeepSpeed's own
    engine loads with weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class Engine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return Engine(ds_config)


def save_checkpoint(engine, folder: Path, step: int, keep: int, rank: int) -> None:
    """Exit weights, optimizer, scheduler and RNG; the data position is the step itself."""
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step, "rng": torch.get_rng_state()},
                           exclude_frozen_parameters=True, save_latest=False)
    dist.barrier()
    if rank == 0:  # `latest` moves (atomically; DeepSpeed's own write is not) once every rank has saved
        atomic_write(folder / "latest", tag.encode())
        for old in sorted(folder.glob("step*"))[:-keep]:
            shutil.rmtree(old)


def snapshot_dir(out: Path, step: int) -> Path:
    return out / "snapshots" / f"step{step:08d}"


def export(run: ExitTraining, out: Path) -> None:
    """exits.safetensors + balcony_config.json (written last: its presence marks a finished export)."""
    import deepspeed

    cfg = run.cfg
    trained = {"objective": cfg.train.objective, "steps": run.step, "tokens": run.step * cfg.train.tokens_per_step}
    with deepspeed.zero.GatheredParameters(list(run.model.exits.parameters()), modifier_rank=None):
        if run.rank == 0:
            run.model.save_exits(out, run.fingerprint, trained)
    dist.barrier()
