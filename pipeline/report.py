"""Tables and plots: the evaluate stage's (every variant's rows of metrics.json) and the search-exits
stage's (every candidate, the Pareto front and the chosen exits)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline.shards import atomic_write
from pipeline.timing import CostLine


def markdown_table(rows: list[dict], batches: list[int]) -> str:
    """One line per variant; an exit's line also shows the logit lens at its depth (the no-training
    baseline). Speed columns only when speed was measured (`batches`)."""
    lens = {r["depth"]: r for r in rows if r["kind"] == "logit_lens"}
    head = ["variant", "relative cost", "perplexity", "KL to full", "top-1 agreement", "logit lens here: KL, top-1"]
    if batches:
        head += [f"speedup b={b}" for b in batches] + ["ideal speedup", "HF assisted, exit as draft model (acceptance, speedup)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        base = lens.get(row["depth"]) if row["kind"] == "balcony" else None
        cells = [row["name"], f"{row['relative_cost']:.3f}", f"{row['perplexity']:.2f}", f"{row['kl_to_full']:.4f}",
                 f"{row['top1_agreement']:.3f}", f"{base['kl_to_full']:.4f}, {base['top1_agreement']:.3f}" if base else "-"]
        if batches:
            cells += [f"{row['speedup'][str(b)]:.2f}x" if str(b) in row.get("speedup", {}) else "-" for b in batches]
            cells += [f"{row['ideal_speedup']:.2f}x" if "ideal_speedup" in row else "-"]
            cells += [f"{row['assisted']['acceptance_rate']:.2f}, {row['assisted']['speedup']:.2f}x" if "assisted" in row else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speculative_table(speculative: dict) -> str:
    """Self-speculative decoding: per exit, fixed and confidence-stopped drafts, greedy at each batch size
    and sampled, with what papers report (tokens per round, acceptance, draft length) and the speedup
    measured (its spread over batches of prompts) beside the one the cost model predicts for those rounds."""
    chosen_on = "the same prompts" if speculative["selection_is_measured"] else f"{speculative['selection_prompts']} other prompts"
    lines = [f"Self-speculative decoding: {speculative['prompts']} held-out prompts of {speculative['prompt_tokens']} "
             f"tokens, {speculative['new_tokens']} new tokens each, against plain decoding of the same batches at the "
             f"same settings (sampled: temperature {speculative['sampling_temperature']:g}); confidence-stopped drafts "
             f"chosen on {chosen_on}. Speedup: all batches' time together (slowest-fastest batch); predicted: the cost "
             "model on the rounds run.", "",
             "| exit | decoding | drafts (max, tau) | batch | tokens per round | acceptance | drafts per round | "
             "speedup (spread) | predicted |", "|---|---|---|---|---|---|---|---|---|"]
    for depth, entry in speculative["exits"].items():
        for row in entry["measurements"]:
            predicted = f"{row['predicted_speedup']:.2f}x" if "predicted_speedup" in row else "-"
            lines.append(f"| exit@{depth} | {row['decoding']} | {row['drafts']} ({row['max_draft']}, {row['tau']:g}) | "
                         f"{row['batch']} | {row['tokens_per_round']:.2f} | {row['acceptance_rate']:.2f} | "
                         f"{row['draft_length']:.2f} | {row['speedup']:.2f}x ({row['speedup_min']:.2f}-"
                         f"{row['speedup_max']:.2f}) | {predicted} |")
    lines.append("")
    for depth, entry in speculative["exits"].items():
        if "break_even_acceptance" in entry["policy"]:
            even = entry["policy"]["break_even_acceptance"]
            lines.append(f"- exit@{depth}: by the cost model at batch 1 on this machine, drafts pay "
                         + (f"once at least {even:.2f} of them are kept" if even is not None else
                            "at no acceptance (even drafts that are always kept cost more than they save)") + ".")
    return "\n".join(lines) + "\n"


def speculative_metrics(speculative: dict, depths: list[int]) -> dict[str, float]:
    """Per exit, self-speculative decoding as the evaluation chose it (confidence-stopped drafts, greedy, batch 1):
    exit1_spec_speedup and exit1_spec_acceptance. The UI's compare page renders the first rows of its metric
    table only, so the other measurements (tokens per round, drafts per round, batches, fixed drafts,
    sampling) stay in metrics.json and table.md, logged as artifacts."""
    out = {}
    for i, depth in enumerate(sorted(depths), 1):
        for row in speculative["exits"][str(depth)]["measurements"]:
            if (row["decoding"], row["drafts"], row["batch"]) == ("greedy", "confident", 1):
                out.update({f"exit{i}_spec_speedup": row["speedup"], f"exit{i}_spec_acceptance": row["acceptance_rate"]})
    return out


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """The held-out rows' metrics, then each eval.data set's quality metrics prefixed `data1_`, ..."""
    out = row_metrics(metrics["rows"])
    out.update({f"decode_fixed_share_b{batch}": line["fixed_share"] for batch, line in (metrics.get("cost_line") or {}).items() if line})
    if metrics.get("speculative"):
        out.update(speculative_metrics(metrics["speculative"], metrics["depths"]))
    for i, other in enumerate(metrics.get("other_data", []), 1):
        out.update({f"data{i}_{name}": value for name, value in row_metrics(other["rows"]).items()})
    return out


def row_metrics(rows: list[dict]) -> dict[str, float]:
    """Names by exit ordinal (exit1 = shallowest), so runs with other depths line up in the UI."""
    kinds = {"balcony": "exit", "logit_lens": "lens", "tuned_lens": "tuned", "ce_exit": "ce"}
    prefixes = {}
    for kind, short in kinds.items():
        depths = sorted(row["depth"] for row in rows if row["kind"] == kind)
        prefixes.update({(kind, d): f"{short}{i}" for i, d in enumerate(depths, 1)})
    out = {}
    for row in rows:
        prefix = "full" if row["kind"] == "full" else prefixes[(row["kind"], row["depth"])]
        out.update({f"{prefix}_depth": row["depth"], f"{prefix}_relative_cost": row["relative_cost"],
                    f"{prefix}_perplexity": row["perplexity"], f"{prefix}_kl": row["kl_to_full"],
                    f"{prefix}_top1": row["top1_agreement"]})
        for batch, value in row.get("speedup", {}).items():
            out[f"{prefix}_speedup_b{batch}"] = value
            out[f"{prefix}_latency_ms_b{batch}"] = row["latency_ms"][batch]
        if "assisted" in row:
            out[f"{prefix}_assisted_acceptance"] = row["assisted"]["acceptance_rate"]
            out[f"{prefix}_assisted_speedup"] = row["assisted"]["speedup"]
    return out


def write_evaluation(out: Path, metrics: dict, batches: list[int]) -> None:
    """RUN/eval: table.md, plot.png, then metrics.json (the mark of completion), each written atomically."""
    text = f"Held-out tokens of this run ({metrics['heldout_tokens']:,} tokens):\n\n" + markdown_table(metrics["rows"], batches)
    for batch, line in (metrics.get("cost_line") or {}).items():
        text += f"\nDecode cost at batch {batch}, fitted on the latencies above: " + (
            CostLine.from_summary(line).describe() if line else "no line (the latencies do not grow with depth)") + ".\n"
    if metrics.get("speculative"):
        choice = metrics["speculative_choice"]
        text += "\n" + speculative_table(metrics["speculative"]) + (
            f"\nBalconyModel.generate(speculative=True) uses exit {choice['depth']} with drafts of at most "
            f"{choice['max_draft']} while the exit's top-1 probability is at least {choice['tau']:g} (measured "
            f"{choice['speedup']:.2f}x, greedy, batch 1).\n")
    for other in metrics["other_data"]:
        text += f"\nQuality on {other['data']} ({other['tokens']:,} tokens):\n\n" + markdown_table(other["rows"], [])
    atomic_write(out / "table.md", text.encode())
    plot(metrics["rows"], out / "plot.png")
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=1).encode())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    """The figure as a PNG file, written atomically; the figure is closed."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    _pyplot().close(fig)
    atomic_write(Path(path), png.getvalue())


