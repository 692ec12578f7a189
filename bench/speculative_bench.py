"""Benchmark self-speculative decoding on one exit: fixed drafts against confidence-stopped drafts, and
each against plain greedy decoding, as ratios measured in one run.

    python bench/speculative_bench.py [--exits runs/demo/exits] [--depth 20] [--prompts 4] [--repeats 3]

The demo's backbone, greedy decoding at batch 1 of `--prompts` real-text prompts of 32 tokens, 32 new
tokens each. The exit: `--depth` of the trained exits in `--exits` when that folder holds them (as
`make demo` leaves them), else an untrained `next_layer` exit at `--depth` (the logit lens one layer
deeper: the ratio still measures the drafting policy, not a trained exit). Every prompt's three decodes
run in turn and each policy's time is the median over `--repeats`, so drift hits all three alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pipeline.backbone import load_backbone, load_tokenizer
from pipeline.balcony import CONFIG, BalconyModel
from pipeline.config import ModelConfig
from pipeline.speculative import DraftPolicy, SpeculativeStats, speculative_generate

from common import BACKBONE, ROOT, corpus_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", default=str(ROOT / "runs" / "demo" / "exits"))
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--fixed", type=int, default=4, help="drafts per round of the fixed policy")
    parser.add_argument("--max-draft", type=int, default=8, help="the confidence-stopped policy's cap")
    parser.add_argument("--tau", type=float, default=0.6, help="the confidence-stopped policy's threshold")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    backbone = load_backbone(ModelConfig(backbone=str(BACKBONE)))
    trained = (Path(args.exits) / CONFIG).exists()
    if trained:
        model = BalconyModel.from_pretrained(backbone, Path(args.exits))
        if args.depth not in model.depths:
            raise SystemExit(f"error: --depth {args.depth}: no exit there in {args.exits} (exits: {model.depths})")
    else:
        model = BalconyModel(backbone, [args.depth], init="next_layer")
    model.eval()
    prompts = corpus_batch(load_tokenizer(ModelConfig(backbone=str(BACKBONE))), args.prompts, 32)
    policies = {"fixed": DraftPolicy(args.fixed), "confident": DraftPolicy(args.max_draft, args.tau)}
    stats = {name: SpeculativeStats() for name in policies}

    def plain(prompt):
        model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                       pad_token_id=backbone.config.eos_token_id)

    def speculative(name, prompt, record):
        _, run = speculative_generate(model, prompt, args.depth, args.new_tokens, policies[name])
        if record:
            stats[name].merge(run)

    runs = {"plain": plain, **{name: (lambda prompt, name=name, record=False: speculative(name, prompt, record))
                               for name in policies}}
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn(prompts[:1])  # warm-up
    for name in policies:
        for i in range(len(prompts)):
            speculative(name, prompts[i:i + 1], record=True)
    for _ in range(args.repeats):
        total = dict.fromkeys(runs, 0.0)
        for i in range(len(prompts)):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn(prompts[i:i + 1])
                total[name] += time.perf_counter() - start
        for name, seconds in total.items():
            times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    exit_kind = f"trained exit {args.depth} of {args.exits}" if trained else f"untrained next_layer exit at {args.depth}"
    print(f"\nself-speculative decoding, SmolLM2-135M (cpu, {torch.get_num_threads()} threads), {exit_kind}, greedy, "
          f"batch 1, {len(prompts)} prompts x {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"  plain greedy decoding        {median['plain']:6.2f} s")
    for name, policy in policies.items():
        s = stats[name]
        print(f"  {name:9s} (max {policy.max_draft}, tau {policy.tau:g}) {median[name]:6.2f} s  "
              f"{median['plain'] / median[name]:.2f}x plain; {s.tokens_per_round:.2f} tokens/round, acceptance "
              f"{s.acceptance_rate:.2f}, {s.draft_length:.2f} drafts/round")
    print(f"  confidence-stopped drafts are {median['fixed'] / median['confident']:.2f}x the speed of fixed drafts")


if __name__ == "__main__":
    main()
