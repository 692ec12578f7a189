"""Every exit as a standalone Hugging Face checkpoint.

A Balcony exit at depth k is an ordinary model of the backbone's own class: layers[:k], the exit's
layer as layer k, the exit's norm as the final norm, and the shared head — a checkpoint of k+1
layers (`num_hidden_layers` and `layer_types` cut to match) that transformers'
`AutoModelForCausalLM`, lm-evaluation-harness (`--model hf`), serving engines and assisted
generation (`assistant_model=`) load with no code of ours. Its logits are `BalconyModel.view(k)`'s.

A folder holds config.json, generation_config.json, model.safetensors, the tokenizer and a model
card (README.md) with the backbone, depth, relative cost, training tokens and, when the run's
evaluation scored these very exits, its figures. It is written under a temporary name and renamed
into place, and the same exits give the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.balcony import BalconyModel, recorded_evaluation
from pipeline.distributed import rank_zero_view, writes_files
from pipeline.errors import InputError


def model_card(model: BalconyModel, depth: int, backbone: str, scores: dict | None) -> str:
    """README.md of one exported exit: what it is, what it costs, how it was trained and scored."""
    meta, layers = model.meta, model.num_layers
    trained = (f"{meta['tokens']:,} tokens ({meta['steps']:,} steps), objective `{meta.get('objective', 'kl')}`"
               if "tokens" in meta else f"objective `{meta.get('objective', 'kl')}` (token count not recorded)")
    lines = [
        "---", "tags: [balcony, early-exit, self-distillation]", f"base_model: {backbone}", "---", "",
        f"# Balcony exit at depth {depth} of {backbone}", "",
        f"Layers 0-{depth - 1} of the frozen backbone `{backbone}`, then a trained exit ({meta.get('exit_layer', 'decoder layer')} "
        f"+ its own norm, initialised as `{model.init}`), then the backbone's own head: {depth + 1} of {layers + 1} "
        f"layer computations per token, a relative cost of {(depth + 1) / layers:.3f} against the full model.", "",
        f"Trained by the Balcony pipeline: {trained}.", "",
    ]
    if scores:
        lines += ["Scored by the run's evaluate stage on its held-out tokens (these exits):", "",
                  "| model | perplexity | KL to full | top-1 agreement |", "|---|---|---|---|",
                  f"| full backbone | {scores['full']['perplexity']:.2f} | 0 | 1.000 |",
                  f"| this exit | {scores['exit']['perplexity']:.2f} | {scores['exit']['kl_to_full']:.4f} | "
                  f"{scores['exit']['top1_agreement']:.3f} |", ""]
    else:
        lines += ["No evaluation of these exits was found in the run (RUN/eval/metrics.json).", ""]
    lines += ["Load it as any causal LM, or use it as a draft model for the full backbone:", "", "```python",
              "from transformers import AutoModelForCausalLM",
              "exit = AutoModelForCausalLM.from_pretrained(FOLDER)",
              "full.generate(ids, assistant_model=exit, do_sample=False)  # same tokens as greedy `full` alone",
              "```", "", "`lm_eval --model hf --model_args pretrained=FOLDER --tasks ...` scores it as it is.", "",
              "With the Balcony pipeline installed, the run's exits draft for the full backbone sharing its KV cache "
              "(self-speculative decoding: the full model's output, greedy or sampled, for fewer full-depth passes):", "",
              "```python", "from pipeline.backbone import load_backbone", "from pipeline.balcony import BalconyModel",
              "from pipeline.config import ModelConfig",
              f"model = BalconyModel.from_pretrained(load_backbone(ModelConfig(backbone={backbone!r})), 'RUN/exits',",
              "                                      evaluation='RUN/eval/metrics.json')",
              "model.generate(ids, speculative=True, do_sample=True, temperature=0.7, max_new_tokens=64)",
              "```", ""]
    choice = (scores or {}).get("speculative_choice")
    if choice:
        lines += [f"The run's evaluation measured exit {choice['depth']} drafting at most {choice['max_draft']} tokens while "
                  f"its top-1 probability is at least {choice['tau']:g} fastest: {choice['speedup']:.2f}x over plain greedy "
                  "decoding at batch 1 on the machine it ran on; `speculative=True` uses that.", ""]
    return "\n".join(lines)


def export_exit(model: BalconyModel, depth: int, folder: Path, tokenizer, backbone: str,
                scores: dict | None = None) -> Path:
    """Write exit `depth` of `model` as a standalone HF checkpoint in `folder` (replacing it)."""
    if model.kind != "balcony":
        raise InputError(f"export: exits of kind {model.kind!r} are not decoder layers; only Balcony exits "
                         "make a standalone checkpoint")
    folder = Path(folder)
    lead = writes_files()  # of a tensor-parallel group, every rank gathers its slices and rank 0 writes
    if lead:
        for stale in [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # one writer per folder: these are a killed export's
    (tmp,) = rank_zero_view(folder.with_name(f".{folder.name}.tmp-{os.getpid()}"))
    view = model.view(depth)
    view.save_pretrained(tmp, safe_serialization=True)
    if not lead:
        return folder
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(model, depth, backbone, scores))
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)  # a reader sees the old folder, no folder, or the new one; never a partial one
    shutil.rmtree(old, ignore_errors=True)
    return folder


def evaluation_scores(metrics_path: Path, exits_dir: Path, depth: int) -> dict | None:
    """The full model's and exit `depth`'s held-out figures, and the measured speculative choice, from an
    evaluate stage's metrics.json, if it scored these exits (same weights file); else None."""
    metrics = recorded_evaluation(metrics_path, exits_dir)
    if metrics is None:
        return None
    rows = {row["name"]: row for row in metrics["rows"]}
    return {"full": rows["full"], "exit": rows[f"exit@{depth}"], "speculative_choice": metrics.get("speculative_choice")}