def plot(rows: list[dict], path) -> None:
    plt = _pyplot()

    fig, (kl_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"balcony": ("Balcony exits", "o-", "tab:blue"), "logit_lens": ("logit lens", "s--", "tab:gray"),
              "tuned_lens": ("tuned lens", "D:", "tab:green"), "ce_exit": ("CE-trained exits", "^-.", "tab:orange"),
              "full": ("full model", "*", "tab:red")}
    for kind, (label, style, color) in styles.items():
        chosen = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["relative_cost"])
        if not chosen:
            continue
        x = [r["relative_cost"] for r in chosen]
        if kind != "full":  # the full model's KL to itself is 0: no point on a log axis
            kl_ax.plot(x, [r["kl_to_full"] for r in chosen], style, color=color, label=label, markersize=9)
        ppl_ax.plot(x, [r["perplexity"] for r in chosen], style, color=color, label=label, markersize=9)
    kl_ax.set(xlabel="relative cost (layers run / L)", ylabel="KL(full || variant), nats/token", yscale="log",
              title="distance to the full model")
    ppl_ax.set(xlabel="relative cost (layers run / L)", ylabel="held-out perplexity", yscale="log",
               title="perplexity")
    for ax in (kl_ax, ppl_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def search_table(scores: dict, result: dict) -> str:
    """One line per candidate (cost, quality, Pareto, kept), then the floor and the full model."""
    front, chosen = set(result["pareto_front"]), set(result["chosen"])
    cost = "measured decode latency, fitted" if scores["cost"] == "measured" else "layers run / L"
    lines = [f"Candidates trained on {scores['train_tokens']:,} tokens (loss on {scores['loss_positions']:.0%} of "
             f"positions), scored on {scores['heldout_tokens']:,} held-out tokens; relative cost: {cost}.",
             f"Kept: exits {result['chosen']}; mean KL over budgets {result['budget_range'][0]:.3f}-1, each served by "
             f"the deepest kept exit that fits it: {result['mean_kl_over_budgets']:.4f} (below the kept exits: "
             f"{result['floor']['name']}).", "",
             *([f"Decode cost: {CostLine.from_summary(scores['cost_line']).describe()}.", ""] if scores.get("cost_line") else []),
             "| variant | relative cost | decode ms/token | KL to full | top-1 agreement | perplexity | Pareto | kept |",
             "|---|---|---|---|---|---|---|---|"]
    for row in scores["rows"]:
        candidate = row["kind"] == "balcony"
        latency = f"{row['latency_ms']:.2f}" if "latency_ms" in row else "-"
        lines.append(f"| {row['name']} | {row['relative_cost']:.3f} | {latency} | {row['kl_to_full']:.4f} | "
                     f"{row['top1_agreement']:.3f} | {row['perplexity']:.2f} | "
                     f"{('yes' if row['depth'] in front else 'no') if candidate else '-'} | "
                     f"{('**yes**' if row['depth'] in chosen else '') if candidate else '-'} |")
    return "\n".join(lines) + "\n"


def search_plot(scores: dict, result: dict, path) -> None:
    """KL and top-1 agreement against relative cost: every candidate, the Pareto front, the kept exits."""
    plt = _pyplot()
    fig, (kl_ax, top1_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    points = sorted((r for r in scores["rows"] if r["kind"] == "balcony"), key=lambda r: r["relative_cost"])
    front = [r for r in points if r["depth"] in result["pareto_front"]]
    kept = [r for r in points if r["depth"] in result["chosen"]]
    floor = next(r for r in scores["rows"] if r["kind"] == "logit_lens")
    for ax, key in ((kl_ax, "kl_to_full"), (top1_ax, "top1_agreement")):
        ax.plot([r["relative_cost"] for r in points], [r[key] for r in points], "o", color="tab:blue",
                label="candidate exits")
        ax.plot([r["relative_cost"] for r in front], [r[key] for r in front], "-", color="tab:blue", alpha=0.5,
                label="Pareto front (KL)")
        ax.plot([r["relative_cost"] for r in kept], [r[key] for r in kept], "o", markersize=14, markerfacecolor="none",
                markeredgecolor="tab:red", markeredgewidth=2, label=f"kept: {result['chosen']}")
        ax.plot([floor["relative_cost"]], [floor[key]], "s", color="tab:gray", label=floor["name"])
        for r in points:
            ax.annotate(str(r["depth"]), (r["relative_cost"], r[key]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    kl_ax.set(xlabel="relative cost", ylabel="KL(full || exit), nats/token", yscale="log",
              title="candidate exits: distance to the full model")
    top1_ax.set(xlabel="relative cost", ylabel="top-1 agreement with the full model", title="top-1 agreement")
    fig.tight_layout()
    _save(fig, path)
