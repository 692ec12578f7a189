"""Speed of an exit against full depth, measured: decode latency through HF generate() on the exit's
view, the cost line fitted through it, and transformers' assisted generation with the exit as a
separate draft model (what an exported exit is) against plain greedy decoding. Self-speculative
decoding (one KV cache, the verifier runs only the layers after the exit): pipeline/speculative_speed.py."""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from pipeline.balcony import BalconyModel
from pipeline.config import EvalConfig


@dataclass(frozen=True)
class CostLine:
    """Decode seconds per token = fixed + per_layer x layers run: a least-squares line through measured
    latencies (the full model runs every layer, an exit at depth k its k layers and its own). The fixed
    part is what every depth pays: the head, the embedding and the step's overhead. On a model whose
    head is a large share of it (a large vocabulary), exits save far less than their share of layers."""
    fixed_s: float
    per_layer_s: float
    layers: int  # the full model's

    @classmethod
    def fit(cls, layers_run: list[int], seconds: list[float], layers: int) -> "CostLine":
        """Raises ValueError when the latencies do not grow with depth (a busy machine, a timer's noise)."""
        n = len(layers_run)
        mean_x, mean_y = sum(layers_run) / n, sum(seconds) / n
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(layers_run, seconds)) / sum((x - mean_x) ** 2 for x in layers_run)
        fixed = mean_y - slope * mean_x
        if slope <= 0 or fixed + slope * min(layers_run) <= 0:
            raise ValueError(f"measured decode latencies {[f'{s * 1e3:.2f} ms' for s in seconds]} do not grow with depth")
        return cls(fixed, slope, layers)

    @classmethod
    def from_summary(cls, summary: dict) -> "CostLine":
        return cls(summary["fixed_ms"] / 1e3, summary["per_layer_ms"] / 1e3, summary["layers"])

    def seconds(self, layers_run: int) -> float:
        return self.fixed_s + self.per_layer_s * layers_run

    def relative_cost(self, layers_run: int) -> float:
        return self.seconds(layers_run) / self.seconds(self.layers)

    @property
    def fixed_share(self) -> float:
        """The share of a full-depth step that no exit saves."""
        return max(self.fixed_s, 0.0) / self.seconds(self.layers)

    @property
    def speedup_cap(self) -> float | None:
        """No exit decodes faster than this (None: the line leaves no fixed part)."""
        return 1 / self.fixed_share if self.fixed_share else None

    def summary(self) -> dict[str, float]:
        return {"fixed_ms": self.fixed_s * 1e3, "per_layer_ms": self.per_layer_s * 1e3, "layers": self.layers,
                "fixed_share": self.fixed_share, "speedup_cap": self.speedup_cap}

    def describe(self) -> str:
        cap = f"{self.speedup_cap:.2f}x" if self.speedup_cap else "unbounded"
        return (f"{self.fixed_s * 1e3:.2f} ms + {self.per_layer_s * 1e3:.3f} ms per layer per token: the head, embedding "
                f"and step overhead are {self.fixed_share:.0%} of a full-depth step ({self.fixed_s / self.per_layer_s:.1f} "
                f"layers), so no exit decodes more than {cap} faster")


def projected_speculative_speedup(acceptance: float, drafts: int, draft_cost: float, verify_cost: float = 1.0) -> float:
    """Leviathan et al.'s expected speedup of speculative decoding: rounds of `drafts` drafts, each kept with
    probability `acceptance` independently of the others, a draft step costing `draft_cost` and the verification
    `verify_cost` of a full-depth decode step (weight-bound decoding: verifying a few positions reads the weights
    once, so 1). With drafts of 1 it pays exactly when acceptance > draft_cost (at verify_cost 1)."""
    tokens = drafts + 1 if acceptance >= 1 else (1 - acceptance ** (drafts + 1)) / (1 - acceptance)
    return tokens / (drafts * draft_cost + verify_cost)


def timed(fn) -> tuple[float, object]:
    """Wall seconds of fn() (the device's queued work included), and what it returned."""
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, kernels
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def decode_latency(model: BalconyModel, depth: int | None, prompt: torch.Tensor, new_tokens: int,
                   repeats: int) -> float:
    """Seconds per generated token after the prompt: (t(N) - t(1)) / (N - 1), medians, warm-up excluded."""
    def run(tokens: int) -> None:
        hf_generate(model, prompt, tokens, exit=depth, min_new_tokens=tokens)

    full = _median_seconds(lambda: run(new_tokens), repeats)
    first = _median_seconds(lambda: run(1), repeats)
    return max(full - first, 1e-9) / (new_tokens - 1)


