"""Does the exit search pay? The demo's fixed exits 14/17/20 against the exits search-exits chooses,
trained on the same total tokens (the search's included), scored by the real evaluate stage on the
same held-out tokens.

    python experiments/exit_search.py        # after `make demo`; runs what is missing, then writes results/exit-search/

1. fixed: runs/demo, as `make demo` left it (131,072 tokens: 256 steps of 512).
2. searched: runs/demo-search, linking runs/demo's tokens and teacher targets, then the real chain
   `stages/run_pipeline.py --config configs/demo.yaml --nproc 1 run.dir=runs/demo-search
   exits.depths=auto exits.count=3 train.baselines=[] eval.speed=false`: search-exits trains 10
   candidates on the epoch's last search.tokens, train-exits the 3 chosen on the rest.
3. compare: held-out KL and top-1 of each exit at its relative cost (the decode-latency line the
   search measured, the same for both sets), and each set's mean KL over budgets
   (pipeline/search.served_kl, the search's own criterion, with the same floor).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from pipeline.report import search_plot, search_table
from pipeline.search import served_kl
from pipeline.timing import CostLine

FIXED, SEARCHED, OUT = ROOT / "runs" / "demo", ROOT / "runs" / "demo-search", ROOT / "results" / "exit-search"
OVERRIDES = [f"run.dir={SEARCHED.relative_to(ROOT)}", "exits.depths=auto", "exits.count=3", "train.baselines=[]",
             "eval.speed=false"]
COMMAND = [sys.executable, "stages/run_pipeline.py", "--config", "configs/demo.yaml", "--nproc", "1", *OVERRIDES]


def run_searched() -> float | None:
    """The searched chain, unless it is complete; its wall seconds when it ran."""
    if (SEARCHED / "eval" / "metrics.json").exists():
        return None
    if not (FIXED / "teacher" / "manifest.json").exists():
        sys.exit(f"error: {FIXED}: no teacher targets; run `make demo` first")
    SEARCHED.mkdir(parents=True, exist_ok=True)
    for stage in ("tokens", "teacher"):  # the same tokens and targets: only the exits differ
        if not (SEARCHED / stage).exists():
            (SEARCHED / stage).symlink_to(FIXED / stage)
    started = time.perf_counter()
    subprocess.run(COMMAND, cwd=ROOT, check=True)
    return time.perf_counter() - started


BUDGETS = [0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def served_at(points: list[dict], budget: float) -> float | None:
    """KL of the deepest exit that fits `budget` (None: none fits)."""
    fitting = [p for p in points if p["relative_cost"] <= budget]
    return max(fitting, key=lambda p: p["relative_cost"])["kl_to_full"] if fitting else None


def exits_of(metrics: dict) -> list[dict]:
    return [row for row in metrics["rows"] if row["kind"] == "balcony"]


def plot_comparison(scores: dict, sets: dict, path: Path) -> None:
    """KL and top-1 against relative cost: the search's candidates, then both trained sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    candidates = [r for r in scores["rows"] if r["kind"] == "balcony"]
    for ax, key, label in ((axes[0], "kl_to_full", "KL(full || exit), nats/token"),
                           (axes[1], "top1_agreement", "top-1 agreement with the full model")):
        ax.plot([r["relative_cost"] for r in candidates], [r[key] for r in candidates], ".", color="tab:gray",
                label=f"search candidates ({scores['train_tokens']:,} tokens)")
        for (name, entry), style in zip(sets.items(), ("o-", "s-")):
            ax.plot([p["relative_cost"] for p in entry["exits"]], [p[key] for p in entry["exits"]], style,
                    label=f"{name} {[p['depth'] for p in entry['exits']]}")
        ax.set(xlabel="relative cost (measured decode latency, fitted)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    seconds = run_searched()
    scores = json.loads((SEARCHED / "search" / "scores.json").read_text())
    result = json.loads((SEARCHED / "search" / "result.json").read_text())
    line = CostLine.from_summary(scores["cost_line"])
    intercept, slope = line.fixed_s, line.per_layer_s
    cost = lambda depth: line.relative_cost(depth + 1)  # noqa: E731
    floor = result["floor"]["kl_to_full"]
    start = result["budget_range"][0]
    sets = {}
    for name, run in (("fixed", FIXED), ("searched", SEARCHED)):
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        points = [{"depth": r["depth"], "relative_cost": cost(r["depth"]), "kl_to_full": r["kl_to_full"],
                   "top1_agreement": r["top1_agreement"], "perplexity": r["perplexity"]} for r in exits_of(metrics)]
        train = json.loads((run / "exits" / "balcony_config.json").read_text())
        sets[name] = {"run": str(run.relative_to(ROOT)), "exits": points, "train_tokens": train["tokens"],
                      "heldout_tokens": metrics["heldout_tokens"],
                      "mean_kl_over_budgets": served_kl(points, start, floor)}
    common = max(min(p["relative_cost"] for p in entry["exits"]) for entry in sets.values())
    for entry in sets.values():  # over the budgets both sets can serve: no floor involved
        entry["mean_kl_over_common_budgets"] = served_kl(entry["exits"], common, floor)
        entry["kl_at_budget"] = {f"{b:.2f}": served_at(entry["exits"], b) for b in BUDGETS}
    sets["searched"]["search_tokens"] = scores["train_tokens"]
    sets["searched"]["search_seconds"] = scores["seconds"]
    summary = {"command": " ".join(["python", "experiments/exit_search.py"]), "searched_chain": " ".join(COMMAND[1:]),
               "searched_chain_seconds": seconds, "latency_line_s": [intercept, slope], "floor": result["floor"],
               "budget_range": [start, 1.0], "common_budget_range": [common, 1.0], "sets": sets}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "compare.json").write_text(json.dumps(summary, indent=1))
    lines = ["Fixed exits (the demo) against the exits search-exits chose, same total tokens, same held-out tokens "
             f"({sets['fixed']['heldout_tokens']:,}). Relative cost: the measured decode-latency line "
             f"({intercept * 1e3:.2f} ms + {slope * 1e3:.3f} ms per layer per token). Mean KL over budgets "
             f"{start:.3f}-1: each budget served by the deepest exit that fits, below them by "
             f"{result['floor']['name']} (KL {floor:.3f}).", "",
             "| exits | tokens (search + exits) | exit: relative cost, KL, top-1, perplexity | mean KL over budgets "
             f"{start:.3f}-1 | mean KL over budgets {common:.3f}-1 (both serve) |",
             "|---|---|---|---|---|"]
    for name, entry in sets.items():
        tokens = (f"{entry['search_tokens']:,} + {entry['train_tokens']:,}" if "search_tokens" in entry
                  else f"{entry['train_tokens']:,}")
        cells = "; ".join(f"{p['depth']}: {p['relative_cost']:.3f}, {p['kl_to_full']:.3f}, {p['top1_agreement']:.3f}, "
                          f"{p['perplexity']:.1f}" for p in entry["exits"])
        lines.append(f"| {name} {[p['depth'] for p in entry['exits']]} | {tokens} | {cells} | "
                     f"{entry['mean_kl_over_budgets']:.4f} | {entry['mean_kl_over_common_budgets']:.4f} |")
    lines += ["", "KL of the deepest exit that fits each budget (-: none fits):", "",
              "| budget | " + " | ".join(f"{b:.2f}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for name, entry in sets.items():
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in entry["kl_at_budget"].values())
                     + " |")
    (OUT / "compare.md").write_text("\n".join(lines) + "\n\nCommand: `python experiments/exit_search.py`\n")
    plot_comparison(scores, sets, OUT / "compare.png")
    (OUT / "search_table.md").write_text(search_table(scores, result))
    search_plot(scores, result, OUT / "search_plot.png")
    for name in ("scores.json", "result.json"):
        shutil.copy(SEARCHED / "search" / name, OUT / name)
    print((OUT / "compare.md").read_text())


if __name__ == "__main__":
    main()
