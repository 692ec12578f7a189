"""search-exits: candidate exits at many depths, trained at once and scored; where the exits go.

    python stages/search_exits.py --config configs/demo.yaml exits.depths=auto exits.count=3
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 stages/search_exits.py --config C exits.depths=auto exits.budgets=[0.5,0.7]

Runs with exits.depths auto, after teacher-logits and before train-exits (pipeline/search.py says
how it chooses). Writes RUN/search/candidates/ (trained by train-exits' own loop: resumable),
RUN/search/scores.json (each candidate's held-out quality and relative decode cost), then
table.md, plot.png and RUN/search/result.json (the chosen depths; written last). Asked again with
another exits.count or exits.budgets, it chooses again from the scores in a moment.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.backbone import backbone_fingerprint, load_backbone
from pipeline.balcony import BalconyModel
from pipeline.config import AUTO, Config
from pipeline.decoder import Decoder
from pipeline.distributed import init_distributed
from pipeline.errors import ConfigError
from pipeline.evaluation import heldout_sequences, score, variants_of
from pipeline.registry import SEARCH_EXITS, TOKENIZE
from pipeline.report import search_plot, search_table
from pipeline.search import (CANDIDATES, RESULT, SCORES, candidate_depths, candidates_config, candidates_hash,
                             choice_settings, choose, latency_line, pareto_front, search_steps, served_kl)
from pipeline.shards import FORMAT_VERSION, atomic_write, claim_directory
from pipeline.stage import run_stage
from pipeline.timing import decode_latency
from pipeline.tracking import stage_run
from pipeline.training import train_exits

STAGE = SEARCH_EXITS


def run(cfg: Config, task: tuple[int, int]) -> None:
    if cfg.exits.depths != AUTO:
        raise ConfigError(f"exits.depths: {cfg.exits.depths} is given; search-exits chooses them when it is auto")
    rank, world, device = init_distributed()
    backbone = load_backbone(cfg.model, device)
    fingerprint = backbone_fingerprint(cfg.model, backbone)
    depths = candidate_depths(cfg, Decoder(backbone).num_layers)
    out = STAGE.dir(cfg)
    header = {"stage": STAGE.tag, "candidates_hash": candidates_hash(cfg), "backbone_fingerprint": fingerprint,
              "candidates": depths}
    claim_directory(out, header, write=rank == 0)
    dist.barrier()
    if not (out / SCORES).exists():
        started = time.perf_counter()
        train_exits(candidates_config(cfg, depths), out / CANDIDATES, "candidates", backbone, fingerprint, rank, world, device,
                  stage=STAGE, search_steps=search_steps(cfg))
        if rank == 0:
            scores = score_candidates(cfg, backbone, fingerprint, device)
            scores.update(header, format_version=FORMAT_VERSION, seconds=time.perf_counter() - started)
            atomic_write(out / SCORES, json.dumps(scores, indent=1).encode())
    dist.barrier()
    if rank == 0:
        choose_depths(cfg, out, header)


def score_candidates(cfg: Config, backbone, fingerprint: str, device: torch.device) -> dict:
    """Every candidate's held-out KL to the full model, top-1 agreement and perplexity, beside the full
    model and the logit lens at the shallowest candidate depth, with relative costs (search.cost)."""
    model = BalconyModel.from_pretrained(backbone, STAGE.dir(cfg) / CANDIDATES, fingerprint).to(device).eval()
    sequences = heldout_sequences(cfg, TOKENIZE.dir(cfg), max(1, cfg.search.heldout_tokens // cfg.data.seq_len))
    first = model.depths[0]
    variants = [v for v in variants_of(model, []) if v.kind != "logit_lens" or v.depth == first]
    rows = score(model, [], variants, sequences, cfg.eval, device, f"{STAGE.name} quality")
    # layers each variant runs: an exit its depth plus its own layer, the lens its depth, the full model L
    layers = [model.num_layers if r["kind"] == "full" else r["depth"] + (r["kind"] == "balcony") for r in rows]
    line = None
    if cfg.search.cost == "measured":
        prompt = sequences[:1, : cfg.eval.prompt_tokens].to(device)
        measured = [(row, decode_latency(model, None if row["kind"] == "full" else row["depth"], prompt,
                                         cfg.eval.new_tokens, cfg.eval.repeats), n)
                    for row, n in zip(rows, layers) if row["kind"] != "logit_lens"]
        for row, seconds, _ in measured:
            row["latency_ms"] = seconds * 1e3
        line = latency_line([n for *_, n in measured], [seconds for _, seconds, _ in measured])
        intercept, slope = line
        for row, n in zip(rows, layers):
            row["relative_cost"] = (intercept + slope * n) / (intercept + slope * model.num_layers)
        print(f"{STAGE.name}: decode latency {intercept * 1e3:.2f} ms + {slope * 1e3:.3f} ms per layer per token "
              f"(head and embedding = {intercept / slope:.1f} layers)")
    return {"num_layers": model.num_layers, "heldout_tokens": sequences.numel(),
            "train_tokens": search_steps(cfg) * cfg.train.tokens_per_step, "loss_positions": cfg.search.loss_positions,
            "cost": cfg.search.cost, "latency_line_s": line, "device": device.type, "rows": rows}


def choose_depths(cfg: Config, out: Path, header: dict) -> None:
    """RUN/search/result.json for this config's exits.count / exits.budgets (chosen from scores.json)."""
    asked = choice_settings(cfg)
    if (out / RESULT).exists():
        result = json.loads((out / RESULT).read_text())
        if all(result.get(key) == value for key, value in asked.items()):
            print(f"{STAGE.name}: {out / RESULT} exists for these settings (exits {result['chosen']}); nothing to do")
            return
    scores = json.loads((out / SCORES).read_text())
    points = [row for row in scores["rows"] if row["kind"] == "balcony"]
    lens = next(row for row in scores["rows"] if row["kind"] == "logit_lens")
    start = min(point["relative_cost"] for point in points)
    chosen = choose(cfg, points, lens["kl_to_full"])
    kept = [point for point in points if point["depth"] in chosen]
    result = {"format_version": FORMAT_VERSION, **asked, "chosen": chosen, "pareto_front": pareto_front(points),
              "floor": {"name": lens["name"], "kl_to_full": lens["kl_to_full"]}, "budget_range": [start, 1.0],
              "mean_kl_over_budgets": served_kl(kept, start, lens["kl_to_full"])}
    with stage_run(cfg, STAGE.tag, header["candidates_hash"], label="choice") as tracker:
        for point in points:  # one curve per metric against depth (the MLflow step)
            tracker.metrics({"candidate_kl": point["kl_to_full"], "candidate_top1": point["top1_agreement"],
                             "candidate_perplexity": point["perplexity"],
                             "candidate_relative_cost": point["relative_cost"]}, step=point["depth"])
        tracker.metrics({**{f"chosen{i}_depth": d for i, d in enumerate(chosen, 1)},
                         "mean_kl_over_budgets": result["mean_kl_over_budgets"]})
        atomic_write(out / "table.md", search_table(scores, result).encode())
        search_plot(scores, result, out / "plot.png")
        atomic_write(out / RESULT, json.dumps(result, indent=1).encode())
        for name in (SCORES, RESULT, "table.md", "plot.png"):
            tracker.artifact(out / name)
    print((out / "table.md").read_text())
    print(f"{STAGE.name}: exits {chosen} -> {out / RESULT}")


if __name__ == "__main__":
    run_stage(__doc__.splitlines()[0], run, stop_at_once=False)  # stops after a step, checkpointed
