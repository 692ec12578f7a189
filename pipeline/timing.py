"""Speed of an exit against full depth, measured: decode latency through HF generate() on the
exit's view, and self-speculative greedy decoding against plain greedy decoding."""
from __future__ import annotations

import statistics
import time

import torch

from pipeline.balcony import BalconyModel


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