def hf_generate(model: BalconyModel, prompt: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """HF generate on unpadded prompts, greedy unless kwargs say do_sample (and the rest of HF's arguments)."""
    kwargs.setdefault("do_sample", False)
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          pad_token_id=model.backbone.config.eos_token_id, **kwargs)


def greedy_seconds(model: BalconyModel, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Plain greedy full-depth decoding of `new_tokens`: what assisted generation is measured against."""
    return _median_seconds(lambda: hf_generate(model, prompt, new_tokens), repeats)


def assisted_speedup(model: BalconyModel, depth: int, prompt: torch.Tensor, new_tokens: int, draft_tokens: int,
                     repeats: int, full_seconds: float) -> dict[str, float]:
    """transformers' assisted generation with exit `depth` as `assistant_model` (drafts of a fixed
    `draft_tokens`) vs plain greedy full-depth decoding (`full_seconds`). The draft keeps its own KV
    cache and the verifier runs every layer, as with an exported exit in any draft-model engine.
    Acceptance: tokens accepted per token drafted, from the verifier's forward count (each one adds
    the accepted drafts and one token of its own)."""
    draft = model.view(depth)
    draft.generation_config = copy.deepcopy(draft.generation_config)  # the view shares the backbone's
    draft.generation_config.update(num_assistant_tokens=draft_tokens, num_assistant_tokens_schedule="constant",
                                   assistant_confidence_threshold=0.0)
    verifications = []  # layers[depth] runs in the full model only: one call per verification
    hook = model.decoder.layers[depth].register_forward_hook(lambda *_: verifications.append(1))
    try:
        out = hf_generate(model, prompt, new_tokens, assistant_model=draft)
        generated, rounds = out.shape[1] - prompt.shape[1], len(verifications)
        assisted = _median_seconds(lambda: hf_generate(model, prompt, new_tokens, assistant_model=draft), repeats)
    finally:
        hook.remove()
    return {"acceptance_rate": (generated - rounds) / (rounds * draft_tokens), "speedup": full_seconds / assisted,
            "draft_tokens": draft_tokens}


def measure_speed(settings: EvalConfig, model: BalconyModel, rows: list[dict], sequences: torch.Tensor) -> dict:
    """Adds to the full model's and each exit's row its decode latency and speedup at each of
    settings.latency_batches, and to each exit's row assisted decoding, all from the first held-out
    sequence's first settings.prompt_tokens as the prompt. Returns the cost line fitted at each batch
    size (None where the latencies do not grow with depth)."""
    latency, batches, lines = {}, settings.latency_batches, {}
    for batch_size in batches:
        prompt = sequences[:1, : settings.prompt_tokens].repeat(batch_size, 1)
        for depth in [None, *model.depths]:
            latency[(batch_size, depth)] = decode_latency(model, depth, prompt, settings.new_tokens, settings.repeats)
        print(f"evaluate: decode latency at batch {batch_size}: " + ", ".join(
            f"{'full' if d is None else f'exit@{d}'} {latency[(batch_size, d)] * 1e3:.1f} ms/token"
            for d in [None, *model.depths]))
        layers_run = [model.num_layers] + [d + 1 for d in model.depths]
        try:
            line = CostLine.fit(layers_run, [latency[(batch_size, d)] for d in [None, *model.depths]], model.num_layers)
            lines[str(batch_size)] = line.summary()
            print(f"evaluate: decode cost at batch {batch_size}: {line.describe()}")
        except ValueError as e:
            lines[str(batch_size)] = None
            print(f"evaluate: decode cost at batch {batch_size}: no line fitted: {e}")
    prompt = sequences[:1, : settings.prompt_tokens]
    full_seconds = greedy_seconds(model, prompt, settings.new_tokens, settings.repeats)
    for row in rows:
        if row["kind"] not in ("full", "balcony"):
            continue
        depth = None if row["kind"] == "full" else row["depth"]
        row["latency_ms"] = {str(b): latency[(b, depth)] * 1e3 for b in batches}
        row["speedup"] = {str(b): latency[(b, None)] / latency[(b, depth)] for b in batches}
        row["ideal_speedup"] = 1 / row["relative_cost"]
        if depth is None:
            continue
        row["assisted"] = assisted_speedup(model, depth, prompt, settings.new_tokens, settings.draft_tokens,
                                           settings.repeats, full_seconds)
        print(f"evaluate: HF assisted generation with exit@{depth}: acceptance {row['assisted']['acceptance_rate']:.2f}, "
              f"speedup {row['assisted']['speedup']:.2f}x over greedy full-depth decoding")
    return lines
