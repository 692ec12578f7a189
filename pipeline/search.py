"""Where the exits go: the search-exits stage's candidates, their costs, and the choice of depths.

With `exits.depths: auto`, search-exits trains a candidate exit at every `search.stride`-th depth
between `search.first` and `search.last` of the backbone, all at once (one prefix pass serves
them all), on the last `search.tokens` of the train split's epoch order; scores each on held-out
tokens; measures what each costs to decode; and keeps:

- `exits.count: K`: the K candidates that minimise the mean KL to the full model over compute
  budgets spread evenly from the cheapest candidate's cost to 1, each budget served by the deepest
  kept exit that fits it (BalconyModel.choose_exit), and a budget below every kept exit by the
  logit lens at the shallowest candidate depth (it costs less than any candidate). In the KL-cost
  plane this is the area under the kept exits' staircase: a dynamic program finds the best K exactly.
- `exits.budgets: [b, ...]`: for each budget, the best candidate (lowest KL) that costs no more.

train-exits then trains the chosen exits on the tokens the search did not read, each starting
from its candidate's weights, so the token budget is read once, search included.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from pipeline.balcony import BalconyModel
from pipeline.config import AUTO, Config
from pipeline.errors import ConfigError, InputError
from pipeline.evaluation import heldout_sequences, score, variants_of
from pipeline.registry import SEARCH_EXITS, TOKENIZE
from pipeline.report import search_plot, search_table
from pipeline.shards import FORMAT_VERSION, atomic_write
from pipeline.timing import CostLine, decode_latency
from pipeline.tracking import stage_run

CANDIDATES, SCORES, RESULT = "candidates", "scores.json", "result.json"


def candidate_depths(cfg: Config, num_layers: int) -> list[int]:
    """Every search.stride-th depth from search.first to search.last of `num_layers`, within [1, L-2]
    (an exit at L-1 runs as many layers as the full model)."""
    first = max(1, math.ceil(cfg.search.first * num_layers))
    last = min(num_layers - 2, math.floor(cfg.search.last * num_layers))
    depths = list(range(first, last + 1, cfg.search.stride))
    if len(depths) < 2:
        raise ConfigError(f"search.first / search.last / search.stride: {depths or 'no depth'} of {num_layers} layers "
                          "is not a search; widen the range or lower the stride")
    return depths


def search_steps(cfg: Config) -> int:
    """Optimizer steps the candidates train for: search.tokens in steps of train.tokens_per_step."""
    steps = cfg.search.tokens // cfg.train.tokens_per_step
    if steps < 1:
        raise ConfigError(f"search.tokens: {cfg.search.tokens:,} is less than one step of train.tokens_per_step "
                          f"{cfg.train.tokens_per_step:,}")
    return steps


def candidates_config(cfg: Config, depths: list[int]) -> Config:
    """The recipe the candidates train with: the run's own, with the search's share of loss positions,
    every candidate depth, and nothing else (no baselines, no snapshots)."""
    exits = dataclasses.replace(cfg.exits, depths=depths, count=0, budgets=[])
    train = dataclasses.replace(cfg.train, loss_positions=cfg.search.loss_positions, baselines=[], snapshots=[],
                                max_steps=0)
    return dataclasses.replace(cfg, exits=exits, train=train)


def candidates_hash(cfg: Config) -> str:
    """What the candidates and their scores are a function of (with the backbone): everything but how
    many to keep, which is chosen again from the scores in a moment."""
    exits = dataclasses.replace(cfg.exits, count=0, budgets=[])
    return dataclasses.replace(cfg, exits=exits).hash("data", "teacher", "exits", "train", "search")


def choice_settings(cfg: Config) -> dict:
    """What a choice (RUN/search/result.json) is made for: the candidates, and how many to keep."""
    return {"candidates_hash": candidates_hash(cfg), "count": cfg.exits.count, "budgets": cfg.exits.budgets}


def resolve_depths(cfg: Config) -> Config:
    """`cfg` itself, or with exits.depths auto, `cfg` with the depths search-exits chose (RUN/search/result.json)."""
    if cfg.exits.depths != AUTO:
        return cfg
    path = SEARCH_EXITS.dir(cfg) / RESULT
    if not path.exists():
        raise InputError(f"{path} not found: exits.depths is auto; run the search-exits stage first")
    result = json.loads(path.read_text())
    asked = choice_settings(cfg)
    differ = [key for key, value in asked.items() if result.get(key) != value]
    if differ:
        raise InputError(f"{path}: chosen with other settings ({', '.join(f'{k} {result.get(k)!r}' for k in differ)}; "
                         f"this config: {', '.join(f'{k} {asked[k]!r}' for k in differ)}): run search-exits again")
    exits = dataclasses.replace(cfg.exits, depths=result["chosen"], count=0, budgets=[])
    return dataclasses.replace(cfg, exits=exits)


# ---------------------------------------------------------------- choice


def pareto_front(points: list[dict]) -> list[int]:
    """Depths no other candidate beats in both cost and KL (ties: the cheaper one), by cost."""
    front, best = [], math.inf
    for point in sorted(points, key=lambda p: (p["relative_cost"], p["kl_to_full"])):
        if point["kl_to_full"] < best:
            front.append(point["depth"])
            best = point["kl_to_full"]
    return front


def served_kl(kept: list[dict], start: float, floor_kl: float) -> float:
    """Mean KL over budgets b spread evenly on [start, 1): the deepest kept exit with cost <= b serves b;
    a budget below every kept exit gets `floor_kl`."""
    kept = sorted(kept, key=lambda p: p["relative_cost"])
    costs = [p["relative_cost"] for p in kept]
    levels = [(0.0, costs[0], floor_kl)] + [(cost, after, p["kl_to_full"])
                                             for cost, after, p in zip(costs, costs[1:] + [1.0], kept)]
    area = sum(max(0.0, min(b, 1.0) - max(a, start)) * kl for a, b, kl in levels)
    return area / (1.0 - start)


def choose_count(points: list[dict], count: int, floor_kl: float) -> list[int]:
    """The `count` depths with the lowest served_kl, exactly: best[j][i] is the least area over
    [start, cost_i) with j kept exits, the last of them candidate i."""
    if count > len(points):
        raise ConfigError(f"exits.count: {count} is more than the {len(points)} candidates; lower it or widen the search")
    points = sorted(points, key=lambda p: (p["relative_cost"], p["depth"]))
    cost = [p["relative_cost"] for p in points]
    kl = [p["kl_to_full"] for p in points]
    start, n = cost[0], len(points)
    best = [[(cost[i] - start) * floor_kl for i in range(n)]]
    before: list[list[int]] = [[-1] * n]
    for _ in range(1, count):
        row, back = [math.inf] * n, [-1] * n
        for i in range(n):
            for h in range(i):
                value = best[-1][h] + (cost[i] - cost[h]) * kl[h]
                if value < row[i]:
                    row[i], back[i] = value, h
        best.append(row)
        before.append(back)
    totals = [best[-1][i] + (1.0 - cost[i]) * kl[i] for i in range(n)]
    last = min(range(n), key=lambda i: totals[i])
    chosen = []
    for j in range(count - 1, -1, -1):
        chosen.append(points[last]["depth"])
        last = before[j][last]
    return sorted(chosen)


def choose_budgets(points: list[dict], budgets: list[float]) -> list[int]:
    """For each budget, the candidate with the lowest KL among those that cost no more (ties: the cheaper)."""
    chosen = set()
    for budget in budgets:
        fitting = [p for p in points if p["relative_cost"] <= budget]
        if not fitting:
            cheapest = min(points, key=lambda p: p["relative_cost"])
            raise ConfigError(f"exits.budgets: {budget} is below the cheapest candidate's cost "
                              f"{cheapest['relative_cost']:.3f} (depth {cheapest['depth']})")
        chosen.add(min(fitting, key=lambda p: (p["kl_to_full"], p["relative_cost"]))["depth"])
    return sorted(chosen)


def choose(cfg: Config, points: list[dict], floor_kl: float) -> list[int]:
    """exits.count or exits.budgets, whichever the config gives."""
    if cfg.exits.count:
        return choose_count(points, cfg.exits.count, floor_kl)
    return choose_budgets(points, cfg.exits.budgets)


def score_candidates(cfg: Config, backbone, fingerprint: str, device: torch.device) -> dict:
    """Every candidate's held-out KL to the full model, top-1 agreement and perplexity, beside the full
    model and the logit lens at the shallowest candidate depth, with relative costs (search.cost)."""
    model = BalconyModel.from_pretrained(backbone, SEARCH_EXITS.dir(cfg) / CANDIDATES, fingerprint).to(device).eval()
    sequences = heldout_sequences(cfg, TOKENIZE.dir(cfg), max(1, cfg.search.heldout_tokens // cfg.data.seq_len))
    first = model.depths[0]
    variants = [v for v in variants_of(model, []) if v.kind != "logit_lens" or v.depth == first]
    rows = score(model, [], variants, sequences, cfg.eval, device, f"{SEARCH_EXITS.name} quality")
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
        try:
            line = CostLine.fit([n for *_, n in measured], [seconds for _, seconds, _ in measured], model.num_layers)
        except ValueError as e:
            raise InputError(f"search.cost: {e} (a busy machine?); measure again or set search.cost layers") from None
        for row, n in zip(rows, layers):
            row["relative_cost"] = line.relative_cost(n)
        print(f"{SEARCH_EXITS.name}: decode cost {line.describe()}")
    return {"num_layers": model.num_layers, "heldout_tokens": sequences.numel(),
            "train_tokens": search_steps(cfg) * cfg.train.tokens_per_step, "loss_positions": cfg.search.loss_positions,
            "cost": cfg.search.cost, "cost_line": line.summary() if line else None, "device": device.type, "rows": rows}


def choose_depths(cfg: Config, out: Path, header: dict) -> None:
    """RUN/search/result.json for this config's exits.count / exits.budgets (chosen from scores.json)."""
    asked = choice_settings(cfg)
    if (out / RESULT).exists():
        result = json.loads((out / RESULT).read_text())
        if all(result.get(key) == value for key, value in asked.items()):
            print(f"{SEARCH_EXITS.name}: {out / RESULT} exists for these settings (exits {result['chosen']}); nothing to do")
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
    with stage_run(cfg, SEARCH_EXITS.tag, header["candidates_hash"], label="choice") as tracker:
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
    print(f"{SEARCH_EXITS.name}: exits {chosen} -> {out / RESULT}")
