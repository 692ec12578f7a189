"""How fast self-speculative decoding is, per exit: measured over several held-out prompts at several
batch sizes, for fixed drafts and for confidence-stopped ones; predicted from the decode cost lines
(pipeline/timing.py) and the rounds actually run; and the draft policy (tau, max_draft) chosen.

The choice: on selection prompts (held-out sequences other than the measured ones) the full model's
greedy continuation is computed once and every exit scored on it in one pass (teacher forcing on the
model's own output). Greedy rounds of any policy are then replayed exactly on those scores (the drafts
a round keeps are the exit's argmaxes while they match the continuation) except for how long a round
goes on drafting after its first wrong draft, which reads the exit's confidence on the true prefix,
not on the wrong draft. Each policy's replayed rounds are priced by the cost lines, and the fastest
predicted is measured. Timing every policy instead would cost minutes per exit on a small machine.

The cost model of a round over `rows` sequences: each exit evaluation costs a decode step of k+1
layers at `rows` rows; the last draft's prefix pass k layers; the verification L-k layers and the head
over rows x (drafts + 1) positions. A decode step's cost at n rows comes from the cost lines fitted at
the measured batch sizes, linear in n between them and beyond the largest (the head and layers at n
rows of one position are the same matmuls as one row of n positions; attention is not, and is small
at these lengths). Plain decoding is a full-depth step at `rows` rows per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.balcony import BalconyModel
from pipeline.config import EvalConfig
from pipeline.speculative import DraftPolicy, Sampling, SpeculativeStats, speculative_generate
from pipeline.timing import CostLine, hf_generate, projected_speculative_speedup, timed


@dataclass(frozen=True)
class StepCost:
    """Seconds of a decode step of `layers` layers over n rows (or positions), from cost lines at measured
    batch sizes: fixed and per-layer parts each linear in n between two measured sizes, extended beyond."""

    lines: dict[int, CostLine]

    def seconds(self, rows: int, layers: int) -> float:
        sizes = sorted(self.lines)
        if len(sizes) == 1:
            return self.lines[sizes[0]].seconds(layers) * rows / sizes[0]
        low = max([s for s in sizes[:-1] if s <= rows] or [sizes[0]])
        high = sizes[sizes.index(low) + 1]
        share = (rows - low) / (high - low)
        a, b = self.lines[low].seconds(layers), self.lines[high].seconds(layers)
        return max(a + share * (b - a), 1e-12)

    def round_seconds(self, rounds: list[tuple[int, int, int, bool]], depth: int, layers: int) -> float:
        """Seconds of the rounds (rows, exit evaluations, drafts verified, last-draft prefix pass) by the model above."""
        total = 0.0
        for rows, steps, drafts, prefix_pass in rounds:
            total += steps * self.seconds(rows, depth + 1) + self.seconds(rows * (drafts + 1), layers - depth)
            if prefix_pass:  # k layers without the head: a step's per-layer part only
                total += self.seconds(rows, depth) - self.seconds(rows, 0)
        return total


def break_even_acceptance(cost: StepCost, depth: int, layers: int, drafts=range(1, 9)) -> float | None:
    """The lowest acceptance (per draft, independent) at which drafts of some length in `drafts` decode faster
    than plain decoding at batch 1 by the cost model; None when even drafts that are always kept do not."""
    step = cost.seconds(1, layers)
    prefix = cost.seconds(1, depth) - cost.seconds(1, 0)

    def best(acceptance: float) -> float:
        return max(projected_speculative_speedup(acceptance, n, cost.seconds(1, depth + 1) / step,
                                                 (cost.seconds(n + 1, layers - depth) + prefix) / step) for n in drafts)

    grid = [i / 100 for i in range(101)]
    return next((a for a in grid if best(a) >= 1), None)


def replay(exit_argmax: list[int], confidence: list[float], sequence: list[int], start: int, new_tokens: int,
           policy: DraftPolicy) -> list[tuple[int, int, int, bool]]:
    """The rounds (1 row, exit evaluations, drafts, prefix pass) of greedy speculative decoding with `policy`
    that generate sequence[start:start + new_tokens] (the full model's greedy continuation), from the
    exit's argmax and top-1 probability after each position of `sequence` (teacher-forced)."""
    rounds, at, made = [], start, 1  # the first token comes from the prefill
    while made < new_tokens:
        most, steps, proposed, accepted, wrong = min(policy.max_draft, new_tokens - made - 1), 0, 0, 0, False
        while proposed < most:
            steps += 1
            if confidence[at - 1 + proposed] < policy.tau:
                break
            wrong = wrong or exit_argmax[at - 1 + proposed] != sequence[at + proposed]
            accepted += not wrong
            proposed += 1
        rounds.append((1, steps, proposed, proposed == most))
        at, made = at + accepted + 1, made + accepted + 1
    return rounds


@torch.no_grad()
def teacher_forced_exit(model: BalconyModel, depth: int, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exit's argmax and top-1 probability after every position of [B, T] sequences."""
    exits, _ = model(sequences)
    probs = torch.softmax(model.logits(exits[depth]).float(), -1)
    top = probs.max(-1)
    return top.indices, top.values


def choose_policy(model: BalconyModel, depth: int, prompts: torch.Tensor, continuations: torch.Tensor,
                  settings: EvalConfig, cost: StepCost) -> dict:
    """The (tau, max_draft) of settings' grid with the best predicted speedup on the selection prompts."""
    sequences = torch.cat([prompts, continuations], 1)
    argmax, confidence = teacher_forced_exit(model, depth, sequences)
    start, new = prompts.shape[1], continuations.shape[1]
    plain = new * cost.seconds(1, model.num_layers) * len(sequences)
    best = None
    for tau in settings.draft_taus:
        for max_draft in settings.max_drafts:
            policy = DraftPolicy(max_draft, tau)
            rounds = [r for i in range(len(sequences)) for r in
                      replay(argmax[i].tolist(), confidence[i].tolist(), sequences[i].tolist(), start, new, policy)]
            speedup = plain / (cost.round_seconds(rounds, depth, model.num_layers) + len(sequences) * cost.seconds(1, model.num_layers))
            if best is None or speedup > best["predicted_speedup"]:
                best = {"max_draft": max_draft, "tau": tau, "predicted_speedup": speedup}
    return best


def plain_generate(model: BalconyModel, prompts: torch.Tensor, new_tokens: int, sampling: Sampling) -> torch.Tensor:
    """HF generate at full depth: exactly `new_tokens` tokens, greedy or with the same sampling settings."""
    extra = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p) if sampling.do_sample else {}
    return hf_generate(model, prompts, new_tokens, min_new_tokens=new_tokens, do_sample=sampling.do_sample, **extra)


def measure(model: BalconyModel, depth: int, prompts: torch.Tensor, settings: EvalConfig, policy: DraftPolicy,
            sampling: Sampling, batch_size: int, plain_seconds: list[float], cost: StepCost | None) -> dict:
    """Self-speculative decoding of every prompt, `batch_size` at a time, against plain decoding of the same
    batches (`plain_seconds`, one per batch): rounds, acceptance, speedup (all batches' time together),
    its spread over batches and, with a cost model, the speedup it predicts for the rounds run."""
    stats, seconds, predicted_spec = SpeculativeStats(), [], 0.0
    generator = torch.Generator(device=prompts.device).manual_seed(0)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        elapsed, (_, run) = timed(lambda: speculative_generate(model, batch, depth, settings.new_tokens, policy, sampling,
                                                                generator=generator))
        seconds.append(elapsed)
        stats.merge(run)
        if cost is not None:
            predicted_spec += cost.round_seconds(run.trace, depth, model.num_layers) + cost.seconds(len(batch), model.num_layers)
    speedups = [p / s for p, s in zip(plain_seconds, seconds)]
    out = {"decoding": "sampled" if sampling.do_sample else "greedy", "batch": batch_size, "max_draft": policy.max_draft,
           "tau": policy.tau, **stats.summary(), "speedup": sum(plain_seconds) / sum(seconds),
           "speedup_min": min(speedups), "speedup_max": max(speedups), "batches": len(seconds)}
    if cost is not None:
        plain = sum(settings.new_tokens * cost.seconds(len(prompts[s:s + batch_size]), model.num_layers)
                    for s in range(0, len(prompts), batch_size))
        out["predicted_speedup"] = plain / predicted_spec
    return out


def measure_speculative(model: BalconyModel, settings: EvalConfig, sequences: torch.Tensor,
                        lines: dict[str, dict | None]) -> dict:
    """Per exit: the chosen confidence policy, and measurements (fixed and confidence-stopped drafts, greedy at
    every settings.speculative_batches size, sampled at batch 1). Returns {"prompts", "exits": {depth: ...}}."""
    count, length = settings.speculative_prompts, settings.prompt_tokens
    measured = sequences[:count, :length]
    selection = sequences[count:2 * count, :length] if len(sequences) >= 2 * count else measured
    fitted = {int(b): CostLine.from_summary(line) for b, line in lines.items() if line}
    cost = StepCost(fitted) if fitted else None
    greedy, sampled = Sampling(), Sampling(do_sample=True, temperature=settings.sampling_temperature)
    plain_generate(model, measured[:1], 2, greedy)  # warm-up
    plain = {}  # (sampling, batch size) -> seconds per batch of plain decoding
    for sampling, batches in ((greedy, settings.speculative_batches), (sampled, [1])):
        for b in batches:
            plain[(sampling, b)] = [timed(lambda: plain_generate(model, measured[s:s + b], settings.new_tokens, sampling))[0]
                                    for s in range(0, len(measured), b)]
    continuations = plain_generate(model, selection, settings.new_tokens, greedy)[:, length:]
    out = {}
    for depth in model.depths:
        fixed = DraftPolicy(settings.draft_tokens)
        chosen = (choose_policy(model, depth, selection, continuations, settings, cost) if cost else
                  {"max_draft": settings.draft_tokens, "tau": settings.draft_taus[0], "predicted_speedup": None})
        if cost:
            chosen["break_even_acceptance"] = break_even_acceptance(cost, depth, model.num_layers)
        confident = DraftPolicy(chosen["max_draft"], chosen["tau"])
        speculative_generate(model, measured[:1], depth, 4, confident)  # warm-up
        rows = [measure(model, depth, measured, settings, policy, sampling, b, plain[(sampling, b)], cost) | {"drafts": name}
                for sampling, batches in ((greedy, settings.speculative_batches), (sampled, [1]))
                for b in batches for name, policy in (("fixed", fixed), ("confident", confident))]
        out[str(depth)] = {"policy": chosen, "measurements": rows}
        for row in rows:
            print(f"evaluate: self-speculative exit@{depth} {row['decoding']} {row['drafts']} (max {row['max_draft']}, "
                  f"tau {row['tau']}) batch {row['batch']}: {row['tokens_per_round']:.2f} tokens/round, acceptance "
                  f"{row['acceptance_rate']:.2f}, {row['draft_length']:.2f} drafts/round, speedup {row['speedup']:.2f}x "
                  f"({row['speedup_min']:.2f}-{row['speedup_max']:.2f})"
                  + (f", predicted {row['predicted_speedup']:.2f}x" if "predicted_speedup" in row else ""))
    return {"prompts": len(measured), "selection_prompts": len(selection), "selection_is_measured": selection is measured,
            "prompt_tokens": length,
            "new_tokens": settings.new_tokens, "sampling_temperature": settings.sampling_temperature, "exits": out}


def best_choice(speculative: dict) -> dict:
    """The exit and confidence policy with the best measured greedy speedup at batch 1: what
    BalconyModel.generate(speculative=True) uses unless told otherwise."""
    candidates = [(row["speedup"], int(depth), row) for depth, entry in speculative["exits"].items()
                  for row in entry["measurements"]
                  if row["drafts"] == "confident" and row["decoding"] == "greedy" and row["batch"] == 1]
    speedup, depth, row = max(candidates, key=lambda c: c[0])
    return {"depth": depth, "max_draft": row["max_draft"], "tau": row["tau"], "speedup": speedup}
