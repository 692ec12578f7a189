"""The evaluate stage's table and plot of every variant's rows (metrics.json's `rows`)."""
from __future__ import annotations

import io
from pathlib import Path

from pipeline.shards import atomic_write


def markdown_table(rows: list[dict], batches: list[int]) -> str:
    """One line per variant; an exit's line also shows the logit lens at its depth (the no-training
    baseline). Speed columns only when speed was measured (`batches`)."""
    lens = {r["depth"]: r for r in rows if r["kind"] == "logit_lens"}
    head = ["variant", "relative cost", "perplexity", "KL to full", "top-1 agreement", "logit lens here: KL, top-1"]
    if batches:
        head += [f"speedup b={b}" for b in batches] + ["ideal speedup", "self-speculative (acceptance, speedup)",
                                                       "HF assisted, exit as draft model (acceptance, speedup)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        base = lens.get(row["depth"]) if row["kind"] == "balcony" else None
        cells = [row["name"], f"{row['relative_cost']:.3f}", f"{row['perplexity']:.2f}", f"{row['kl_to_full']:.4f}",
                 f"{row['top1_agreement']:.3f}", f"{base['kl_to_full']:.4f}, {base['top1_agreement']:.3f}" if base else "-"]
        if batches:
            cells += [f"{row['speedup'][str(b)]:.2f}x" if str(b) in row.get("speedup", {}) else "-" for b in batches]
            cells += [f"{row['ideal_speedup']:.2f}x" if "ideal_speedup" in row else "-"]
            cells += [f"{row[key]['acceptance_rate']:.2f}, {row[key]['speedup']:.2f}x" if key in row else "-"
                      for key in ("speculative", "assisted")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(Path(path), png.getvalue())
