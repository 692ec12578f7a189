"""Timing the stages' inner work on this machine: `make calibrate` (the `throughput:` table of a
site config, measured on one of its nodes) and `make gpu-check` (bench/gpu_check.py) build on it.

The rates are timed with the recipe's own backbone, shapes and code on this machine's device (a GPU
when there is one): tokenizing the source's first documents, the teacher's forward + head + target
selection (teacher-logits' and evaluate's work), and an exits training step (prefix forward, exit
layers, chunked loss, backward, AdamW; one device, no DeepSpeed, so ZeRO's communication is not in
it). Token ids are random: the cost of a forward does not depend on them. Each rate is FLOPs (as
the plan counts them) over measured seconds, after one untimed warm-up.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time

import numpy as np
import torch

from pipeline.config import Config
from pipeline.plan import architecture, planned_depths, train_flops_per_token

MIN_SECONDS = 5.0  # timing repeats until it has run this long (and at least twice)


def timed(step, min_seconds: float = MIN_SECONDS, calls: int = 0) -> float:
    """Seconds per call of `step`, after a warm-up call: `calls` calls, or as many as `min_seconds` takes."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    step()
    sync()
    done, start = 0, time.perf_counter()
    while done < (calls or 2) or (not calls and time.perf_counter() - start < min_seconds):
        step()
        done += 1
    sync()
    return (time.perf_counter() - start) / done


def random_ids(rows: int, seq_len: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (rows, seq_len))


def teacher_of(backbone, cfg: Config):
    """The teacher stage's per-batch work (no fidelity probes: they are not the stage's cost at scale)."""
    from pipeline.targets import TargetFormat
    from pipeline.teacher import Teacher

    fmt = TargetFormat(cfg.teacher, backbone.config.vocab_size)
    return Teacher(backbone, fmt, dataclasses.replace(cfg.teacher, fidelity_positions=0))


def exits_step(model, teacher, cfg: Config, online: bool):
    """One training step of `model`'s exits on one random micro-batch: against its cached-format targets
    (made by `teacher`), or with `online` against the backbone's own forward in the same pass."""
    from pipeline.losses import exit_losses
    from pipeline.targets import TARGETS_KEY

    device = next(model.parameters()).device
    ids = random_ids(cfg.train.micro_batch_size, cfg.data.seq_len, model.decoder.config.vocab_size, seed=1)
    batch = {"input_ids.npy": torch.as_tensor(ids, device=device)}
    if not online:
        targets = teacher.targets(ids, [f"sample-{i}" for i in range(len(ids))])
        decoded = teacher.fmt.decode_batch([t[TARGETS_KEY] for t in targets], ids.shape[1])
        batch.update({k: v.to(device) for k, v in decoded.items()})
    optimizer = torch.optim.AdamW([p for p in model.exits.parameters() if p.requires_grad], lr=1e-6)
    generator = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.autocast_bf16):
            losses = exit_losses(model, model.logits, model.depths, batch, None if online else teacher.fmt,
                                 cfg.train.chunk_size, "kl", cfg.train.loss_positions, generator)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def calibrate(cfg: Config, min_seconds: float = MIN_SECONDS) -> dict[str, float]:
    from pipeline.backbone import load_backbone, load_tokenizer
    from pipeline.balcony import BalconyModel
    from pipeline.corpus import document_encoder
    from pipeline.sources import stream_documents

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    arch = architecture(cfg, gpu)
    seq = cfg.data.seq_len
    rates: dict[str, float] = {}

    tokenizer = load_tokenizer(cfg.model)
    texts = list(itertools.islice(stream_documents(cfg.data, tokenizer), 256))
    encode = document_encoder(tokenizer)
    tokens = sum(len(ids) for ids in encode(texts))
    cores = len(os.sched_getaffinity(0))  # the tokenizer's batch encoding runs on all of them
    rates["tokenize_tokens_per_s"] = tokens / timed(lambda: encode(texts), min_seconds) / cores

    backbone = load_backbone(cfg.model, device)
    teacher = teacher_of(backbone, cfg)
    ids = random_ids(cfg.teacher.batch_size, seq, arch.vocab)
    keys = [f"sample-{i}" for i in range(len(ids))]
    seconds = timed(lambda: teacher.targets(ids, keys), min_seconds)
    rates["teacher_flops"] = rates["evaluate_flops"] = ids.size * arch.forward_flops(seq) / seconds

    depths = planned_depths(cfg, arch)
    model = BalconyModel(backbone, depths, cfg.exits.kind, cfg.exits.init).to(device)
    seconds = timed(exits_step(model, teacher, cfg, online=False), min_seconds)
    per_token = train_flops_per_token(arch, depths, cfg.exits.kind, cfg.train.loss_positions, False, seq)
    rates["train_flops"] = cfg.train.micro_batch_size * seq * per_token / seconds
    return rates


def throughput_yaml(rates: dict[str, float]) -> str:
    return "throughput: {" + ", ".join(f"{k}: {v:.3g}" for k, v in rates.items()) + "}"
