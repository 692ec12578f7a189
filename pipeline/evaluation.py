"""Quality and speed of every exit against the full model, and of the baselines at the same depths.

Variants scored on held-out sequences, all from one backbone pass per batch:
- `full`: the backbone itself (cost 1);
- `exit@k`: the Balcony exits (layers[:k] + exit layer + exit norm + head; cost (k+1)/L);
- `lens@k`: the logit lens (the backbone's final norm + head on the hidden state after k layers;
  cost k/L): what the exit layer buys over no exit layer at all;
- baselines trained by the same stage on the same data, when `eval.baselines` names them:
  `tuned@k`, the tuned lens (an affine map into the final norm and head; cost k/L), and `ce@k`,
  exits trained on next-token cross-entropy instead of KL (EE-Tuning; cost (k+1)/L).

Metrics per variant: perplexity on the next token, KL(full || variant) per token over the full
vocabulary, and top-1 agreement with the full model; all computed chunk by chunk.
"""
from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.balcony import BalconyModel
from pipeline.losses import kl_from_logprobs, next_token_labels
from pipeline.shards import atomic_write


@dataclass
class Variant:
    name: str
    kind: str  # full | balcony | logit_lens | ce_exit
    depth: int
    cost: float
    sums: dict[str, float] = field(default_factory=lambda: {"nll": 0.0, "kl": 0.0, "agree": 0.0})
    counts: dict[str, int] = field(default_factory=lambda: {"nll": 0, "kl": 0})

    def metrics(self) -> dict[str, float]:
        return {"perplexity": float(torch.tensor(self.sums["nll"] / self.counts["nll"]).exp()),
                "kl_to_full": self.sums["kl"] / self.counts["kl"],
                "top1_agreement": self.sums["agree"] / self.counts["kl"]}


BASELINE_KINDS = {"tuned_lens": ("tuned", 0), "ce_exit": ("ce", 1)}  # kind: (name prefix, layers beyond depth k)


def baseline_kind(baseline: BalconyModel) -> str:
    """What exported exits are, from their balcony_config.json: a tuned lens, or CE-trained exits."""
    if baseline.kind == "tuned_lens":
        return "tuned_lens"
    if baseline.meta.get("objective") == "ce":
        return "ce_exit"
    raise ValueError("eval.baselines: only a tuned lens (exits.kind=tuned_lens) or CE-trained exits "
                     f"(train.objective=ce) are baselines; got {baseline.kind} exits trained on {baseline.meta.get('objective')}")


def variants_of(model: BalconyModel, baselines: list[BalconyModel]) -> list[Variant]:
    layers = model.num_layers
    out = [Variant("full", "full", layers, 1.0)]
    out += [Variant(f"exit@{k}", "balcony", k, (k + 1) / layers) for k in model.depths]
    out += [Variant(f"lens@{k}", "logit_lens", k, k / layers) for k in model.depths]
    for baseline in baselines:
        kind = baseline_kind(baseline)
        prefix, extra = BASELINE_KINDS[kind]
        out += [Variant(f"{prefix}@{k}", kind, k, (k + extra) / layers) for k in baseline.depths]
    return out


@torch.no_grad()
def score_batch(model: BalconyModel, baselines: list[BalconyModel], variants: list[Variant],
                input_ids: torch.Tensor, chunk: int) -> None:
    """Add one batch [B, T] to every variant's sums."""
    taps: dict[int, torch.Tensor] = {}
    exits, final = model(input_ids, full=True, taps=taps)
    n = input_ids.numel()
    labels = next_token_labels(input_ids)
    norm, head = model.decoder.norm, model.logits
    hidden = {"full": final}
    hidden.update({f"exit@{k}": h for k, h in exits.items()})
    hidden.update({f"lens@{k}": norm(h) for k, h in taps.items()})
    for baseline in baselines:
        prefix = BASELINE_KINDS[baseline_kind(baseline)][0]
        hidden.update({f"{prefix}@{k}": h for k, h in baseline(input_ids)[0].items()})
    flat = {name: h.reshape(n, -1) for name, h in hidden.items()}
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        full_logprobs = head(flat["full"][start:stop]).float().log_softmax(-1)
        full_top1 = full_logprobs.argmax(-1)
        chunk_labels = labels[start:stop]
        known = chunk_labels != -100
        for variant in variants:
            logprobs = head(flat[variant.name][start:stop]).float().log_softmax(-1)
            nll = -logprobs[known].gather(-1, chunk_labels[known].unsqueeze(-1))
            variant.sums["nll"] += float(nll.sum())
            variant.counts["nll"] += int(known.sum())
            variant.sums["kl"] += float(kl_from_logprobs(full_logprobs, logprobs).sum())
            variant.sums["agree"] += float((logprobs.argmax(-1) == full_top1).sum())
            variant.counts["kl"] += stop - start


def decode_latency(model: BalconyModel, depth: int | None, prompt: torch.Tensor, new_tokens: int,
                   repeats: int) -> float:
    """Seconds per generated token after the prompt: (t(N) - t(1)) / (N - 1), medians, warm-up excluded."""
    def run(tokens: int) -> float:
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), exit=depth, max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=model.backbone.config.eos_token_id)
        if prompt.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(new_tokens)  # warm-up: allocations, kernels
    full = statistics.median(run(new_tokens) for _ in range(repeats))
    first = statistics.median(run(1) for _ in range(repeats))
    return max(full - first, 1e-9) / (new_tokens - 1)


def speculative_speedup(model: BalconyModel, depth: int, prompt: torch.Tensor, new_tokens: int, draft_tokens: int,
                        repeats: int) -> dict[str, float]:
    """Self-speculative greedy decoding with exit `depth` vs plain greedy full-depth decoding."""
    from pipeline.speculative import speculative_generate

    eos = model.backbone.config.eos_token_id
    stats = {}

    def speculative():
        stats["last"] = speculative_generate(model, prompt, depth, new_tokens, draft_tokens, eos)[1]

    def greedy():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=eos)

    def seconds(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    speculative(), greedy()  # warm-up
    spec = statistics.median(seconds(speculative) for _ in range(repeats))
    full = statistics.median(seconds(greedy) for _ in range(repeats))
    return {"acceptance_rate": stats["last"].acceptance_rate, "speedup": full / spec, "draft_tokens": draft_tokens}


def markdown_table(rows: list[dict], batches: list[int]) -> str:
    """One line per variant; an exit's line also shows the logit lens at its depth (the no-training
    baseline). Speed columns only when speed was measured (`batches`)."""
    lens = {r["depth"]: r for r in rows if r["kind"] == "logit_lens"}
    head = ["variant", "relative cost", "perplexity", "KL to full", "top-1 agreement", "logit lens here: KL, top-1"]
    if batches:
        head += [f"speedup b={b}" for b in batches] + ["ideal speedup", "self-speculative (acceptance, speedup)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        base = lens.get(row["depth"]) if row["kind"] == "balcony" else None
        cells = [row["name"], f"{row['relative_cost']:.3f}", f"{row['perplexity']:.2f}", f"{row['kl_to_full']:.4f}",
                 f"{row['top1_agreement']:.3f}", f"{base['kl_to_full']:.4f}, {base['top1_agreement']:.3f}" if base else "-"]
        if batches:
            spec = row.get("speculative")
            cells += [f"{row['speedup'][str(b)]:.2f}x" if str(b) in row.get("speedup", {}) else "-" for b in batches]
            cells += [f"{row['ideal_speedup']:.2f}x" if "ideal_speedup" in row else "-",
                      f"{spec['acceptance_rate']:.2f}, {spec['speedup']:.2f}x" if spec else "-"]
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
