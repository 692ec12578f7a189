"""What a large vocabulary costs each stage: SmolLM2-135M (49,152 tokens) against Gemma 3 270M (262,144),
each with its recipe (configs/demo.yaml, configs/gemma3-270m.yaml), timed in one run on this machine.

    python experiments/vocabulary_cost.py [--seq 512] [--repeats 3]

Per token of real text (one sequence of --seq tokens), medians of --repeats after a warm-up:
- teacher-logits: the layers' forward, the head's matmul, and the rest of Teacher.targets (softmax, the
  draws, the encoding, the fidelity probes at the stage's rate): which parts scale with the vocabulary;
- train-exits: one optimizer step of the recipe's exits on cached targets (train.loss_positions), and
  the frozen prefix's forward inside it;
- evaluate: the quality pass over the full model, the exits and the logit lens at each exit, and the
  head's matmuls of those variants alone (the pass's floor).
Writes results/vocabulary-cost/costs.json and table.md. Gemma is skipped when its asset is not built
(make assets MODEL=gemma3-270m).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import corpus_batch  # noqa: E402

from pipeline.backbone import load_backbone, load_tokenizer  # noqa: E402
from pipeline.balcony import BalconyModel  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluation import score_batch, variants_of  # noqa: E402
from pipeline.losses import exit_losses  # noqa: E402
from pipeline.targets import TARGETS_KEY, TargetFormat  # noqa: E402
from pipeline.teacher import Teacher  # noqa: E402

OUT = ROOT / "results" / "vocabulary-cost"
RECIPES = {"SmolLM2-135M": ROOT / "configs/demo.yaml", "Gemma 3 270M": ROOT / "configs/gemma3-270m.yaml"}


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, recipe: Path, seq: int, repeats: int) -> dict:
    cfg = load_config(recipe)
    backbone, tokenizer = load_backbone(cfg.model), load_tokenizer(cfg.model)
    ids = corpus_batch(tokenizer, 1, seq)
    tokens = ids.numel()
    vocab, hidden = backbone.lm_head.weight.shape
    fmt = TargetFormat(cfg.teacher, vocab)
    # fidelity probes at the stage's rate: teacher.fidelity_positions per batch of teacher.batch_size sequences
    probes = round(cfg.teacher.fidelity_positions * seq / (cfg.teacher.batch_size * cfg.data.seq_len))
    teacher = Teacher(backbone, fmt, dataclasses.replace(cfg.teacher, fidelity_positions=probes))
    chunk = cfg.teacher.chunk_size

    with torch.inference_mode():
        states = backbone.model(input_ids=ids).last_hidden_state.reshape(tokens, -1)
        layers_s = median_seconds(lambda: backbone.model(input_ids=ids), repeats)
        head_s = median_seconds(lambda: [backbone.lm_head(part) for part in states.split(chunk)], repeats)
    targets = teacher.targets(ids.numpy(), ["b0"])
    teacher_s = median_seconds(lambda: teacher.targets(ids.numpy(), ["b0"]), repeats)

    model = BalconyModel(backbone, cfg.exits.depths)
    batch = {"input_ids.npy": ids, **fmt.decode_batch([t[TARGETS_KEY] for t in targets], seq)}
    optimizer = torch.optim.AdamW(model.exits.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step():
        losses = exit_losses(model, model.logits, model.depths, batch, fmt, cfg.train.chunk_size,
                             loss_positions=cfg.train.loss_positions, generator=generator)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = median_seconds(step, repeats)
    with torch.inference_mode():
        prefix_s = median_seconds(lambda: model(ids, full=False), repeats)

    variants = [v for v in variants_of(model, []) if v.kind != "tuned_lens"]
    quality_s = median_seconds(lambda: score_batch(model, [], variants, ids, cfg.eval.chunk_size), repeats)
    with torch.inference_mode():
        matmuls_s = median_seconds(lambda: [backbone.lm_head(part) for _ in variants
                                            for part in states.split(cfg.eval.chunk_size)], repeats)
    per_token = lambda seconds: seconds / tokens * 1e3  # noqa: E731  ms per token
    return {"model": name, "recipe": str(recipe.relative_to(ROOT)), "vocab": vocab, "hidden": hidden,
            "layers": model.num_layers, "head_params": backbone.lm_head.weight.numel(),
            "params": sum(p.numel() for p in backbone.parameters()), "tokens": tokens,
            "teacher_ms": per_token(teacher_s), "teacher_layers_ms": per_token(layers_s),
            "teacher_head_ms": per_token(head_s), "teacher_rest_ms": per_token(teacher_s - layers_s - head_s),
            "target_bytes_per_token": sum(len(t[TARGETS_KEY]) for t in targets) / tokens,
            "train_step_ms": per_token(step_s), "train_prefix_ms": per_token(prefix_s),
            "loss_positions": cfg.train.loss_positions, "exits": model.depths,
            "quality_variants": len(variants), "quality_ms": per_token(quality_s), "quality_matmuls_ms": per_token(matmuls_s)}


def table(rows: list[dict], command: str) -> str:
    lines = [f"Per token, ms, one run on this machine (`{command}`): medians of the repeats after a warm-up.", "",
             "| | " + " | ".join(f"{r['model']} (vocabulary {r['vocab']:,}, head {r['head_params'] / r['params']:.0%} "
                                 f"of {r['params'] / 1e6:.0f}M)" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]

    def line(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in rows) + " |")

    line("teacher-logits, all", lambda r: f"{r['teacher_ms']:.2f} ({1e3 / r['teacher_ms']:.0f} tok/s)")
    line("  the layers' forward", lambda r: f"{r['teacher_layers_ms']:.2f} ({r['teacher_layers_ms'] / r['teacher_ms']:.0%})")
    line("  the head's matmul", lambda r: f"{r['teacher_head_ms']:.2f} ({r['teacher_head_ms'] / r['teacher_ms']:.0%})")
    line("  softmax, draws, encoding, fidelity probes", lambda r: f"{r['teacher_rest_ms']:.2f} ({r['teacher_rest_ms'] / r['teacher_ms']:.0%})")
    line("target bytes per token", lambda r: f"{r['target_bytes_per_token']:.1f}")
    line("train-exits step (exits, loss positions)", lambda r: f"{r['train_step_ms']:.2f} ({r['exits']}, {r['loss_positions']:.0%})")
    line("  forward of the frozen prefix and the exits' layers", lambda r: f"{r['train_prefix_ms']:.2f} ({r['train_prefix_ms'] / r['train_step_ms']:.0%})")
    line("  head and loss, backward, optimizer", lambda r: f"{r['train_step_ms'] - r['train_prefix_ms']:.2f} "
         f"({1 - r['train_prefix_ms'] / r['train_step_ms']:.0%})")
    line("evaluate quality pass (variants)", lambda r: f"{r['quality_ms']:.2f} ({r['quality_variants']}; {1e3 / r['quality_ms']:.0f} tok/s)")
    line("  the variants' head matmuls alone", lambda r: f"{r['quality_matmuls_ms']:.2f} ({r['quality_matmuls_ms'] / r['quality_ms']:.0%})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, recipe in RECIPES.items():
        backbone = Path(load_config(recipe).model.backbone)
        if not (ROOT / backbone).exists() and not backbone.exists():
            print(f"vocabulary-cost: {name} skipped: {backbone} is not built (make assets MODEL=gemma3-270m)")
            continue
        rows.append(measure(name, recipe, args.seq, args.repeats))
        print(json.dumps(rows[-1]))
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} python experiments/vocabulary_cost.py" + "".join(
        f" --{k} {v}" for k, v in vars(args).items() if v != parser.get_default(k))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "costs.json").write_text(json.dumps({"command": command, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    (OUT / "table.md").write_text(table(rows, command))
    print((OUT / "table.md").read_text())


if __name__ == "__main__":
    main()
